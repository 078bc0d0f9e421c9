"""The image's `build` step (docker/entrypoint.sh → `nirvana export --profile gpu`) with the image's torch (the CPU
wheel) and TensorRT faked at its API boundary (tensorrt_fakes): a CUDA-torch call, a torch import in the build or
check path, an import-time GPU assumption or an error type the caller does not catch fails here, not at a user's
first start."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import tensorrt_fakes
from typer.testing import CliRunner

from nirvana.checkpoint import Checkpoint
from nirvana.contract.specs import submodel_specs

HERE = Path(__file__).parent


def _block_torch_during_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap build_engine so that torch (and every torch.* module) is unimportable while an engine is built and
    checked; the ONNX export before it keeps the CPU torch the image has."""
    from nirvana_export import tensorrt_build

    real_build, built = tensorrt_build.build_engine, []

    def guarded(onnx_path, spec, plan_path, *args, **kwargs):  # type: ignore[no-untyped-def]
        with pytest.MonkeyPatch.context() as m:
            for name in [n for n in sys.modules if n == "torch" or n.startswith("torch.")]:
                m.setitem(sys.modules, name, None)
            m.setitem(sys.modules, "torch", None)
            result = real_build(onnx_path, spec, plan_path, *args, **kwargs)
        built.append(spec.name)
        return result

    monkeypatch.setattr(tensorrt_build, "build_engine", guarded)
    return built


def _entrypoint_build(checkpoint: Path, repo: Path, cache: Path):  # type: ignore[no-untyped-def]
    """What docker/entrypoint.sh's build() runs (`nirvana export ... --profile gpu`), in-process."""
    from nirvana_cli.main import app

    args = ["export", "--checkpoint", str(checkpoint), "--out", str(repo), "--profile", "gpu"]
    args += ["--cache-dir", str(cache)]
    return CliRunner().invoke(app, args)


def test_entrypoint_build_step_builds_and_checks_every_engine_without_torch(
    tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = tensorrt_fakes.install(monkeypatch)
    built = _block_torch_during_builds(monkeypatch)
    repo = tmp_path / "repository" / "sm90-trt10.8.0.43"
    result = _entrypoint_build(tiny_checkpoint_dir, repo, tmp_path / "cache")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert (repo / "repository_manifest.json").is_file()
    from nirvana_export import tensorrt_build

    specs = submodel_specs(tiny_checkpoint)
    assert set(built) >= {"text_encoder", "unet", "vae_decoder"}
    for name in built:
        engine = tensorrt_fakes.FakeEngine.deserialize((repo / name / "1" / "model.plan").read_bytes())
        shapes_by_profile = tensorrt_build.engine_profiles(specs[name])
        profiles = [{n: (low, opt, high) for n, low, opt, high in shapes} for shapes in shapes_by_profile]
        assert engine.profiles == profiles and len(profiles) == (2 if name == "unet" else 1)
        assert engine.fp16  # the default: every sub-model fp16 (SD 1.5 family)
    configs = [kw for label, _, kw in backend.calls if label == "CreateConfig"]
    assert all(kw["fp16"] and kw["tf32"] for kw in configs) and len(configs) == len(built)
    # Every engine was run against onnxruntime through the Comparator before it was saved.
    assert [label for label, *_ in backend.calls].count("TrtRunner") == len(built) + 1  # the UNet's 2 profiles
    # One timing cache at the repository root, loaded by each build after the first and merged into.
    assert (repo / "tensorrt_timing.cache").read_bytes() == b"timings;" * len(built)
    loads = [kw["load_timing_cache"] for kw in configs]
    assert loads[0] is None and loads[1:] == [str(repo / "tensorrt_timing.cache")] * (len(built) - 1)


def test_a_rejected_engine_fails_the_build_step_with_the_error_type_it_declares(
    tiny_checkpoint_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nirvana_export.tensorrt_build import EngineBuildError, EngineCheckError

    tensorrt_fakes.install(monkeypatch, noise=0.5)  # a wrong engine: O(1) off
    _block_torch_during_builds(monkeypatch)
    repo = tmp_path / "repository"
    result = _entrypoint_build(tiny_checkpoint_dir, repo, tmp_path / "cache")
    assert result.exit_code != 0
    assert isinstance(result.exception, EngineCheckError) and isinstance(result.exception, EngineBuildError)
    message = str(result.exception)
    assert "max abs diff" in message and "NIRVANA_ENGINE_TOLERANCE=ATOL,RTOL" in message
    assert result.exception.differences  # output → (max abs, max rel, atol needed)
    assert not list(repo.rglob("model.plan")) and not (repo / "repository_manifest.json").exists()


def test_build_and_check_import_and_run_with_torch_absent(
    tiny_checkpoint_dir: Path, tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """A fresh interpreter where `import torch` fails from the start: the build/check modules, polygraphy and
    onnxruntime must import and build + check every exported sub-model (ONNX exported beforehand, here)."""
    from nirvana_export.onnx_export import export_all

    paths = export_all(tiny_checkpoint_dir, tmp_path / "onnx")
    specs = submodel_specs(tiny_checkpoint)
    jobs = {name: (str(path), specs[name]) for name, path in paths.items()}
    (tmp_path / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    script = f"""
import json, pickle, sys
sys.path.insert(0, {str(HERE)!r})
import tensorrt_fakes
tensorrt_fakes.TorchBlocker.install()
# nirvana_export/__init__.py imports onnx_export (torch) eagerly: load the package without running it, so this
# checks what the build/check path itself imports.
import types
package = types.ModuleType("nirvana_export")
package.__path__ = [{str(Path(__file__).parents[2] / "export" / "nirvana_export")!r}]
sys.modules["nirvana_export"] = package
sys.modules["tensorrt"] = tensorrt_fakes.fake_tensorrt()
sys.modules["polygraphy.backend.trt"] = tensorrt_fakes.fake_polygraphy_trt()
from nirvana_export.tensorrt_build import build_engine
out = {{}}
for name, (path, spec) in pickle.loads(open({str(tmp_path / "jobs.pkl")!r}, "rb").read()).items():
    plan = build_engine(path, spec, {str(tmp_path)!r} + f"/{{name}}.plan", fp16=True)
    out[name] = plan.stat().st_size
out["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print(json.dumps(out))
"""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("torch_loaded") is False
    assert set(result) == set(paths) and all(size > 0 for size in result.values())
