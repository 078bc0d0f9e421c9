"""GPU check: transformer milliseconds per execution by rows, for SD 3.5 Medium and FLUX.1 dev (random weights).

The transformer families' counterpart of `gpu_unet_timing.py`: the served `unet` model of an SD 3.x or FLUX.1
repository is the transformer, and the step scheduler merges the rows of requests in flight into one execution, so
the cost by rows is what batching works with. Random weights time the same as trained ones. diffusers'
``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` in torch bf16 eager on CUDA (no TensorRT), built on the GPU,
at 1024×1024 (128×128×16 latent) with the text each family attends to (SD 3: 77 CLIP + 256 T5 tokens; FLUX: 512 T5
tokens)::

    python export/gpu_dit_timing.py --rows 1,2,4,8 --json dit_timing.json

Prints one line per (architecture, rows): mean and min ms per execution over ``--iterations`` CUDA-event-timed calls
after ``--warmup`` untimed ones, and ms per row. ``--arch tiny-sd3,tiny-flux --device cpu`` runs the same code on the
tiny layouts (what the tests run).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from nirvana.dit.modules import call_transformer
from nirvana_dev.tiny_dit import TRANSFORMERS

# The transformers of `make-tiny-model --architecture …` (`nirvana_dev.tiny_dit.TRANSFORMERS`), with the latent side
# and the text tokens × width each attends to at its image size.
ARCHITECTURES = {
    "sd35m": dict(family="sd3", latent=128, text=(77 + 256, 4096), pooled=2048),
    "flux1": dict(family="flux", latent=128, text=(512, 4096), pooled=768),
    "tiny-sd3": dict(family="sd3", latent=16, text=(77 + 32, 64), pooled=64),
    "tiny-flux": dict(family="flux", latent=16, text=(32, 64), pooled=32),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd35m,flux1", help=f"comma-separated, from {sorted(ARCHITECTURES)}")
    parser.add_argument("--rows", default="1,2,4,8", help="rows per execution, comma-separated")
    parser.add_argument("--iterations", type=int, default=10, help="timed executions per (architecture, rows)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed executions before timing")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the tiny layouts, for tests)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    return parser.parse_args(argv)


def build(arch: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    spec = ARCHITECTURES[arch]
    cls = FluxTransformer2DModel if spec["family"] == "flux" else SD3Transformer2DModel
    torch.manual_seed(0)
    with torch.device(device):  # built on the GPU: random init of 12B parameters on a CPU takes many minutes
        return cls(**TRANSFORMERS[arch]).to(dtype).eval()


def inputs(arch: str, rows: int, device: str, dtype: torch.dtype) -> tuple:
    """Random ``(sample, timestep, text, added)`` of ``rows`` rows, as the server hands them to the transformer."""
    spec = ARCHITECTURES[arch]
    side, (seq, width) = spec["latent"], spec["text"]
    sample = torch.randn(rows, 16, side, side, device=device, dtype=dtype)
    text = torch.randn(rows, seq, width, device=device, dtype=dtype)
    added = {"pooled_projections": torch.randn(rows, spec["pooled"], device=device, dtype=dtype)}
    if spec["family"] == "flux":
        added["guidance"] = torch.full((rows,), 3.5, device=device)
    return sample, torch.full((rows,), 500.0, device=device), text, added


def _elapsed_ms(fn, device: str) -> float:
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


@torch.inference_mode()
def time_transformer(arch: str, rows_list: list[int], iterations: int, warmup: int, device: str) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(arch, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    out = []
    for rows in rows_list:
        # the module calls the server makes (`nirvana.dit.modules`: FLUX's packing and ids included)
        family = ARCHITECTURES[arch]["family"]
        run = functools.partial(call_transformer, family, model, *inputs(arch, rows, device, dtype))
        for _ in range(warmup):
            run()
        times = [_elapsed_ms(run, device) for _ in range(iterations)]
        mean = sum(times) / len(times)
        row = {"arch": arch, "params_m": round(params / 1e6, 1), "rows": rows, "mean_ms": round(mean, 2)}
        row |= {"min_ms": round(min(times), 2), "ms_per_row": round(mean / rows, 2)}
        print(json.dumps(row), flush=True)
        out.append(row)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (or --device cpu with the tiny layouts)")
    rows = [int(r) for r in args.rows.split(",")]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    report = {"device": gpu, "torch": torch.__version__, "dtype": dtype, "results": []}
    print(f"device: {gpu}, torch {report['torch']}, {dtype}", flush=True)
    for arch in args.arch.split(","):
        if arch not in ARCHITECTURES:
            raise SystemExit(f"--arch {arch!r}: choose from {sorted(ARCHITECTURES)}")
        report["results"] += time_transformer(arch, rows, args.iterations, args.warmup, args.device)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
