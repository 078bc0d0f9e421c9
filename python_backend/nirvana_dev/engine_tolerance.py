"""Measure how far an fp16 computation of each sub-model lands from its fp32 reference (CPU, no GPU needed).

This is what :data:`nirvana_export.tensorrt_build.ENGINE_TOLERANCES` is set from: the same ONNX file run by
onnxruntime in fp32 and after an fp16 conversion (``onnxruntime.transformers.float16``, I/O kept fp32, as the engines'
are), on the check's own inputs (:func:`~nirvana_export.tensorrt_build.opt_inputs` at the profile's opt shape), with
the check's own pass rule (polygraphy's elementwise ``|d| ≤ atol or |d|/|ref| ≤ rtol``). It measures fp16 rounding,
not TensorRT: a TensorRT fp16 engine keeps fp32 accumulation in its GEMMs and may pick fp32 for some layers, so it
is usually closer to fp32 than this conversion, which is why the tolerances add a margin rather than less.

    python -m nirvana_dev.engine_tolerance [CHECKPOINT_DIR]   # default: a fresh `nirvana make-tiny-model`

Exporting the ONNX files uses torch (as ``nirvana export`` does); the measurement itself uses onnxruntime only.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nirvana.contract.specs import ModelSpec

__all__ = ["atol_needed", "measure_fp16", "to_fp16"]

RTOLS = (1e-2, 2e-2, 5e-2)


def atol_needed(got: np.ndarray, want: np.ndarray, rtol: float) -> float:
    """The smallest atol with which every element passes ``|d| ≤ atol or |d| ≤ rtol·|want|`` (polygraphy's
    elementwise rule): the largest |d| among the elements the relative tolerance does not cover."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    uncovered = diff[diff > rtol * np.abs(want.astype(np.float64))]
    return float(uncovered.max(initial=0.0))


def to_fp16(onnx_path: str | Path, out_path: str | Path) -> Path:
    """An fp16 copy of ``onnx_path`` with fp32 inputs and outputs (onnxruntime's own float16 tool; ops it keeps in
    fp32 by default, e.g. Resize/Range/Upsample, stay fp32, much as TensorRT keeps some layers in fp32)."""
    import onnx
    from onnxruntime.transformers import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)


def measure_fp16(onnx_path: str | Path, spec: ModelSpec, workdir: str | Path, threads: int = 1) -> dict[str, dict]:
    """Per output: max |fp16 − fp32|, max relative difference, max |fp32|, and :func:`atol_needed` at each of
    :data:`RTOLS`, on the engine check's inputs."""
    from nirvana_export.tensorrt_build import make_check_session, opt_inputs

    inputs = opt_inputs(spec)
    fp16_path = to_fp16(onnx_path, Path(workdir) / f"{spec.name}.fp16.onnx")
    runs = []
    for path in (onnx_path, fp16_path):
        session = make_check_session(path, threads)
        names = [o.name for o in session.get_outputs()]
        runs.append(dict(zip(names, session.run(names, dict(inputs)), strict=True)))
    want, got = runs
    figures = {}
    for name, ref in want.items():
        diff = np.abs(got[name].astype(np.float64) - ref)
        figures[name] = {
            "max_abs": float(diff.max()),
            "max_rel": float((diff / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)).max()),
            "max_ref": float(np.abs(ref).max()),
            "finite": bool(np.isfinite(got[name]).all()),
            **{f"atol@rtol={r:g}": atol_needed(got[name], ref, r) for r in RTOLS},
        }
    return figures


def _print(model: str, figures: Mapping[str, dict]) -> None:
    for output, f in figures.items():
        extra = "  ".join(f"{k} {v:.3g}" for k, v in f.items() if k.startswith("atol@"))
        print(
            f"{model:16} {output:22} max_abs {f['max_abs']:.3g}  max_rel {f['max_rel']:.3g}  "
            f"max|ref| {f['max_ref']:.3g}  finite {f['finite']}  {extra}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="diffusers folder (default: a tiny random one)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from nirvana.checkpoint import load_checkpoint
    from nirvana.contract.specs import submodel_specs
    from nirvana_export.onnx_export import export_all

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = args.checkpoint
        if checkpoint_dir is None:
            from nirvana_dev.tiny_model import make_tiny_model

            checkpoint_dir = make_tiny_model(Path(tmp) / "tiny", seed=0, scheduler="ddim")
        paths = export_all(checkpoint_dir, Path(tmp) / "onnx")
        specs = submodel_specs(load_checkpoint(checkpoint_dir))
        for name, path in paths.items():
            _print(name, measure_fp16(path, specs[name], tmp, args.threads))


if __name__ == "__main__":
    main()
