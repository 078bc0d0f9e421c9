"""docker/entrypoint.sh with stand-ins for nvidia-smi, nirvana and tritonserver (the GPU and Triton are not here).

What it must do: pick a repository folder per (compute capability, TensorRT version), call `nirvana export` on it
under a lock, refuse to serve an unbuilt repository, and exec tritonserver with the configured ports, its
model-repository/shared-memory/logging/trace APIs restricted to a key from a file (or a random one), and the
tenant header forwarded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import DOCKER

pytestmark = pytest.mark.skipif(not shutil.which("flock"), reason="flock (util-linux) is not installed")

TRT = "10.8.0.43"
RESTRICTED = "model-repository,shared-memory,logging,trace"


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
    # One argument per line: the restricted-API flags must arrive as single, unsplit arguments.
    _stub(bin_dir, "tritonserver", f'printf "%s\\n" "$@" > {tmp_path}/tritonserver.args')
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


def _built(tmp_path: Path) -> Path:
    repo = tmp_path / "repo" / f"sm90-trt{TRT}"
    repo.mkdir(parents=True)
    (repo / "repository_manifest.json").write_text("{}")
    return repo


def _triton_args(tmp_path: Path) -> list[str]:
    return (tmp_path / "tritonserver.args").read_text().splitlines()


def test_serve_execs_tritonserver_on_the_built_repository(env: dict[str, str], tmp_path: Path) -> None:
    repo = _built(tmp_path)
    result = _run(env, "serve")
    assert result.returncode == 0, result.stderr
    args = _triton_args(tmp_path)
    assert f"--model-repository={repo}" in args
    assert {"--http-port=9000", "--grpc-port=8001", "--metrics-port=8002", "--allow-metrics=true"} <= set(args)


def _flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times: {args}"
    return values[0]


def test_serve_restricts_admin_apis_to_the_key_from_the_file(env: dict[str, str], tmp_path: Path) -> None:
    _built(tmp_path)
    key_file = tmp_path / "admin-key"
    key_file.write_text("  k3y-from_the.secret~/+ \n")  # a mounted Secret may end with a newline
    env["NIRVANA_ADMIN_KEY_FILE"] = str(key_file)
    result = _run(env, "serve")
    assert result.returncode == 0, result.stderr
    args = _triton_args(tmp_path)
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        assert _flag(args, flag) == f"{RESTRICTED}:nirvana-admin-key=k3y-from_the.secret~/+"
    assert "k3y" not in result.stderr + result.stdout  # the key is never logged


def test_serve_forwards_only_the_tenant_header(env: dict[str, str], tmp_path: Path) -> None:
    _built(tmp_path)
    assert _run(env, "serve").returncode == 0
    args = _triton_args(tmp_path)
    assert _flag(args, "--grpc-header-forward-pattern") == "^x-nirvana-tenant$"
    assert _flag(args, "--http-header-forward-pattern") == "^x-nirvana-tenant$"
    env["NIRVANA_TENANT_HEADER"] = "x-org-id"  # the engine config's security.tenant_header
    assert _run(env, "serve").returncode == 0
    assert _flag(_triton_args(tmp_path), "--http-header-forward-pattern") == "^x-org-id$"
    env["NIRVANA_TENANT_HEADER"] = ".*"  # a pattern would forward every header a client sends
    result = _run(env, "serve")
    assert result.returncode == 1 and "NIRVANA_TENANT_HEADER" in result.stderr


@pytest.mark.parametrize("configured", [False, True])
def test_without_a_key_file_a_private_random_key_keeps_the_apis_closed(
    env: dict[str, str], tmp_path: Path, configured: bool
) -> None:
    _built(tmp_path)
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    if configured:  # set but not mounted: still closed, with a warning
        env["NIRVANA_ADMIN_KEY_FILE"] = str(tmp_path / "not-mounted")
    keys = []
    for _ in range(2):
        result = _run(env, "serve")
        assert result.returncode == 0, result.stderr
        args = _triton_args(tmp_path)
        key = _flag(args, "--http-restricted-api").split(f"{RESTRICTED}:nirvana-admin-key=")[1]
        assert re.fullmatch(r"[0-9a-f]{64}", key)  # 32 random bytes
        assert _flag(args, "--grpc-restricted-protocol").endswith(f"={key}")
        assert key not in result.stderr
        keys.append(key)
    assert keys[0] != keys[1]
    files = sorted((tmp_path / "tmp").glob("nirvana-admin-key.*"))
    assert sorted(f.read_text().strip() for f in files) == sorted(keys)
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)  # only its owner can read it
    assert ("does not exist" in result.stderr) == configured


@pytest.mark.parametrize(("content", "message"), [("\n", "is empty"), ("a,b:c=d", "may hold only")])
def test_a_bad_key_file_stops_the_start(env: dict[str, str], tmp_path: Path, content: str, message: str) -> None:
    _built(tmp_path)
    key_file = tmp_path / "admin-key"
    key_file.write_text(content)
    env["NIRVANA_ADMIN_KEY_FILE"] = str(key_file)
    result = _run(env, "serve")
    assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "tritonserver.args").exists()


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
