"""ONNX → TensorRT plan with one optimization profile taken from the sub-model's spec (GPU machines only).

TensorRT is imported inside the functions: this module imports (and its errors are testable) on CPU machines.

Precision: TensorRT 10 builds "weakly typed" networks and picks fp16 kernels when ``BuilderFlag.FP16`` is set.
TensorRT 11 removed that flag: every network is strongly typed and precision comes from the ONNX graph itself, so
an fp16 engine needs an fp16 graph (export the module in fp16 — the graphs of ``onnx_export`` keep float32 I/O —
or convert the ONNX with ModelOpt AutoCast). :func:`build_engine` handles both and refuses, with that advice, to
build an fp32 engine silently when fp16 was asked for.

A plan only runs on the TensorRT version and GPU architecture it was built with: build it with the TensorRT of
the Triton image that serves it (e.g. inside ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nirvana.specs import ModelSpec

__all__ = ["EngineBuildError", "TensorRTUnavailableError", "build_engine", "import_tensorrt"]


class TensorRTUnavailableError(ImportError):
    """The ``tensorrt`` Python package is not installed (it needs an NVIDIA GPU machine)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message carries TensorRT's errors."""


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
    onnx_path: str | Path, spec: ModelSpec, plan_path: str | Path, fp16: bool = True, workspace_gb: float = 8
) -> Path:
    """Build a serialized TensorRT engine (``model.plan``) for ``spec`` from ``onnx_path``; returns ``plan_path``.

    One optimization profile: for each input ``profile.set_shape(name, min, opt, max)`` from ``spec.profile``, so
    the engine accepts batch 1..max_batch (and the embedder's sequence range). ``workspace_gb`` caps TensorRT's
    scratch memory for tactics. Raises :class:`TensorRTUnavailableError` without TensorRT and
    :class:`EngineBuildError` when parsing or building fails.
    """
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX file not found: {onnx_path}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path, logger)  # the parser must outlive the build
    _check_io(network, spec, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _precision(trt, config, fp16, onnx_path)
    profile = builder.create_optimization_profile()
    for name, (shape_min, shape_opt, shape_max) in spec.profile.items():
        profile.set_shape(name, shape_min, shape_opt, shape_max)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {spec.name!r} from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path
