"""nirvana.contract.specs: the tensor contracts every export, engine and Triton config is derived from."""

from __future__ import annotations

import pytest

from nirvana.checkpoint import Checkpoint
from nirvana.contract.specs import (
    EMBEDDER_DIM,
    MODEL_NAMES,
    TRITON_DTYPES,
    ModelSpec,
    SpecError,
    TensorSpec,
    needs_reshape,
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
    # The UNet batches across requests (rows); the others keep explicit batch axes, see the specs docstring.
    assert {name: spec.max_batch_size for name, spec in specs.items()} == {
        "text_encoder": 0,
        "prompt_embedder": 0,
        "unet": 16,
        "vae_decoder": 0,
    }


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_profiles_cover_batch_one_to_max_batch(tiny_checkpoint: Checkpoint, max_batch: int) -> None:
    specs = submodel_specs(tiny_checkpoint, max_batch=max_batch, embedder_seq_len=64)
    for spec in specs.values():
        assert set(spec.profile) == set(spec.input_names)
        if spec.name == "unet":
            continue
        for name, (lo, opt, hi) in spec.profile.items():
            assert (lo[0], hi[0]) == (1, max_batch), (spec.name, name)
            assert lo[0] <= opt[0] <= hi[0]
    assert specs["prompt_embedder"].profile["input_ids"][0][1] == 1
    assert specs["prompt_embedder"].profile["input_ids"][2][1] == 64


@pytest.mark.parametrize(
    ("unet_max_batch", "profile"), [(16, (2, 8, 16)), (32, (2, 8, 32)), (4, (2, 4, 4)), (2, (2, 2, 2))]
)
def test_unet_profile_is_one_pair_to_max_rows_tuned_for_four_requests(
    tiny_checkpoint: Checkpoint, unet_max_batch: int, profile: tuple[int, int, int]
) -> None:
    unet = submodel_specs(tiny_checkpoint, unet_max_batch=unet_max_batch)["unet"]
    assert unet.max_batch_size == unet_max_batch
    for name, shapes in unet.profile.items():
        assert tuple(shape[0] for shape in shapes) == profile, name
    assert unet.profile["sample"][1] == (profile[1], 4, 16, 16)
    with pytest.raises(SpecError, match=r"unet max_batch must be ≥ 2"):
        submodel_specs(tiny_checkpoint, unet_max_batch=1)


def test_latent_size_override_changes_unet_and_vae_shapes_only(tiny_checkpoint: Checkpoint) -> None:
    specs = submodel_specs(tiny_checkpoint, latent_size=(24, 32))
    assert specs["unet"].input("sample").shape == ("batch", 4, 24, 32)
    assert specs["vae_decoder"].outputs[0].shape == ("batch", 3, 96, 128)
    assert specs["text_encoder"] == submodel_specs(tiny_checkpoint)["text_encoder"]


def test_triton_dims_and_dynamic_axes_follow_the_shape(tiny_checkpoint: Checkpoint) -> None:
    unet = submodel_specs(tiny_checkpoint)["unet"]
    assert triton_dims(unet.input("sample")) == [-1, 4, 16, 16]
    assert triton_dims(unet.input("timestep")) == [-1]
    # Under max_batch_size > 0 Triton prepends the batch axis; a [batch] tensor becomes [1], reshaped to [].
    assert triton_dims(unet.input("sample"), batched=True) == [4, 16, 16]
    assert triton_dims(unet.input("timestep"), batched=True) == [1]
    assert needs_reshape(unet.input("timestep"), True) and not needs_reshape(unet.input("sample"), True)
    assert not needs_reshape(unet.input("timestep"), False)
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
    fixed = TensorSpec("input_ids", "int64", (2, 77))
    with pytest.raises(SpecError, match=r"'m'.*leading 'batch' axis"):
        ModelSpec("m", (fixed,), (), {"input_ids": ((2, 77),) * 3}, max_batch_size=4)
    with pytest.raises(SpecError, match=r"'m'.*profile max batch 8 exceeds max_batch_size 4"):
        ModelSpec("m", (ids,), (), {"input_ids": ((1, 77), (2, 77), (8, 77))}, max_batch_size=4)
