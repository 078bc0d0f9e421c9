"""ONNX → TensorRT plan with polygraphy, optimization profiles taken from the sub-model's spec (GPU machines).

Nothing here imports torch: the build (``polygraphy.backend.trt``: ``network_from_onnx_path``, ``CreateConfig``,
``Profile``, ``engine_from_network``, ``save_engine``) and the check (``TrtRunner`` vs ``OnnxrtRunner`` through
``polygraphy.comparator.Comparator`` and ``CompareFunc.simple``) use TensorRT, polygraphy's own CUDA bindings and
onnxruntime, so the image's CPU torch wheel (it only traces the ONNX export) is enough. TensorRT and polygraphy's
TensorRT backend are imported inside the functions: this module imports, and its errors are testable, on CPU.

Precision: TensorRT 10 builds "weakly typed" networks and picks fp16 kernels when ``BuilderFlag.FP16`` is set.
TensorRT 11 removed that flag: every network is strongly typed and precision comes from the ONNX graph itself, so
an fp16 engine needs an fp16 graph (export the module in fp16 — the graphs of ``onnx_export`` keep float32 I/O —
or convert the ONNX with ModelOpt AutoCast). :func:`build_engine` handles both and refuses, with that advice, to
build an fp32 engine silently when fp16 was asked for. TF32 is on by default (``tf32=True``): an fp32 engine (e.g.
SDXL's VAE, :func:`engine_fp16`) then runs its matmuls and convolutions on tensor cores.

Every engine is checked before it is written: it runs seeded random inputs at the profile's opt shape and must agree
with onnxruntime (fp32, CPU, a bounded number of threads: :func:`check_thread_count`) on the same ONNX file within
:data:`ENGINE_TOLERANCES` for its precision. A rejected engine is never saved; the error
(:class:`EngineCheckError`) says by how much each output is off and how to override (:data:`TOLERANCE_ENV`,
:data:`CHECK_ENV`, or ``build_engine(tolerance=..., verify=False)``). Every failure of the build or the check raises
an :class:`EngineBuildError` (or :class:`TensorRTUnavailableError` when TensorRT is missing), never a raw TensorRT,
polygraphy or CUDA error. A timing cache (TensorRT's measured kernel timings) is kept beside the engines and reused
by later builds (polygraphy loads it, merges the new timings into it and saves it under a file lock).

A plan only runs on the TensorRT version and GPU architecture it was built with: build it with the TensorRT of
the Triton image that serves it (e.g. inside ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nirvana.contract.specs import ModelSpec

__all__ = [
    "CHECK_ENV",
    "CHECK_THREADS_ENV",
    "ENGINE_TOLERANCES",
    "TIMING_CACHE_NAME",
    "TOLERANCE_ENV",
    "EngineBuildError",
    "EngineCheckError",
    "TensorRTUnavailableError",
    "build_engine",
    "check_engine",
    "check_thread_count",
    "check_tolerance",
    "compare_outputs",
    "cpu_quota",
    "engine_fp16",
    "engine_profiles",
    "import_tensorrt",
    "make_check_session",
    "opt_inputs",
    "profile_shapes",
    "run_engine",
]

log = logging.getLogger(__name__)

# Beside the engines, at the repository root (not in a version folder, which a rebuild deletes).
TIMING_CACHE_NAME = "tensorrt_timing.cache"
# Engine vs onnxruntime (fp32, CPU) on the same ONNX file, seeded random inputs at the opt shape, polygraphy's
# elementwise rule (CompareFunc.simple): an element fails only when |d| > atol AND |d| > rtol·|ref|, so near-zero
# outputs are judged by atol and large ones by rtol.
#
# Measured (`python -m nirvana_dev.engine_tolerance`, the tiny random-weight model of `nirvana make-tiny-model`,
# onnxruntime 1.32 CPU, fp32 graph vs the same graph converted to fp16 with fp32 I/O, on the check's own inputs):
#   sub-model        output             max abs   max rel    max|ref|  atol needed at rtol 0.02
#   text_encoder     last_hidden_state  2.72e-3   4.44       3.13      2.02e-3
#   prompt_embedder  embedding          2.27e-4   1.6e25(*)  0.147     2.27e-4   (real MiniLM weights)
#   unet             noise_pred         6.13e-3   2.3        1.53      6.13e-3
#   vae_decoder      image              2.99e-3   31.9       2.43      1.94e-3
#   (*) relative differences explode where the reference is ~0: that is why the rule is atol OR rtol.
# fp16: rtol 2e-2 and atol 5e-2 = 8× the worst atol needed (the UNet's 6.1e-3), 17–220× the others'; a wrong
# engine (a mis-parsed layer, a broken profile) is off by O(1) on these O(1) outputs.
# tf32 (fp32 engines, the default): TF32 rounds only matmul/convolution inputs to fp16's 10-bit mantissa and keeps
# fp32's range and accumulation, so its error is bounded by fp16's: the same tolerance. fp32 without TF32: only
# kernel summation order differs (≲ 1e-5 relative expected), 1e-3/1e-3 is two decades above that.
# Not measured on a GPU: TensorRT-vs-onnxruntime differences of real engines are still to be measured (a deep SD 1.5
# UNet accumulates more rounding than the tiny model; widen with NIRVANA_ENGINE_TOLERANCE if a correct engine fails).
ENGINE_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 1e-3),
    "tf32": (5e-2, 2e-2),
    "fp16": (5e-2, 2e-2),
}
TOLERANCE_ENV = "NIRVANA_ENGINE_TOLERANCE"  # "ATOL,RTOL": replaces ENGINE_TOLERANCES for every engine
CHECK_ENV = "NIRVANA_ENGINE_CHECK"  # "0": build without checking (not recommended)
CHECK_THREADS_ENV = "NIRVANA_ENGINE_CHECK_THREADS"  # onnxruntime threads of the check (default: min(4, CPU quota))
MAX_CHECK_THREADS = 4
# input_ids of random inputs: below every tokenizer's vocabulary size (byte-level BPE vocabularies start with the
# 256 byte tokens; the tiny test tokenizer has 914 entries, so 1000 made the check index past its embedding table).
_OPT_TOKEN_RANGE = 256


class TensorRTUnavailableError(ImportError):
    """The ``tensorrt`` Python package (or polygraphy) is not installed (engines need an NVIDIA GPU machine)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file, build or run the engine; the message carries the cause."""


class EngineCheckError(EngineBuildError):
    """A built engine disagrees with onnxruntime on its ONNX file. ``differences``: output → (max abs diff, max rel
    diff, atol needed at the configured rtol) for the outputs that failed."""

    def __init__(self, message: str, differences: Mapping[str, tuple[float, float, float]] | None = None) -> None:
        super().__init__(message)
        self.differences = dict(differences or {})


def engine_fp16(name: str, fp16: bool, vae_fp16: bool = True) -> bool:
    """Whether sub-model ``name`` is built fp16: ``fp16`` for all, except ``vae_decoder``, which also needs
    ``vae_fp16`` (pass False for SDXL, whose VAE overflows in fp16)."""
    return fp16 and (vae_fp16 or name != "vae_decoder")


def profile_shapes(spec: ModelSpec) -> list[tuple[str, tuple, tuple, tuple]]:
    """``(input, min, opt, max)`` of the spec's shape profile, in the spec's input order (:func:`engine_profiles`
    derives the engine's profiles from it)."""
    if spec.profile is None:
        raise EngineBuildError(f"model {spec.name!r} has no shape profile: it is not built as an engine")
    return [(name, *spec.profile[name]) for name in spec.input_names]


def engine_profiles(spec: ModelSpec) -> list[list[tuple[str, tuple, tuple, tuple]]]:
    """The engine's optimization profiles, each as :func:`profile_shapes`. A batched sub-model (the UNet) gets two,
    both spanning every row count of the spec and tuned for its ends: a lone request's guidance pair (profile 0) and
    a full batch (profile 1); Triton's TensorRT backend runs each execution on the listed profile whose opt shape is
    nearest (`instance_group.profile`). Others get the spec's one profile."""
    shapes = profile_shapes(spec)
    if spec.max_batch_size <= 0:
        return [shapes]
    lone = [(name, low, (low[0], *opt[1:]), high) for name, low, opt, high in shapes]
    full = [(name, low, high, high) for name, low, _, high in shapes]
    return [lone, full]


def opt_inputs(spec: ModelSpec, seed: int = 0, profile: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs at the opt shape of the engine's ``profile`` (:func:`engine_profiles`): token ids in
    [0, 256), an all-ones attention mask, timesteps in [0, 1000), standard normal floats elsewhere."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, _, opt, _ in engine_profiles(spec)[profile]:
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


def cpu_quota() -> int:
    """CPUs this process may use: the container's cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``) and the
    affinity mask, not the host's ``os.cpu_count()`` (a pod on a 128-core node with a 4-CPU limit gets 4)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = None
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q / int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def check_thread_count(threads: int | None = None) -> int:
    """onnxruntime threads of the engine check: ``threads``, else :data:`CHECK_THREADS_ENV`, else
    min(:data:`MAX_CHECK_THREADS`, :func:`cpu_quota`)."""
    if threads is None:
        raw = os.environ.get(CHECK_THREADS_ENV, "").strip()
        if raw:
            try:
                threads = int(raw)
            except ValueError:
                raise EngineBuildError(f"{CHECK_THREADS_ENV}={raw!r}: expected a positive integer") from None
        else:
            threads = min(MAX_CHECK_THREADS, cpu_quota())
    if threads < 1:
        raise EngineBuildError(f"engine check threads={threads}: must be ≥ 1 (set {CHECK_THREADS_ENV})")
    return threads


def check_tolerance(precision: str, tolerance: tuple[float, float] | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` of the check: ``tolerance``, else :data:`TOLERANCE_ENV` ("ATOL,RTOL"), else
    :data:`ENGINE_TOLERANCES` for ``precision`` (fp32, tf32 or fp16)."""
    if precision not in ENGINE_TOLERANCES:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(ENGINE_TOLERANCES)}")
    if tolerance is None:
        raw = os.environ.get(TOLERANCE_ENV, "").strip()
        if not raw:
            return ENGINE_TOLERANCES[precision]
        try:
            atol, rtol = (float(v) for v in raw.split(","))
        except ValueError:
            raise EngineBuildError(f"{TOLERANCE_ENV}={raw!r}: expected ATOL,RTOL, e.g. 0.05,0.05") from None
        tolerance = (atol, rtol)
    atol, rtol = (float(v) for v in tolerance)
    if not (atol >= 0 and rtol >= 0):
        raise EngineBuildError(f"engine check tolerance atol={atol}, rtol={rtol}: must be ≥ 0")
    return atol, rtol


def make_check_session(onnx_path: str | Path, threads: int | None = None) -> Any:
    """A CPU onnxruntime session for the check: :func:`check_thread_count` intra-op threads that sleep when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = check_thread_count(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _atol_needed(got: np.ndarray, want: np.ndarray, rtol: float) -> float:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff[diff > rtol * np.abs(want.astype(np.float64))].max(initial=0.0))


def compare_outputs(
    model: str,
    got: Mapping[str, np.ndarray],
    want: Mapping[str, np.ndarray],
    precision: str,
    tolerance: tuple[float, float] | None = None,
) -> float:
    """Max abs difference over ``want``'s outputs; raises :class:`EngineCheckError` when an output is missing,
    misshapen, or fails polygraphy's ``SimpleCompareFunc(atol, rtol)`` (:func:`check_tolerance`), naming each failing
    output's max abs and rel differences, the atol it would need, and how to override."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    atol, rtol = check_tolerance(precision, tolerance)
    for name, reference in want.items():
        if name not in got or np.shape(got[name]) != np.shape(reference):
            shape = np.shape(got[name]) if name in got else "missing"
            raise EngineCheckError(f"{model}: engine output {name!r} is {shape}, onnxruntime gives {reference.shape}")
    got = {name: np.asarray(got[name]) for name in want}
    compare = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)  # = CompareFunc.simple (deprecated)
    results = compare(
        IterationResult(dict(got), runner_name="tensorrt"), IterationResult(dict(want), runner_name="onnxruntime")
    )
    failed = {
        name: (result.max_absdiff, result.max_reldiff, _atol_needed(got[name], want[name], rtol))
        for name, result in results.items()
        if not result
    }
    if failed:
        details = "; ".join(
            f"output {name!r}: max abs diff {a:.3g}, max rel diff {r:.3g} (max|ref| "
            f"{float(np.abs(want[name]).max(initial=0.0)):.3g}); it would pass with atol ≥ {need:.3g} at rtol {rtol:g}"
            for name, (a, r, need) in failed.items()
        )
        overflow = any(not np.isfinite(got[name]).all() for name in failed)
        raise EngineCheckError(
            f"{model}: {precision} engine differs from onnxruntime beyond atol {atol:g} / rtol {rtol:g} (an element "
            f"fails when it exceeds both): {details}. The engine is rejected and not saved"
            + (". Non-finite outputs: an fp16 overflow? build this model in fp32" if overflow else "")
            + f". If the difference is acceptable, widen the check with {TOLERANCE_ENV}=ATOL,RTOL (build_engine's "
            f"tolerance=), or skip it with {CHECK_ENV}=0 (verify=False)",
            failed,
        )
    return max((result.max_absdiff for result in results.values()), default=0.0)


