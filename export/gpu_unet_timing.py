"""GPU check: UNet milliseconds per execution by rows, for the SD 1.5, SD 2.1 and SDXL architectures (random weights).

A row is one latent of a classifier-free-guidance pair; the served `unet` model merges the rows of concurrent
requests into one execution, so the cost curve by rows is what the batching (and a router's cost model) works with.
Random weights time the same as trained ones. Runs diffusers' UNet2DConditionModel in torch fp16 eager on CUDA
(no TensorRT), with the latent and text shapes each family serves at its native resolution::

    python export/gpu_unet_timing.py --rows 1,2,4,8,16 --json unet_timing.json

Prints one line per (architecture, rows): mean and min ms per execution over ``--iterations`` CUDA-event-timed
calls after ``--warmup`` untimed ones, and ms per row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# unet/config.json of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-
# xl-base-1.0 (the fields that differ from diffusers' defaults), with each one's text length × width.
ARCHITECTURES = {
    "sd15": dict(
        unet=dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        text=(77, 768),
    ),
    "sd21": dict(
        unet=dict(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        ),
        text=(77, 1024),
    ),
    "sdxl": dict(
        unet=dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        text=(77, 2048),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15,sd21,sdxl", help=f"comma-separated, from {sorted(ARCHITECTURES)}")
    parser.add_argument("--rows", default="1,2,4,8,16", help="rows per execution, comma-separated")
    parser.add_argument("--iterations", type=int, default=10, help="timed executions per (architecture, rows)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed executions before timing")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    return parser.parse_args(argv)


def inputs(arch: str, unet: torch.nn.Module, rows: int) -> dict:
    """Random inputs of ``rows`` rows at the architecture's native resolution (SDXL: its micro-conditioning too)."""
    size, (seq, width) = unet.config.sample_size, ARCHITECTURES[arch]["text"]
    kwargs = dict(
        sample=torch.randn(rows, 4, size, size, device="cuda", dtype=torch.float16),
        timestep=torch.full((rows,), 500, device="cuda"),
        encoder_hidden_states=torch.randn(rows, seq, width, device="cuda", dtype=torch.float16),
    )
    if arch == "sdxl":  # pooled text embeds of text_encoder_2 and (orig h, w, crop top, left, target h, w)
        time_ids = torch.tensor([1024, 1024, 0, 0, 1024, 1024], device="cuda", dtype=torch.float16).repeat(rows, 1)
        text_embeds = torch.randn(rows, 1280, device="cuda", dtype=torch.float16)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    return kwargs


@torch.inference_mode()
def time_unet(arch: str, rows_list: list[int], iterations: int, warmup: int) -> list[dict]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):  # built on the GPU: random init of 2.6B parameters on a CPU takes minutes
        unet = UNet2DConditionModel(**ARCHITECTURES[arch]["unet"]).to(torch.float16).eval()
    params = sum(p.numel() for p in unet.parameters())
    out = []
    for rows in rows_list:
        kwargs = inputs(arch, unet, rows)
        for _ in range(warmup):
            unet(**kwargs)
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            unet(**kwargs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        mean = sum(times) / len(times)
        row = {"arch": arch, "params_m": round(params / 1e6, 1), "rows": rows, "mean_ms": round(mean, 2)}
        row |= {"min_ms": round(min(times), 2), "ms_per_row": round(mean / rows, 2)}
        print(json.dumps(row), flush=True)
        out.append(row)
    del unet
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    rows = [int(r) for r in args.rows.split(",")]
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": "float16", "results": []}
    print(f"GPU: {report['gpu']}, torch {report['torch']}", flush=True)
    for arch in args.arch.split(","):
        report["results"] += time_unet(arch, rows, args.iterations, args.warmup)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
