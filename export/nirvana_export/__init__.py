"""Checkpoint → ONNX (checked against torch) → TensorRT plans, all derived from :mod:`nirvana.contract.specs`.

``tensorrt_build`` imports TensorRT only when an engine is built, so this package imports on CPU-only machines.
"""

from nirvana_export.onnx_export import ExportCheckError, check_onnx, export_all, export_submodel
from nirvana_export.tensorrt_build import TensorRTUnavailableError, build_engine

__all__ = [
    "ExportCheckError",
    "TensorRTUnavailableError",
    "build_engine",
    "check_onnx",
    "export_all",
    "export_submodel",
]