Runner = Callable[[Path, dict[str, np.ndarray]], dict[str, np.ndarray]]


def check_engine(
    plan_path: str | Path | None,
    onnx_path: str | Path,
    spec: ModelSpec,
    fp16: bool,
    runner: Runner | None = None,
    *,
    engine: Any = None,
    tf32: bool = False,
    tolerance: tuple[float, float] | None = None,
    threads: int | None = None,
) -> float:
    """Run the engine (``engine``, a deserialized ``ICudaEngine``, else the plan at ``plan_path``) and onnxruntime
    on :func:`opt_inputs` of each of its profiles through polygraphy's ``Comparator``; returns the max abs
    difference or raises :class:`EngineCheckError` (also for any failure while running either side).
    ``runner(plan, inputs)``, if given, replaces TensorRT (tests; profile 0 only)."""
    precision = "fp16" if fp16 else ("tf32" if tf32 else "fp32")
    check_tolerance(precision, tolerance)  # a bad override fails before minutes of inference
    worst: EngineCheckError | None = None
    largest = 0.0
    for index in range(1 if runner is not None else len(engine_profiles(spec))):
        try:
            largest = max(
                largest,
                _check_profile(plan_path, onnx_path, spec, precision, runner, engine, tolerance, threads, index),
            )
        except EngineCheckError as err:  # the report names the worst profile: its atol makes every profile pass
            if worst is None or _needed(err) > _needed(worst):
                worst = err
    if worst is not None:
        raise worst
    return largest


