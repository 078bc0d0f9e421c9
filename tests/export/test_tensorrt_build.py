"""nirvana_export.tensorrt_build, the parts that run without TensorRT: profiles, tolerances, output comparison."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana_export.repository import sd15_specs
from nirvana_export.tensorrt_build import (
    ENGINE_TOLERANCES,
    EngineBuildError,
    EngineCheckError,
    compare_outputs,
    engine_fp16,
    opt_inputs,
    profile_shapes,
)


def test_module_imports_without_tensorrt_and_fp16_is_never_held_to_a_tighter_bound() -> None:
    assert all(a <= b for a, b in zip(ENGINE_TOLERANCES["fp32"], ENGINE_TOLERANCES["fp16"], strict=True))


def test_sd15_profiles_unet_rows_two_eight_sixteen_and_the_rest_unchanged() -> None:
    specs = sd15_specs()
    assert profile_shapes(specs["unet"]) == [
        ("sample", (2, 4, 64, 64), (8, 4, 64, 64), (16, 4, 64, 64)),
        ("timestep", (2,), (8,), (16,)),
        ("encoder_hidden_states", (2, 77, 768), (8, 77, 768), (16, 77, 768)),
    ]
    assert profile_shapes(specs["vae_decoder"]) == [("latent", (1, 4, 64, 64), (1, 4, 64, 64), (2, 4, 64, 64))]
    assert [name for name, *_ in profile_shapes(specs["prompt_embedder"])] == ["input_ids", "attention_mask"]


def test_opt_inputs_fit_the_spec_at_the_opt_shape() -> None:
    specs = sd15_specs()
    unet = opt_inputs(specs["unet"])
    assert {k: (v.dtype.name, v.shape) for k, v in unet.items()} == {
        "sample": ("float32", (8, 4, 64, 64)),
        "timestep": ("float32", (8,)),
        "encoder_hidden_states": ("float32", (8, 77, 768)),
    }
    assert unet["timestep"].min() >= 0 and unet["timestep"].max() < 1000
    embedder = opt_inputs(specs["prompt_embedder"])
    assert embedder["input_ids"].dtype == np.int64 and embedder["input_ids"].max() < 1000
    assert embedder["attention_mask"].shape == (1, 32) and embedder["attention_mask"].min() == 1


def test_vae_precision_is_set_apart_for_sdxl() -> None:
    assert [engine_fp16(n, True) for n in ("text_encoder", "unet", "vae_decoder")] == [True, True, True]
    assert [engine_fp16(n, True, vae_fp16=False) for n in ("unet", "vae_decoder")] == [True, False]
    assert not engine_fp16("unet", False) and not engine_fp16("vae_decoder", False, vae_fp16=True)


def test_compare_outputs_scales_the_bound_with_the_reference_and_names_the_failure() -> None:
    rng = np.random.default_rng(0)
    want = {"noise_pred": rng.standard_normal((8, 4, 8, 8)).astype(np.float32) * 3}
    bound16 = 2e-2 + 2e-2 * float(np.abs(want["noise_pred"]).max())
    close = {"noise_pred": want["noise_pred"] + np.float32(0.9 * bound16)}
    assert compare_outputs("unet", close, want, "fp16") == pytest.approx(0.9 * bound16, rel=1e-4)
    with pytest.raises(EngineCheckError, match=r"^unet: fp32 engine output 'noise_pred' .* max abs error 0\.\d+ >"):
        compare_outputs("unet", close, want, "fp32")
    overflow = {"noise_pred": np.full_like(want["noise_pred"], np.inf)}
    with pytest.raises(EngineCheckError, match=r"max abs error inf .* fp16 overflow\? build this model in fp32"):
        compare_outputs("vae_decoder", overflow, want, "fp16")
    with pytest.raises(EngineCheckError, match=r"'noise_pred' is \(2, 4, 8, 8\), onnxruntime gives \(8, 4, 8, 8\)"):
        compare_outputs("unet", {"noise_pred": want["noise_pred"][:2]}, want, "fp16")
    with pytest.raises(EngineCheckError, match=r"is missing"):
        compare_outputs("unet", {}, want, "fp16")
    with pytest.raises(ValueError, match=r"precision='int8'"):
        compare_outputs("unet", want, want, "int8")
    assert compare_outputs("unet", want, want, "fp32") == 0.0


def test_a_spec_without_profile_is_no_engine() -> None:
    from nirvana.specs import nirvana_spec

    with pytest.raises(EngineBuildError, match=r"'nirvana' has no shape profile"):
        profile_shapes(nirvana_spec((64, 64)))
