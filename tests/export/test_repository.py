"""Triton configs are rendered from the sub-model specs; the committed model_repository/ must not drift."""

from pathlib import Path

import pytest

from nirvana.specs import MODEL_NAMES, triton_dims
from nirvana_export.repository import (
    RepositoryError,
    reference_repository,
    render_configs,
    sd15_specs,
    submodel_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_committed_model_repository_matches_the_specs() -> None:
    expected = reference_repository()
    committed = {
        p.relative_to(ROOT / "model_repository").as_posix(): p.read_text()
        for p in (ROOT / "model_repository").rglob("*")
        if p.is_file() and p.suffix in (".pbtxt", ".py")
    }
    assert committed == expected, "regenerate with: python -m nirvana_export.repository model_repository"


def test_config_lists_every_spec_tensor_with_dims_and_types() -> None:
    for name, spec in sd15_specs().items():
        text = submodel_config(spec, "gpu")
        assert f'name: "{name}"' in text and 'platform: "tensorrt_plan"' in text
        for tensor in (*spec.inputs, *spec.outputs):
            assert f'name: "{tensor.name}"' in text
            assert "dims: [ " + ", ".join(map(str, triton_dims(tensor))) + " ]" in text


def test_cpu_profile_serves_onnx_through_python_models() -> None:
    files = render_configs(sd15_specs(), (512, 512), "cpu")
    for name in MODEL_NAMES:
        assert 'backend: "python"' in files[f"{name}/config.pbtxt"]
        assert "nirvana.serving.onnx_model" in files[f"{name}/1/model.py"]
    nirvana = files["nirvana/config.pbtxt"]
    assert "dims: [ 512, 512, 3 ]" in nirvana and "max_queue_size" in nirvana
    for optional in ("NEGATIVE_PROMPT", "SEED", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "CACHE_MODE", "TENANT"):
        block = nirvana.split(f'name: "{optional}"')[1].split("}")[0]
        assert "optional: true" in block


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(RepositoryError, match="profile='tpu'"):
        submodel_config(sd15_specs()["unet"], "tpu")
