"""nirvana_export.tensorrt_build: profiles, tolerances, output comparison, thread bounds, and build_engine with
TensorRT faked at polygraphy's TensorRT backend (tensorrt_fakes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nirvana.checkpoint import Checkpoint
from nirvana.contract.specs import ModelSpec
from nirvana_export.repository import sd15_specs
from nirvana_export.tensorrt_build import (
    CHECK_THREADS_ENV,
    ENGINE_TOLERANCES,
    MAX_CHECK_THREADS,
    TOLERANCE_ENV,
    EngineBuildError,
    EngineCheckError,
    check_thread_count,
    check_tolerance,
    compare_outputs,
    cpu_quota,
    engine_fp16,
    engine_profiles,
    make_check_session,
    opt_inputs,
    profile_shapes,
)


def test_module_imports_without_tensorrt_and_fp16_is_never_held_to_a_tighter_bound() -> None:
    assert all(a <= b for a, b in zip(ENGINE_TOLERANCES["fp32"], ENGINE_TOLERANCES["fp16"], strict=True))
    assert ENGINE_TOLERANCES["tf32"] == ENGINE_TOLERANCES["fp16"]


def test_sd15_profiles_unet_rows_two_eight_sixteen_and_the_rest_unchanged() -> None:
    specs = sd15_specs()
    assert profile_shapes(specs["unet"]) == [
        ("sample", (2, 4, 64, 64), (8, 4, 64, 64), (16, 4, 64, 64)),
        ("timestep", (2,), (8,), (16,)),
        ("encoder_hidden_states", (2, 77, 768), (8, 77, 768), (16, 77, 768)),
    ]
    assert profile_shapes(specs["vae_decoder"]) == [("latent", (1, 4, 64, 64), (1, 4, 64, 64), (2, 4, 64, 64))]
    assert [name for name, *_ in profile_shapes(specs["prompt_embedder"])] == ["input_ids", "attention_mask"]


def test_the_unet_engine_has_a_profile_for_a_lone_request_and_one_for_a_full_batch() -> None:
    specs = sd15_specs()
    lone, full = engine_profiles(specs["unet"])
    assert lone[0] == ("sample", (2, 4, 64, 64), (2, 4, 64, 64), (16, 4, 64, 64))  # every row count, tuned at 2
    assert full[0] == ("sample", (2, 4, 64, 64), (16, 4, 64, 64), (16, 4, 64, 64))  # tuned at 16
    assert [opt for _, _, opt, _ in full] == [(16, 4, 64, 64), (16,), (16, 77, 768)]
    assert engine_profiles(specs["vae_decoder"]) == [profile_shapes(specs["vae_decoder"])]  # unbatched: one


def test_opt_inputs_fit_the_spec_at_the_opt_shape() -> None:
    specs = sd15_specs()
    unet = opt_inputs(specs["unet"])
    assert {k: (v.dtype.name, v.shape) for k, v in unet.items()} == {
        "sample": ("float32", (2, 4, 64, 64)),
        "timestep": ("float32", (2,)),
        "encoder_hidden_states": ("float32", (2, 77, 768)),
    }
    assert opt_inputs(specs["unet"], profile=1)["sample"].shape == (16, 4, 64, 64)
    assert unet["timestep"].min() >= 0 and unet["timestep"].max() < 1000
    embedder = opt_inputs(specs["prompt_embedder"])
    assert embedder["input_ids"].dtype == np.int64 and embedder["input_ids"].max() < 256  # any byte-level vocab
    assert embedder["attention_mask"].shape == (1, 32) and embedder["attention_mask"].min() == 1


def test_vae_precision_is_set_apart_for_sdxl() -> None:
    assert [engine_fp16(n, True) for n in ("text_encoder", "unet", "vae_decoder")] == [True, True, True]
    assert [engine_fp16(n, True, vae_fp16=False) for n in ("unet", "vae_decoder")] == [True, False]
    assert not engine_fp16("unet", False) and not engine_fp16("vae_decoder", False, vae_fp16=True)


def test_compare_outputs_uses_polygraphys_elementwise_rule_and_says_by_how_much() -> None:
    rng = np.random.default_rng(0)
    want = {"noise_pred": rng.standard_normal((8, 4, 8, 8)).astype(np.float32) * 3}
    atol, _ = ENGINE_TOLERANCES["fp16"]
    close = {"noise_pred": want["noise_pred"] + np.float32(0.9 * atol)}  # within atol everywhere
    assert compare_outputs("unet", close, want, "fp16") == pytest.approx(0.9 * atol, rel=1e-3)
    fails = r"^unet: fp32 engine differs .* output 'noise_pred': max abs diff"
    with pytest.raises(EngineCheckError, match=fails) as err:
        compare_outputs("unet", close, want, "fp32")
    assert "NIRVANA_ENGINE_TOLERANCE=ATOL,RTOL" in str(err.value) and "NIRVANA_ENGINE_CHECK=0" in str(err.value)
    max_abs, _, needed = err.value.differences["noise_pred"]
    assert max_abs == pytest.approx(0.9 * atol, rel=1e-3) and 0 < needed <= max_abs
    assert compare_outputs("unet", close, want, "fp32", tolerance=(needed, 1e-3)) <= needed  # the figure suffices
    overflow = {"noise_pred": np.full_like(want["noise_pred"], np.inf)}
    with pytest.raises(EngineCheckError, match=r"fp16 overflow\? build this model in fp32"):
        compare_outputs("vae_decoder", overflow, want, "fp16")
    with pytest.raises(EngineCheckError, match=r"'noise_pred' is \(2, 4, 8, 8\), onnxruntime gives \(8, 4, 8, 8\)"):
        compare_outputs("unet", {"noise_pred": want["noise_pred"][:2]}, want, "fp16")
    with pytest.raises(EngineCheckError, match=r"is missing"):
        compare_outputs("unet", {}, want, "fp16")
    with pytest.raises(ValueError, match=r"precision='int8'"):
        compare_outputs("unet", want, want, "int8")
    assert compare_outputs("unet", want, want, "fp32") == 0.0


def test_tolerance_and_threads_come_from_the_caller_the_environment_or_the_container(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TOLERANCE_ENV, raising=False)
    monkeypatch.delenv(CHECK_THREADS_ENV, raising=False)
    assert check_tolerance("fp16") == ENGINE_TOLERANCES["fp16"]
    assert check_tolerance("fp16", (0.1, 0.2)) == (0.1, 0.2)
    monkeypatch.setenv(TOLERANCE_ENV, "0.5, 0.25")
    assert check_tolerance("fp32") == (0.5, 0.25)
    monkeypatch.setenv(TOLERANCE_ENV, "loose")
    with pytest.raises(EngineBuildError, match=r"NIRVANA_ENGINE_TOLERANCE='loose': expected ATOL,RTOL"):
        check_tolerance("fp16")
    # Threads: bounded by the container's quota and MAX_CHECK_THREADS, never the host's os.cpu_count() alone.
    assert 1 <= cpu_quota() <= (os.cpu_count() or 1)
    assert check_thread_count() == min(MAX_CHECK_THREADS, cpu_quota())
    monkeypatch.setenv(CHECK_THREADS_ENV, "3")
    assert check_thread_count() == 3 and check_thread_count(1) == 1
    with pytest.raises(EngineBuildError, match=r"must be ≥ 1"):
        check_thread_count(0)


def test_the_check_session_uses_the_bounded_thread_count(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = make_check_session(path, 2)
    assert session.get_session_options().intra_op_num_threads == 2
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_a_spec_without_profile_is_no_engine() -> None:
    from nirvana.contract.specs import nirvana_spec

    with pytest.raises(EngineBuildError, match=r"'nirvana' has no shape profile"):
        profile_shapes(nirvana_spec((64, 64)))


# --- build_engine with TensorRT faked at polygraphy's TensorRT backend -------------------------------------------


@pytest.fixture(scope="module")
def unet_onnx(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nirvana_export.onnx_export import export_all

    return export_all(tiny_checkpoint_dir, tmp_path_factory.mktemp("onnx"), names=["unet"])["unet"]


@pytest.fixture
def unet_spec(tiny_checkpoint: Checkpoint) -> ModelSpec:
    from nirvana.contract.specs import submodel_specs

    return submodel_specs(tiny_checkpoint)["unet"]


def test_build_engine_hands_the_spec_profile_precision_and_timing_cache_to_polygraphy(
    unet_onnx: Path, unet_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_fakes

    from nirvana_export.tensorrt_build import build_engine

    backend = tensorrt_fakes.install(monkeypatch)
    cache, plan = tmp_path / "tensorrt_timing.cache", tmp_path / "unet" / "model.plan"
    assert build_engine(unet_onnx, unet_spec, plan, workspace_gb=1, timing_cache=cache) == plan
    (config,) = [kw for label, _, kw in backend.calls if label == "CreateConfig"]
    lone, full = config["profiles"]
    for profile, shapes in zip((lone, full), engine_profiles(unet_spec), strict=True):
        assert {n: (tuple(s.min), tuple(s.opt), tuple(s.max)) for n, s in profile.items()} == {
            name: (low, opt, high) for name, low, opt, high in shapes
        }
    assert [s.opt[0] for s in (lone["sample"], full["sample"])] == [2, unet_spec.max_batch_size]
    assert [args for label, args, _ in backend.calls if label == "TrtRunner.profile"] == [(0,), (1,)]  # both checked
    assert config["fp16"] is True and config["tf32"] is True
    assert config["memory_pool_limits"] == {"WORKSPACE": 1 << 30}
    assert config["load_timing_cache"] is None and cache.read_bytes() == b"timings;"
    build_engine(unet_onnx, unet_spec, plan, fp16=False, timing_cache=cache)  # fp32 (TF32) engine, cache reused
    config = [kw for label, _, kw in backend.calls if label == "CreateConfig"][-1]
    assert config["fp16"] is False and config["load_timing_cache"] == str(cache)
    assert cache.read_bytes() == b"timings;timings;"


def test_tensorrt_11_refuses_an_fp16_engine_from_an_fp32_graph(
    unet_onnx: Path, unet_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_fakes

    from nirvana_export.tensorrt_build import build_engine

    backend = tensorrt_fakes.install(monkeypatch, version="11.0.0")
    with pytest.raises(EngineBuildError, match=r"strongly typed.*fp32 only"):
        build_engine(unet_onnx, unet_spec, tmp_path / "model.plan", fp16=True)
    assert build_engine(unet_onnx, unet_spec, tmp_path / "model.plan", fp16=False).is_file()
    assert [kw["fp16"] for label, _, kw in backend.calls if label == "CreateConfig"] == [False]


def test_a_failed_check_saves_nothing_and_the_override_knobs_work(
    unet_onnx: Path, unet_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_fakes

    from nirvana_export.tensorrt_build import CHECK_ENV, build_engine

    backend = tensorrt_fakes.install(monkeypatch, noise=0.2)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"an older plan")
    with pytest.raises(EngineCheckError, match=r"^unet: fp16 engine differs .*'noise_pred': max abs diff") as err:
        build_engine(unet_onnx, unet_spec, plan)
    assert not plan.exists()
    needed = err.value.differences["noise_pred"][2]
    assert build_engine(unet_onnx, unet_spec, plan, tolerance=(needed * 1.01, 0.02)).is_file()
    monkeypatch.setenv(TOLERANCE_ENV, f"{needed * 1.01},0.02")
    assert build_engine(unet_onnx, unet_spec, plan).is_file()
    monkeypatch.delenv(TOLERANCE_ENV)
    monkeypatch.setenv(CHECK_ENV, "0")
    runs = sum(label == "TrtRunner" for label, *_ in backend.calls)
    assert build_engine(unet_onnx, unet_spec, plan).is_file()
    assert sum(label == "TrtRunner" for label, *_ in backend.calls) == runs  # not checked


def test_every_build_failure_is_an_engine_build_error(
    unet_onnx: Path, unet_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_fakes

    from nirvana_export.tensorrt_build import build_engine, run_engine

    tensorrt_fakes.install(monkeypatch, fail_build="Invalid Engine. Please ensure the engine was built correctly")
    with pytest.raises(EngineBuildError, match=r"TensorRT failed to build 'unet' .*PolygraphyException.*Invalid"):
        build_engine(unet_onnx, unet_spec, tmp_path / "model.plan")
    with pytest.raises(EngineBuildError, match=r"ONNX file not found"):
        build_engine(tmp_path / "missing.onnx", unet_spec, tmp_path / "model.plan")
    with pytest.raises(EngineBuildError, match=r"TensorRT failed to run"):
        run_engine(tmp_path / "missing.plan", {})
    assert not (tmp_path / "model.plan").exists()


def test_run_engine_runs_a_saved_plan_through_polygraphy(
    unet_onnx: Path, unet_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorrt_fakes

    from nirvana_export.tensorrt_build import build_engine, run_engine

    tensorrt_fakes.install(monkeypatch)
    plan = build_engine(unet_onnx, unet_spec, tmp_path / "model.plan", fp16=False, verify=False)
    inputs = opt_inputs(unet_spec)
    out = run_engine(plan, inputs)
    assert out["noise_pred"].shape == inputs["sample"].shape
    full = opt_inputs(unet_spec, profile=1)
    too_big = {k: np.concatenate([v, v, v]) for k, v in full.items()}  # 48 rows > the profiles' 16
    with pytest.raises(EngineBuildError, match=r"outside the profile"):
        run_engine(plan, too_big)
