"""ControlNet rows in the step scheduler: per iteration, the rows of every request with the same ControlNet and UNet
model go through the `controlnet_<name>` model in one execution (each row with its request's control image and
scale), and its residuals go, as Triton delivered them, into one execution of the `unet_control` model (or its LoRA
set's model). The residuals are never converted here: with ``residual_memory="gpu"`` Triton delivers them in GPU
memory and they stay there, read by the UNet where the ControlNet wrote them; "cpu" (the rendered default until a
GPU run has checked "gpu") delivers them in host memory; "auto" is "gpu" where this process's torch sees CUDA."""

from __future__ import annotations

from typing import Any

import torch

from nirvana.contract.controlnet import residual_names, residual_shapes
from nirvana.families import DIT
from nirvana.runtime.bls import bls_execute, cpu_memory

__all__ = ["ControlRunner"]

CONTROL_INPUTS = ("controlnet_cond", "conditioning_scale")


class ControlRunner:
    """``runner(controlnet, unet, rows)`` → noise ``[R, C, h, w]`` float32 on the CPU: ``rows`` are the batcher's
    stacked inputs (`nirvana.step_batcher.BatchedUNet` with a control) with ``controlnet_cond [R, 3, H, W]`` and
    ``conditioning_scale [R]`` beside the UNet's."""

    def __init__(self, pb: Any, checkpoint: Any, residual_memory: str) -> None:
        if residual_memory not in ("cpu", "gpu", "auto"):
            raise ValueError(f"residual_memory={residual_memory!r}: choose cpu, gpu or auto")
        if residual_memory == "auto":
            residual_memory = "gpu" if torch.cuda.is_available() else "cpu"
        self._pb = pb
        self._memory = residual_memory
        # A transformer checkpoint (SD 3, FLUX) has no ControlNet path: no residuals to name.
        unet = checkpoint.family not in DIT
        shapes = residual_shapes(checkpoint.unet_config, checkpoint.latent_size) if unet else []
        self._outputs = residual_names(len(shapes))

    def __call__(self, controlnet: str, unet: str, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        pb = self._pb
        timestep = rows["timestep"].reshape(-1, 1)  # the batched configs' [rows, 1]
        unet_inputs = {k: v for k, v in rows.items() if k not in CONTROL_INPUTS} | {"timestep": timestep}
        control_inputs = {
            "sample": rows["sample"],
            "timestep": timestep,
            "encoder_hidden_states": rows["encoder_hidden_states"],
            "controlnet_cond": rows["controlnet_cond"],
            "conditioning_scale": rows["conditioning_scale"].reshape(-1, 1),
        }
        memory = cpu_memory(pb) if self._memory == "cpu" else pb.PreferredMemory(pb.TRITONSERVER_MEMORY_GPU, 0)
        residuals = bls_execute(pb, controlnet, _tensors(pb, control_inputs), self._outputs, memory)
        tensors = _tensors(pb, unet_inputs) + list(residuals.values())  # named as the UNet's inputs
        noise = bls_execute(pb, unet, tensors, ["noise_pred"], cpu_memory(pb))["noise_pred"]
        return torch.utils.dlpack.from_dlpack(noise.to_dlpack()).float()


def _tensors(pb: Any, inputs: dict[str, torch.Tensor]) -> list:
    return [pb.Tensor.from_dlpack(name, value.contiguous()) for name, value in inputs.items()]
