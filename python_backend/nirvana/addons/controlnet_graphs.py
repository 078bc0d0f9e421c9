"""Torch modules whose forward is a served ControlNet contract (`nirvana.contract.controlnet`): what the export traces
to ONNX (`nirvana_export.controlnet_export`) and what the torch profile's models run
(`nirvana.runtime.torch_runtime`)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ControlNetGraph", "UNetControlGraph"]


class UNetControlGraph(nn.Module):
    """``sample``, ``timestep``, ``encoder_hidden_states``, then the ControlNet's residuals (down blocks', the mid
    block's last) → ``noise_pred``, as diffusers' UNet takes them (``down_block_additional_residuals``)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> torch.Tensor:
        dtype = self.unet.dtype
        down = tuple(r.to(dtype) for r in residuals[:-1])
        out = self.unet(
            sample.to(dtype),
            timestep,
            encoder_hidden_states.to(dtype),
            down_block_additional_residuals=down,
            mid_block_additional_residual=residuals[-1].to(dtype),
            return_dict=False,
        )[0]
        return out.float()


class ControlNetGraph(nn.Module):
    """A diffusers ControlNet with its conditioning scale per row: run at scale 1, then each residual multiplied by
    its row's scale — what ``ControlNetModel`` does with one scale (without guess mode), for a batch of requests."""

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        dtype = self.controlnet.dtype
        down, mid = self.controlnet(
            sample.to(dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            controlnet_cond=controlnet_cond.to(dtype),
            conditioning_scale=1.0,
            return_dict=False,
        )
        scale = conditioning_scale.reshape(-1, 1, 1, 1)
        return tuple(r.float() * scale for r in (*down, mid))
