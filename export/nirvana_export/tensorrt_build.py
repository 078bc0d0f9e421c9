"""ONNX → TensorRT plan with one optimization profile taken from the sub-model's spec (GPU machines only).

TensorRT is imported inside the functions: this module imports (and its errors are testable) on CPU machines.

Precision: TensorRT 10 builds "weakly typed" networks and picks fp16 kernels when ``BuilderFlag.FP16`` is set.
TensorRT 11 removed that flag: every network is strongly typed and precision comes from the ONNX graph itself, so
an fp16 engine needs an fp16 graph (export the module in fp16 — the graphs of ``onnx_export`` keep float32 I/O —
or convert the ONNX with ModelOpt AutoCast). :func:`build_engine` handles both and refuses, with that advice, to
build an fp32 engine silently when fp16 was asked for.

Every engine is checked before it is accepted: it runs random inputs at the profile's opt shape and must agree with
onnxruntime on the same ONNX file within :data:`ENGINE_TOLERANCES` for its precision. The VAE's precision is set
apart (:func:`engine_fp16`): SDXL's VAE overflows in fp16, so it can be built fp32 while the rest is fp16.
A timing cache (TensorRT's measured kernel timings) is kept beside the engines and reused by later builds.

A plan only runs on the TensorRT version and GPU architecture it was built with: build it with the TensorRT of
the Triton image that serves it (e.g. inside ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nirvana.specs import ModelSpec

__all__ = [
    "ENGINE_TOLERANCES",
    "TIMING_CACHE_NAME",
    "EngineBuildError",
    "EngineCheckError",
    "TensorRTUnavailableError",
    "build_engine",
    "check_engine",
    "compare_outputs",
    "engine_fp16",
    "import_tensorrt",
    "opt_inputs",
    "profile_shapes",
    "run_engine",
]

log = logging.getLogger(__name__)

# Beside the engines, at the repository root (not in a version folder, which a rebuild deletes).
TIMING_CACHE_NAME = "tensorrt_timing.cache"
# Engine vs onnxruntime (fp32, CPU) on the same ONNX file, random inputs at the opt shape: an output passes when
# max|engine − onnxruntime| ≤ atol + rtol·max|onnxruntime| (per tensor: fp16 rounding makes a few elements of
# near-zero outputs relatively far off, so an elementwise rtol would flag correct engines). fp32 engines are built
# without TF32, so only kernel summation order separates them (expected ≲ 1e-5 relative); fp16 keeps ~3 decimal
# digits through dozens of layers. Not yet measured on a GPU (no TensorRT on the machines we could test on):
# first estimates, wide enough for correct engines and far below the O(1) errors of a wrong one.
ENGINE_TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2)}
_OPT_TOKEN_RANGE = 1000  # input_ids of random inputs: below every tokenizer's vocabulary size


class TensorRTUnavailableError(ImportError):
    """The ``tensorrt`` Python package is not installed (it needs an NVIDIA GPU machine)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message carries TensorRT's errors."""


class EngineCheckError(EngineBuildError):
    """A built engine disagrees with onnxruntime on its ONNX file (message: model, output, max error, bound)."""


def engine_fp16(name: str, fp16: bool, vae_fp16: bool = True) -> bool:
    """Whether sub-model ``name`` is built fp16: ``fp16`` for all, except ``vae_decoder``, which also needs
    ``vae_fp16`` (pass False for SDXL, whose VAE overflows in fp16)."""
    return fp16 and (vae_fp16 or name != "vae_decoder")


def profile_shapes(spec: ModelSpec) -> list[tuple[str, tuple, tuple, tuple]]:
    """``(input, min, opt, max)`` for the engine's one optimization profile, in the spec's input order."""
    if spec.profile is None:
        raise EngineBuildError(f"model {spec.name!r} has no shape profile: it is not built as an engine")
    return [(name, *spec.profile[name]) for name in spec.input_names]


def opt_inputs(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs at the profile's opt shape: token ids in [0, 1000), an all-ones attention mask,
    timesteps in [0, 1000), standard normal floats elsewhere."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, _, opt, _ in profile_shapes(spec):
        dtype = np.dtype(spec.input(name).dtype)
        if name == "input_ids":
            value = rng.integers(0, _OPT_TOKEN_RANGE, opt)
        elif name == "attention_mask":
            value = np.ones(opt)
        elif name == "timestep":
            value = rng.uniform(0, 1000, opt)
        else:
            value = rng.standard_normal(opt)
        inputs[name] = value.astype(dtype)
    return inputs


def compare_outputs(model: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], precision: str) -> float:
    """Max abs error over ``want``'s outputs; raises :class:`EngineCheckError` naming the model, output, error
    and bound when an output is missing, misshapen, not finite, or off by more than :data:`ENGINE_TOLERANCES`."""
    if precision not in ENGINE_TOLERANCES:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(ENGINE_TOLERANCES)}")
    atol, rtol = ENGINE_TOLERANCES[precision]
    worst = 0.0
    for name, reference in want.items():
        if name not in got or np.shape(got[name]) != np.shape(reference):
            shape = np.shape(got[name]) if name in got else "missing"
            raise EngineCheckError(f"{model}: engine output {name!r} is {shape}, onnxruntime gives {reference.shape}")
        error = float(np.max(np.abs(got[name].astype(np.float64) - reference), initial=0.0))
        bound = atol + rtol * float(np.max(np.abs(reference), initial=0.0))
        if not np.isfinite(error) or error > bound:
            raise EngineCheckError(
                f"{model}: {precision} engine output {name!r} differs from onnxruntime by max abs error {error:.3g} "
                f"> {bound:.3g} (atol {atol:g} + rtol {rtol:g}·max|ref|); the engine is rejected"
                + (" — an fp16 overflow? build this model in fp32" if not np.isfinite(error) else "")
            )
        worst = max(worst, error)
    return worst


