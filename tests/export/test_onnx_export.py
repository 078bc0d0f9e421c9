"""nirvana_export: ONNX export of the four sub-models, checked against torch; TensorRT build fails clearly on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nirvana.checkpoint import Checkpoint
from nirvana.contract.specs import MODEL_NAMES, submodel_specs
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


def test_an_isolated_export_runs_each_sub_model_in_its_own_process_and_reports_its_peak(
    tiny_checkpoint_dir: Path, tmp_path: Path, exported: tuple[Path, dict[str, Path]]
) -> None:
    """What a full-size checkpoint gets by default (weights over 1 GiB): the parent never loads a module, each child
    only its own; the files are the ones the in-process export writes."""
    names = ["text_encoder", "vae_decoder"]
    paths = export_all(tiny_checkpoint_dir, tmp_path, names=names, isolate=True)
    manifest = json.loads((tmp_path / "export_manifest.json").read_text())
    for name in names:
        entry = manifest["models"][name]
        assert entry["own_process"] is True and 50 << 20 < entry["peak_rss_bytes"] < 8 << 30  # a child with torch
        same = onnx.load(str(exported[1][name]))
        graph = onnx.load(str(paths[name])).graph
        assert [n.op_type for n in graph.node] == [n.op_type for n in same.graph.node]  # the same graph
        assert 0 <= entry["max_abs_diff"] <= TOLERANCES[name][0]  # checked there (thread counts move the last digit)
