"""nirvana_export: ONNX export of the four sub-models, checked against torch; TensorRT build fails clearly on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nirvana.checkpoint import Checkpoint
from nirvana.specs import MODEL_NAMES, submodel_specs
from nirvana_export.onnx_export import TOLERANCES, ExportCheckError, check_onnx, export_all


@pytest.fixture(scope="module")
def exported(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("onnx")
    return out, export_all(tiny_checkpoint_dir, out)


def test_export_all_writes_four_checked_files_and_a_manifest(
    exported: tuple[Path, dict[str, Path]], tiny_checkpoint: Checkpoint
) -> None:
    out, paths = exported
    assert tuple(paths) == MODEL_NAMES
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["checkpoint"]["fingerprint"] == tiny_checkpoint.fingerprint
    assert manifest["opset"] == 17
    specs = submodel_specs(tiny_checkpoint)
    for name, path in paths.items():
        assert path == out / name / "model.onnx" and path.is_file()
        entry = manifest["models"][name]
        assert entry["path"] == f"{name}/model.onnx"
        assert 0 <= entry["max_abs_diff"] <= TOLERANCES[name][0]
        model = onnx.load(str(path), load_external_data=False)
        # Graph I/O names are the spec's, in order: they go into every config.pbtxt.
        assert [i.name for i in model.graph.input] == specs[name].input_names
        assert [o.name for o in model.graph.output] == specs[name].output_names
        assert entry["spec"]["inputs"][0]["name"] == specs[name].input_names[0]


def test_check_onnx_passes_again_on_the_exported_files(
    exported: tuple[Path, dict[str, Path]], tiny_checkpoint: Checkpoint
) -> None:
    _, paths = exported
    specs = submodel_specs(tiny_checkpoint)
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert check_onnx(tiny_checkpoint, specs[name], paths[name], atol=1e-4, rtol=1e-4) < 1e-4


def _perturb_largest_initializer(src: Path, dst: Path) -> str:
    model = onnx.load(str(src))
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    target = max(weights, key=lambda i: int(np.prod(i.dims)))
    array = numpy_helper.to_array(target)
    # Random, not constant: a constant shift of an embedding table is removed by the next LayerNorm.
    noise = np.random.default_rng(0).normal(0.0, 0.1, array.shape)
    target.CopyFrom(numpy_helper.from_array((array + noise).astype(np.float32), target.name))
    onnx.save(model, str(dst))
    return target.name


@pytest.mark.parametrize("name", ["text_encoder", "unet"])
def test_a_perturbed_graph_fails_the_check_naming_the_model(
    exported: tuple[Path, dict[str, Path]], tiny_checkpoint: Checkpoint, tmp_path: Path, name: str
) -> None:
    _, paths = exported
    bad = tmp_path / "model.onnx"
    _perturb_largest_initializer(paths[name], bad)
    spec = submodel_specs(tiny_checkpoint)[name]
    with pytest.raises(ExportCheckError, match=rf"^{name}: output '{spec.output_names[0]}' .* max abs diff"):
        check_onnx(tiny_checkpoint, spec, bad)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_build_engine_without_tensorrt_says_what_is_missing(
    exported: tuple[Path, dict[str, Path]], tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    from nirvana_export.tensorrt_build import TensorRTUnavailableError, build_engine

    _, paths = exported
    spec = submodel_specs(tiny_checkpoint)["unet"]
    with pytest.raises(TensorRTUnavailableError, match=r"TensorRT is not installed.*onnxruntime"):
        build_engine(paths["unet"], spec, tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()


def test_prompt_embedder_graph_reproduces_minilm_embedder(exported: tuple[Path, dict[str, Path]]) -> None:
    from nirvana.embed import MiniLMEmbedder
    from nirvana.runtime.onnx_runtime import OnnxModel

    _, paths = exported
    embedder = MiniLMEmbedder()
    prompts = ["a photo of a cat in a garden", "an oil painting of a castle at night, highly detailed, 4k"]
    batch = embedder._tokenizer(prompts, padding=True, truncation=True, max_length=128, return_tensors="np")
    got = OnnxModel(paths["prompt_embedder"]).run(
        {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    )["embedding"]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, embedder.embed(prompts), atol=1e-5)


def test_manifest_fingerprint_gates_onnx_submodels(
    exported: tuple[Path, dict[str, Path]], tiny_checkpoint: Checkpoint
) -> None:
    from nirvana.runtime.onnx_runtime import OnnxModelError, OnnxSubModels

    out, _ = exported
    OnnxSubModels(out, fingerprint=tiny_checkpoint.fingerprint)
    with pytest.raises(OnnxModelError, match=r"exported from checkpoint .* re-run the export"):
        OnnxSubModels(out, fingerprint="f" * 64)


class _FakeTensorRT(types.ModuleType):
    """Records what build_engine asks of TensorRT; ``weak_typing`` picks the 10.x (FP16 flag) or 11.x API."""

    def __init__(self, input_names: list[str], output_names: list[str], weak_typing: bool) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.99-fake" if weak_typing else "11.99-fake"
        self.calls: list[tuple] = []
        calls = self.calls
        io = types.SimpleNamespace
        self.BuilderFlag = io(FP16="FP16", TF32="TF32") if weak_typing else io(TF32="TF32")
        self.MemoryPoolType = io(WORKSPACE="WORKSPACE")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        network = io(
            num_inputs=len(input_names),
            num_outputs=len(output_names),
            get_input=lambda i: io(name=input_names[i]),
            get_output=lambda i: io(name=output_names[i]),
        )
        profile = io(set_shape=lambda *a: calls.append(("set_shape", *a)))
        cache = io(data=b"", serialize=lambda: b"timings:" + cache.data)

        def create_timing_cache(data: bytes) -> types.SimpleNamespace:
            calls.append(("create_timing_cache", data))
            cache.data = bytes(data)
            return cache

        config = io(
            set_memory_pool_limit=lambda *a: calls.append(("pool", *a)),
            set_flag=lambda f: calls.append(("flag", f)),
            clear_flag=lambda f: calls.append(("clear_flag", f)),
            add_optimization_profile=lambda p: calls.append(("profile",)),
            create_timing_cache=create_timing_cache,
            set_timing_cache=lambda c, ignore_mismatch: True,
            get_timing_cache=lambda: cache,
        )
        self.Builder = lambda logger: io(
            create_network=lambda flags: network,
            create_builder_config=lambda: config,
            create_optimization_profile=lambda: profile,
            build_serialized_network=lambda n, c: b"fake-plan",
        )
        self.OnnxParser = lambda net, logger: io(parse_from_file=lambda path: True, num_errors=0)


@pytest.mark.parametrize("weak_typing", [True, False])
def test_build_engine_sets_the_spec_profile_and_fp16_for_each_tensorrt_generation(
    exported: tuple[Path, dict[str, Path]],
    tiny_checkpoint: Checkpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    weak_typing: bool,
) -> None:
    from nirvana_export.tensorrt_build import EngineBuildError, build_engine

    _, paths = exported
    spec = submodel_specs(tiny_checkpoint)["unet"]
    fake = _FakeTensorRT(spec.input_names, spec.output_names, weak_typing)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    plan = tmp_path / "unet" / "model.plan"
    if not weak_typing:
        # TensorRT 11 takes precision from the graph: an fp32 graph must not silently become an fp32 engine.
        with pytest.raises(EngineBuildError, match=r"strongly typed.*fp32 only"):
            build_engine(paths["unet"], spec, plan, fp16=True)
    cache = tmp_path / "tensorrt_timing.cache"
    assert build_engine(paths["unet"], spec, plan, fp16=weak_typing, workspace_gb=1, timing_cache=cache, verify=False)
    assert plan.read_bytes() == b"fake-plan"
    shapes = {c[1]: c[2:] for c in fake.calls if c[0] == "set_shape"}
    assert shapes == spec.profile
    assert [shape[0] for shape in shapes["sample"]] == [2, 8, 16]  # rows: one pair, four requests, eight
    assert ("pool", "WORKSPACE", 1 << 30) in fake.calls
    assert (("flag", "FP16") in fake.calls) == weak_typing
    assert (("clear_flag", "TF32") in fake.calls) == (not weak_typing)  # fp32 means fp32, not TF32
    # The timing cache starts empty, is saved after the build, and is loaded by the next one.
    assert ("create_timing_cache", b"") in fake.calls and cache.read_bytes() == b"timings:"
    build_engine(paths["unet"], spec, plan, fp16=weak_typing, timing_cache=cache, verify=False)
    assert ("create_timing_cache", b"timings:") in fake.calls and cache.read_bytes() == b"timings:timings:"


def test_a_built_engine_is_checked_against_onnxruntime_and_removed_when_it_is_off(
    exported: tuple[Path, dict[str, Path]], tiny_checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nirvana.runtime.onnx_runtime import OnnxModel
    from nirvana_export import tensorrt_build
    from nirvana_export.tensorrt_build import EngineCheckError, build_engine, opt_inputs

    _, paths = exported
    spec = submodel_specs(tiny_checkpoint)["unet"]
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(spec.input_names, spec.output_names, True))
    seen: list[dict[str, np.ndarray]] = []

    def engine(plan: Path, inputs: dict[str, np.ndarray], noise: float) -> dict[str, np.ndarray]:
        seen.append(inputs)
        out = OnnxModel(paths["unet"]).run(inputs)["noise_pred"]
        return {"noise_pred": out + np.random.default_rng(0).normal(0, noise, out.shape).astype(np.float32)}

    plan = tmp_path / "model.plan"
    monkeypatch.setattr(tensorrt_build, "run_engine", lambda p, i: engine(p, i, 1e-3))
    build_engine(paths["unet"], spec, plan, fp16=True)  # fp16-sized noise passes the fp16 bound
    assert plan.is_file() and seen[0]["sample"].shape == (8, 4, 16, 16)  # checked at the opt shape
    assert {k: v.dtype.name for k, v in seen[0].items()} == {k: spec.input(k).dtype for k in spec.input_names}
    with pytest.raises(EngineCheckError, match=r"^unet: fp32 engine output 'noise_pred' .* max abs error"):
        build_engine(paths["unet"], spec, plan, fp16=False)  # the same noise fails the fp32 bound
    assert not plan.exists()
    np.testing.assert_array_equal(opt_inputs(spec)["timestep"], opt_inputs(spec)["timestep"])  # seeded