Runner = Callable[[Path, dict[str, np.ndarray]], dict[str, np.ndarray]]


def check_engine(
    plan_path: str | Path, onnx_path: str | Path, spec: ModelSpec, fp16: bool, runner: Runner | None = None
) -> float:
    """Run the engine and onnxruntime on :func:`opt_inputs`; returns the max abs error or raises
    :class:`EngineCheckError`. ``runner(plan, inputs)`` defaults to :func:`run_engine` (TensorRT + CUDA)."""
    from nirvana.runtime.onnx_runtime import OnnxModel

    inputs = opt_inputs(spec)
    want = OnnxModel(onnx_path, num_threads=os.cpu_count() or 1).run(inputs)
    got = (runner or run_engine)(Path(plan_path), inputs)
    return compare_outputs(spec.name, got, want, "fp16" if fp16 else "fp32")


def run_engine(plan_path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once on ``inputs`` (numpy, host) with torch CUDA buffers; outputs as numpy."""
    import torch

    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise EngineBuildError(f"TensorRT cannot load the engine it just built: {plan_path}")
    context = engine.create_execution_context()
    buffers = {}
    for name, value in inputs.items():
        buffers[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
        context.set_input_shape(name, tuple(value.shape))
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    for name in outputs:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, buffer in buffers.items():
        context.set_tensor_address(name, buffer.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError(f"TensorRT failed to run {plan_path} on inputs {[v.shape for v in inputs.values()]}")
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in outputs}


def _timing_cache(config: Any, path: Path | None) -> Any:
    """Attach a timing cache to ``config``: ``path``'s contents when readable, else an empty one."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:  # a corrupt file, or one from another TensorRT: start afresh
        log.warning("ignoring unreadable TensorRT timing cache %s", path)
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was made on another GPU or TensorRT version: starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(bytes(config.get_timing_cache().serialize()))
    partial.replace(path)  # a build killed mid-write must not leave a truncated cache behind


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            "TensorRT is not installed: building engines needs an NVIDIA GPU machine with the `tensorrt` Python "
            "package matching the Triton image's TensorRT (pip install tensorrt, or run inside the "
            f"nvcr.io/nvidia/tritonserver image); on CPU serve the ONNX files with onnxruntime instead ({exc})"
        ) from exc
    return tensorrt


def _onnx_has_fp16(onnx_path: Path) -> bool:
    """Whether the graph computes in fp16 anywhere: fp16 initializers or a Cast to fp16."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    if any(init.data_type == fp16 for init in model.graph.initializer):
        return True
    return any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute)
        for node in model.graph.node
    )


def _parse(trt: Any, builder: Any, onnx_path: Path, logger: Any) -> tuple[Any, Any]:
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (model.onnx.data) relative to the ONNX file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    return network, parser


def _check_io(network: Any, spec: ModelSpec, onnx_path: Path) -> None:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise EngineBuildError(
            f"{onnx_path}: network I/O {inputs} → {outputs} does not match spec {spec.name!r} "
            f"{spec.input_names} → {spec.output_names}"
        )


def _precision(trt: Any, config: Any, fp16: bool, onnx_path: Path) -> None:
    if not fp16:
        if hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 would silently mean 10-bit mantissas in matmuls
            config.clear_flag(trt.BuilderFlag.TF32)
        return
    if hasattr(trt.BuilderFlag, "FP16"):  # TensorRT ≤ 10: weak typing
        config.set_flag(trt.BuilderFlag.FP16)
    elif not _onnx_has_fp16(onnx_path):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} builds strongly typed networks and {onnx_path} computes in fp32 only: "
            "export the module in fp16 (e.g. unet.half() before export_graph) or convert it with ModelOpt "
            "AutoCast, or pass fp16=False for an fp32 engine"
        )


def build_engine(
    onnx_path: str | Path,
    spec: ModelSpec,
    plan_path: str | Path,
    fp16: bool = True,
    workspace_gb: float = 8,
    *,
    timing_cache: str | Path | None = None,
    verify: bool = True,
) -> Path:
    """Build a serialized TensorRT engine (``model.plan``) for ``spec`` from ``onnx_path``; returns ``plan_path``.

    One optimization profile: for each input ``profile.set_shape(name, min, opt, max)`` from ``spec.profile``
    (:func:`profile_shapes`; the UNet: 2/8/16 rows). ``workspace_gb`` caps TensorRT's scratch memory for tactics.
    ``timing_cache``: a file read before the build when present and written after it (repository builds keep
    :data:`TIMING_CACHE_NAME` at the repository root). ``verify``: run :func:`check_engine` and delete the plan
    when it fails. Raises :class:`TensorRTUnavailableError` without TensorRT, :class:`EngineBuildError` when
    parsing or building fails and :class:`EngineCheckError` when the engine's numbers are off.
    """
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX file not found: {onnx_path}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path, logger)  # the parser must outlive the build
    _check_io(network, spec, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _precision(trt, config, fp16, onnx_path)
    _timing_cache(config, cache_path)
    profile = builder.create_optimization_profile()
    for name, shape_min, shape_opt, shape_max in profile_shapes(spec):
        profile.set_shape(name, shape_min, shape_opt, shape_max)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {spec.name!r} from {onnx_path} (see the log above)")
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if verify:
        try:
            error = check_engine(plan_path, onnx_path, spec, fp16)
        except EngineCheckError:
            plan_path.unlink(missing_ok=True)  # a rejected engine must not be served
            raise
        log.info("%s engine agrees with onnxruntime: max abs error %.3g", spec.name, error)
    return plan_path
