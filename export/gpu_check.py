"""GPU check: a full-size SD 1.5 UNet (random weights) through ONNX → TensorRT fp16, timed against torch fp16.

Run once by hand on an NVIDIA GPU machine (it is not a test: CI has no GPU)::

    pip install -e . --no-deps && pip install tensorrt     # plus a CUDA build of torch
    python export/gpu_check.py --out /tmp/gpu_check --iterations 50

It prints the GPU name; the UNet's ms/step at batch 2 (the classifier-free-guidance pair; 4×64×64 latent, 77×768
text) for the TensorRT engine and for torch fp16 on the same GPU in the same run, with the max abs diff between
them; and end-to-end ms of a 50-step DDIM loop driven by each. Numbers also go to ``<out>/gpu_check.json``.
Most of the few minutes it takes is the engine build; ``model.onnx``/``model.plan`` in ``--out`` are reused by a
second run unless ``--rebuild``. Random weights time the same as trained ones; they say nothing about images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json); other fields are diffusers' defaults, as there.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
TEXT_LEN, TEXT_DIM, BATCH = 77, 768, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for model.onnx/model.plan")
    parser.add_argument("--iterations", type=int, default=20, help="timed UNet calls per runtime (≥ 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed UNet calls before timing")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the end-to-end loop")
    parser.add_argument("--workspace-gb", type=float, default=8.0, help="TensorRT builder workspace")
    parser.add_argument("--rebuild", action="store_true", help="export and build even if files exist in --out")
    return parser.parse_args(argv)


class TrtRunner:
    """Runs a deserialized engine on CUDA torch tensors (name-based I/O, TensorRT ≥ 10 API)."""

    def __init__(self, trt: Any, plan_path: Path) -> None:
        import torch

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        import torch

        inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}  # held until enqueued
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self.dtypes[self.engine.get_tensor_dtype(name)]
            results[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        # Enqueued on torch's current stream, so CUDA events and synchronize() see it like torch's own kernels.
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return results


def time_ms(fn: Any, warmup: int, iterations: int) -> float:
    """Mean ms per call of ``fn`` measured with CUDA events after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def ddim_loop_ms(unet_fn: Any, latent: Any, text: Any, steps: int, guidance: float = 7.5) -> float:
    """Wall ms (synchronize + perf_counter) of a full DDIM CFG loop on the GPU; ``unet_fn(x, t, text) → ε``."""
    import torch
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    torch.cuda.synchronize()
    start = time.perf_counter()
    scheduler.set_timesteps(steps, device="cuda")
    x = latent.clone()
    for t in scheduler.timesteps:
        model_input = torch.cat([x, x])  # DDIM's scale_model_input is the identity
        eps = unet_fn(model_input, t.float().expand(BATCH), text)
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, eta=0.0, return_dict=False)[0]
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def build(args: argparse.Namespace, unet: Any, trt: Any) -> tuple[Path, dict[str, float]]:
    """Export (fp16 graph, fp32 I/O) and build the engine unless both exist; returns the plan path and timings."""
    from nirvana.contract.specs import unet_spec
    from nirvana_export.onnx_export import UNetGraph, export_graph
    from nirvana_export.tensorrt_build import build_engine

    spec = unet_spec(4, (64, 64), TEXT_LEN, TEXT_DIM, max_batch=BATCH)
    onnx_file, plan_file = args.out / "unet" / "model.onnx", args.out / "unet" / "model.plan"
    seconds: dict[str, float] = {}
    if args.rebuild or not onnx_file.is_file():
        start = time.perf_counter()
        export_graph(UNetGraph(unet).eval(), spec, onnx_file)
        seconds["onnx_export_s"] = time.perf_counter() - start
        plan_file.unlink(missing_ok=True)
    if not plan_file.is_file():
        start = time.perf_counter()
        build_engine(onnx_file, spec, plan_file, fp16=True, workspace_gb=args.workspace_gb)
        seconds["engine_build_s"] = time.perf_counter() - start
    print(f"ONNX {onnx_file} ({onnx_file.stat().st_size / 2**20:.0f} MiB), plan {plan_file}; {seconds}", flush=True)
    return plan_file, seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from diffusers import UNet2DConditionModel

    from nirvana_export.tensorrt_build import import_tensorrt

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; torch {torch.__version__}, TensorRT {trt.__version__}", flush=True)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise the 860M parameters on the GPU: seconds instead of a minute on CPU
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.float16).eval()
    plan_file, seconds = build(args, unet, trt)

    from nirvana_export.onnx_export import UNetGraph

    torch_unet, engine = UNetGraph(unet).eval(), TrtRunner(trt, plan_file)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.randn(BATCH, 4, 64, 64, device="cuda", generator=gen)
    timestep = torch.full((BATCH,), 981.0, device="cuda")
    text = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, device="cuda", generator=gen)

    def run_trt(x: Any = sample, t: Any = timestep, c: Any = text) -> Any:
        return engine(sample=x, timestep=t, encoder_hidden_states=c)["noise_pred"]

    @torch.inference_mode()
    def run_torch(x: Any = sample, t: Any = timestep, c: Any = text) -> Any:
        return torch_unet(x, t, c)

    report: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "tensorrt": trt.__version__, **seconds}
    report["max_abs_diff_trt_vs_torch"] = float((run_trt().float() - run_torch().float()).abs().max())
    report["unet_ms_trt"] = time_ms(run_trt, args.warmup, args.iterations)
    report["unet_ms_torch_fp16"] = time_ms(run_torch, args.warmup, args.iterations)
    latent = torch.randn(1, 4, 64, 64, device="cuda", generator=gen)
    cond = text  # [uncond, cond] pair; random embeddings time the same as encoded prompts
    ddim_loop_ms(run_trt, latent, cond, steps=3)  # warm the scheduler path
    report[f"e2e_{args.steps}_steps_ms_trt"] = ddim_loop_ms(run_trt, latent, cond, args.steps)
    with torch.inference_mode():
        report[f"e2e_{args.steps}_steps_ms_torch_fp16"] = ddim_loop_ms(run_torch, latent, cond, args.steps)
    report["iterations"], report["speedup_unet"] = args.iterations, report["unet_ms_torch_fp16"] / report["unet_ms_trt"]
    for key, value in report.items():
        print(f"{key:>32}: {value:.3f}" if isinstance(value, float) else f"{key:>32}: {value}")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