def _needed(err: EngineCheckError) -> float:
    return max((need for _, _, need in err.differences.values()), default=math.inf)


def _check_profile(
    plan_path: str | Path | None,
    onnx_path: str | Path,
    spec: ModelSpec,
    precision: str,
    runner: Runner | None,
    engine: Any,
    tolerance: tuple[float, float] | None,
    threads: int | None,
    profile: int,
) -> float:
    inputs = opt_inputs(spec, profile=profile)
    try:
        if runner is not None:
            session = make_check_session(onnx_path, threads)
            names = [o.name for o in session.get_outputs()]
            want = dict(zip(names, session.run(names, inputs), strict=True))
            got = runner(Path(plan_path) if plan_path is not None else Path(), inputs)
        else:
            from polygraphy.backend.onnxrt import OnnxrtRunner
            from polygraphy.backend.trt import EngineFromPath, TrtRunner
            from polygraphy.comparator import Comparator

            loader = engine if engine is not None else EngineFromPath(str(plan_path))
            trt_runner = TrtRunner(loader, name="tensorrt", optimization_profile=profile)
            ort_runner = OnnxrtRunner(lambda: make_check_session(onnx_path, threads), name="onnxruntime")
            results = Comparator.run([trt_runner, ort_runner], data_loader=[inputs])
            (_, [got]), (_, [want]) = results
    except EngineBuildError as exc:
        raise EngineCheckError(f"{spec.name}: engine check could not run (profile {profile}): {exc}") from exc
    except Exception as exc:  # TensorRT, CUDA, polygraphy or onnxruntime: one type for the caller to catch
        kind = type(exc).__name__
        raise EngineCheckError(f"{spec.name}: engine check could not run (profile {profile}, {kind}): {exc}") from exc
    return compare_outputs(spec.name, dict(got), dict(want), precision, tolerance)


