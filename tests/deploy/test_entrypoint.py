"""docker/entrypoint.sh with stand-ins for nvidia-smi, nirvana and tritonserver (the GPU and Triton are not here).

What it must do: pick a repository folder per (compute capability, TensorRT version), call `nirvana export` on it
under a lock, refuse to serve an unbuilt repository, and exec tritonserver with the configured ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import DOCKER

pytestmark = pytest.mark.skipif(not shutil.which("flock"), reason="flock (util-linux) is not installed")

TRT = "10.8.0.43"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "nvidia-smi", 'echo "9.0"')  # an H100
    _stub(bin_dir, "nirvana", f'echo "$@" > {tmp_path}/nirvana.args')
    _stub(bin_dir, "tritonserver", f'echo "$@" > {tmp_path}/tritonserver.args')
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model_index.json").write_text("{}")
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "NIRVANA_CHECKPOINT": str(checkpoint),
        "NIRVANA_MODEL_REPOSITORY": str(tmp_path / "repo"),
        "NIRVANA_CACHE_DIR": str(tmp_path / "cache"),
        "NIRVANA_MILVUS_URI": "http://milvus:19530",
        "NIRVANA_TENSORRT_VERSION": TRT,
        "NIRVANA_HTTP_PORT": "9000",
    }


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_build_exports_into_a_folder_per_gpu_kind(env: dict[str, str], tmp_path: Path) -> None:
    result = _run(env, "build")
    assert result.returncode == 0, result.stderr
    repo = tmp_path / "repo" / f"sm90-trt{TRT}"
    assert (tmp_path / "nirvana.args").read_text().split() == [
        "export",
        "--checkpoint",
        env["NIRVANA_CHECKPOINT"],
        "--out",
        str(repo),
        "--profile",
        "gpu",
        "--cache-dir",
        env["NIRVANA_CACHE_DIR"],
        "--milvus-uri",
        "http://milvus:19530",
    ]
    assert (repo / ".build.lock").exists()


def test_build_without_a_checkpoint_says_what_to_mount(env: dict[str, str], tmp_path: Path) -> None:
    env["NIRVANA_CHECKPOINT"] = str(tmp_path / "absent")
    result = _run(env, "build")
    assert result.returncode == 1
    assert "no diffusers checkpoint" in result.stderr


def test_serve_refuses_an_unbuilt_repository(env: dict[str, str]) -> None:
    result = _run(env, "serve")
    assert result.returncode == 1
    assert "run the 'build' step first" in result.stderr


def test_serve_execs_tritonserver_on_the_built_repository(env: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "repo" / f"sm90-trt{TRT}"
    repo.mkdir(parents=True)
    (repo / "repository_manifest.json").write_text("{}")
    result = _run(env, "serve")
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "tritonserver.args").read_text().split()
    assert f"--model-repository={repo}" in args
    assert {"--http-port=9000", "--grpc-port=8001", "--metrics-port=8002", "--allow-metrics=true"} <= set(args)


def test_cpu_profile_needs_no_gpu(env: dict[str, str], tmp_path: Path) -> None:
    env["NIRVANA_PROFILE"] = "cpu"
    env["PATH"] = env["PATH"].replace(str(tmp_path / "bin"), str(tmp_path / "nogpu"))
    (tmp_path / "nogpu").mkdir()
    shutil.copy(tmp_path / "bin" / "nirvana", tmp_path / "nogpu" / "nirvana")
    result = _run(env, "build")
    assert result.returncode == 0, result.stderr
    assert f"--out {tmp_path}/repo/cpu --profile cpu" in (tmp_path / "nirvana.args").read_text()


def test_other_commands_run_as_given(env: dict[str, str]) -> None:
    result = _run(env, "echo", "hello")
    assert result.stdout == "hello\n"
