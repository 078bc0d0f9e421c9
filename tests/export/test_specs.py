"""nirvana.specs: the tensor contracts every export, engine and Triton config is derived from."""

from __future__ import annotations

import pytest

from nirvana.checkpoint import Checkpoint
from nirvana.specs import (
    EMBEDDER_DIM,
    MODEL_NAMES,
    TRITON_DTYPES,
    ModelSpec,
    SpecError,
    TensorSpec,
    submodel_specs,
    triton_dims,
)


def _io(spec: ModelSpec) -> tuple[dict, dict]:
    return (
        {t.name: (t.dtype, t.shape) for t in spec.inputs},
        {t.name: (t.dtype, t.shape) for t in spec.outputs},
    )


def test_specs_of_the_tiny_checkpoint_have_the_fixed_names_dtypes_and_shapes(tiny_checkpoint: Checkpoint) -> None:
    specs = submodel_specs(tiny_checkpoint)
    assert tuple(specs) == MODEL_NAMES
    # Tiny checkpoint: L=77, D=32, C=4, 16×16 latent, VAE ×4 → 64×64 image.
    assert _io(specs["text_encoder"]) == (
        {"input_ids": ("int64", ("batch", 77))},
        {"last_hidden_state": ("float32", ("batch", 77, 32))},
    )
    assert _io(specs["prompt_embedder"]) == (
        {"input_ids": ("int64", ("batch", "sequence")), "attention_mask": ("int64", ("batch", "sequence"))},
        {"embedding": ("float32", ("batch", EMBEDDER_DIM))},
    )
    assert _io(specs["unet"]) == (
        {
            "sample": ("float32", ("batch", 4, 16, 16)),
            "timestep": ("float32", ("batch",)),
            "encoder_hidden_states": ("float32", ("batch", 77, 32)),
        },
        {"noise_pred": ("float32", ("batch", 4, 16, 16))},
    )
    assert _io(specs["vae_decoder"]) == (
        {"latent": ("float32", ("batch", 4, 16, 16))},
        {"image": ("float32", ("batch", 3, 64, 64))},
    )
    assert all(spec.max_batch_size == 0 for spec in specs.values())  # explicit batch axes, see specs docstring


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_profiles_cover_batch_one_to_max_batch(tiny_checkpoint: Checkpoint, max_batch: int) -> None:
    specs = submodel_specs(tiny_checkpoint, max_batch=max_batch, embedder_seq_len=64)
    for spec in specs.values():
        assert set(spec.profile) == set(spec.input_names)
        for name, (lo, opt, hi) in spec.profile.items():
            assert (lo[0], hi[0]) == (1, max_batch), (spec.name, name)
            assert lo[0] <= opt[0] <= hi[0]
    # The UNet's opt batch is the classifier-free-guidance pair.
    assert specs["unet"].profile["sample"][1][0] == min(2, max_batch)
    assert specs["prompt_embedder"].profile["input_ids"][0][1] == 1
    assert specs["prompt_embedder"].profile["input_ids"][2][1] == 64


def test_latent_size_override_changes_unet_and_vae_shapes_only(tiny_checkpoint: Checkpoint) -> None:
    specs = submodel_specs(tiny_checkpoint, latent_size=(24, 32))
    assert specs["unet"].input("sample").shape == ("batch", 4, 24, 32)
    assert specs["vae_decoder"].outputs[0].shape == ("batch", 3, 96, 128)
    assert specs["text_encoder"] == submodel_specs(tiny_checkpoint)["text_encoder"]


def test_triton_dims_and_dynamic_axes_follow_the_shape(tiny_checkpoint: Checkpoint) -> None:
    unet = submodel_specs(tiny_checkpoint)["unet"]
    assert triton_dims(unet.input("sample")) == [-1, 4, 16, 16]
    assert triton_dims(unet.input("timestep")) == [-1]
    assert unet.dynamic_axes == {
        "sample": {0: "batch"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch"},
        "noise_pred": {0: "batch"},
    }
    assert unet.input("sample").concrete(batch=2) == (2, 4, 16, 16)
    assert all(t.dtype in TRITON_DTYPES for spec in submodel_specs(tiny_checkpoint).values() for t in spec.inputs)


def test_inconsistent_specs_are_rejected_with_the_model_named() -> None:
    ids = TensorSpec("input_ids", "int64", ("batch", 77))
    with pytest.raises(SpecError, match=r"'m'.*profile covers"):
        ModelSpec("m", (ids,), (), {})
    with pytest.raises(SpecError, match=r"'m'.*does not fit"):
        ModelSpec("m", (ids,), (), {"input_ids": ((1, 76), (1, 77), (2, 77))})
    with pytest.raises(SpecError, match=r"min ≤ opt ≤ max"):
        ModelSpec("m", (ids,), (), {"input_ids": ((2, 77), (1, 77), (2, 77))})
    with pytest.raises(SpecError, match=r"dtype 'float64'"):
        TensorSpec("x", "float64", (1,))
    with pytest.raises(SpecError, match=r"needs sizes"):
        ids.concrete()