def run_engine(plan_path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once on ``inputs`` (numpy, host) with polygraphy's ``TrtRunner``; outputs as numpy."""
    import_tensorrt()
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    try:
        with TrtRunner(EngineFromPath(str(plan_path))) as runner:
            outputs = runner.infer(dict(inputs))
            return {name: np.array(value, copy=True) for name, value in outputs.items()}
    except Exception as exc:
        raise EngineBuildError(f"TensorRT failed to run {plan_path} ({type(exc).__name__}): {exc}") from exc


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
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailableError(f"polygraphy is not installed (pip install polygraphy): {exc}") from exc
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


def _check_io(network: Any, spec: ModelSpec, onnx_path: Path) -> None:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise EngineBuildError(
            f"{onnx_path}: network I/O {inputs} → {outputs} does not match spec {spec.name!r} "
            f"{spec.input_names} → {spec.output_names}"
        )


def _verify_default(verify: bool | None) -> bool:
    if verify is not None:
        return verify
    raw = os.environ.get(CHECK_ENV, "1").strip().lower()
    if raw not in {"0", "1", "false", "true", "no", "yes"}:
        raise EngineBuildError(f"{CHECK_ENV}={raw!r}: expected 1 (check engines, the default) or 0")
    return raw in {"1", "true", "yes"}


def build_engine(
    onnx_path: str | Path,
    spec: ModelSpec,
    plan_path: str | Path,
    fp16: bool = True,
    workspace_gb: float = 8,
    *,
    timing_cache: str | Path | None = None,
    verify: bool | None = None,
    tf32: bool = True,
    tolerance: tuple[float, float] | None = None,
    check_threads: int | None = None,
) -> Path:
    """Build a serialized TensorRT engine (``model.plan``) for ``spec`` from ``onnx_path``; returns ``plan_path``.

    Optimization profiles from ``spec.profile`` (:func:`engine_profiles`: for each input ``Profile().add(name, min,
    opt, max)``; the UNet: two, 2 to 16 rows tuned at 2 and at 16). ``workspace_gb`` caps TensorRT's scratch memory
    for tactics.
    ``timing_cache``: a file read before the build when present and merged/written after it (repository builds
    keep :data:`TIMING_CACHE_NAME` at the repository root). ``tf32``: allow TF32 tensor-core math (fp32 engines).
    ``verify`` (default: :data:`CHECK_ENV`, on): run :func:`check_engine` with ``tolerance`` (default
    :func:`check_tolerance`) and ``check_threads`` before the plan is written. Raises
    :class:`TensorRTUnavailableError` without TensorRT, :class:`EngineCheckError` when the engine's numbers are off
    and :class:`EngineBuildError` for every other failure; no plan is left behind by a failed build.
    """
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    verify = _verify_default(verify)
    precision = "fp16" if fp16 else ("tf32" if tf32 else "fp32")
    if verify:
        check_tolerance(precision, tolerance)  # a malformed override fails now, not after the build
        threads = check_thread_count(check_threads)
    plan_path.unlink(missing_ok=True)  # a failed build must not leave an older plan looking current
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX file not found: {onnx_path}")
    weak_typing = hasattr(trt.BuilderFlag, "FP16")  # TensorRT ≤ 10; 11 takes precision from the graph
    if fp16 and not weak_typing and not _onnx_has_fp16(onnx_path):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} builds strongly typed networks and {onnx_path} computes in fp32 only: "
            "export the module in fp16 (e.g. unet.half() before export_graph) or convert it with ModelOpt "
            "AutoCast, or pass fp16=False for an fp32 engine"
        )
    profiles = []
    for shapes in engine_profiles(spec):
        profile = Profile()
        for name, shape_min, shape_opt, shape_max in shapes:
            profile.add(name, min=shape_min, opt=shape_opt, max=shape_max)
        profiles.append(profile)
    load_cache = None
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        load_cache = str(cache_path) if cache_path.is_file() else None
    try:
        network = network_from_onnx_path(str(onnx_path))  # (builder, network, parser); resolves external data
        _check_io(network[1], spec, onnx_path)
        config = CreateConfig(
            fp16=fp16 and weak_typing,
            tf32=tf32,
            profiles=profiles,
            load_timing_cache=load_cache,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))},
        )
        save_cache = str(cache_path) if cache_path is not None else None
        engine = engine_from_network(network, config=config, save_timing_cache=save_cache)
        del network, config  # the parser's copy of the weights: free it before the check runs
    except EngineBuildError:
        raise
    except Exception as exc:  # polygraphy reports TensorRT's parser/builder errors as PolygraphyException
        raise EngineBuildError(
            f"TensorRT failed to build {spec.name!r} from {onnx_path} ({type(exc).__name__}): {exc}"
        ) from exc
    if verify:
        error = check_engine(
            None, onnx_path, spec, fp16, engine=engine, tf32=tf32, tolerance=tolerance, threads=threads
        )
        log.info("%s %s engine agrees with onnxruntime: max abs difference %.3g", spec.name, precision, error)
    try:
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        save_engine(engine, str(plan_path))
    except Exception as exc:
        plan_path.unlink(missing_ok=True)
        raise EngineBuildError(f"cannot save the {spec.name!r} engine to {plan_path}: {exc}") from exc
    return plan_path
