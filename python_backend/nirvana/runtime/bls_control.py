"""The orchestrator's side of served ControlNets: the request's control is checked and prepared here
(`nirvana.addons.controlnet.ControlNetCatalog`), and at every step the ``controlnet_<name>`` model answers the residuals
that `BlsSubModels.unet` then sends, with the step, to the ``unet_control`` model (`nirvana.contract.controlnet`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nirvana.addons.controlnet import ControlNetCatalog, Residuals
from nirvana.checkpoint import CheckpointInfo
from nirvana.contract.controlnet import controlnet_model, residual_names, residual_shapes
from nirvana.runtime.bls import bls_infer_torch

__all__ = ["BlsControlNets"]


class BlsControlNets(ControlNetCatalog):
    """The controlnets folder as the orchestrators see it; each ControlNet runs as a Triton model of its own."""

    def __init__(self, pb_utils: Any, root: str | Path, checkpoint: CheckpointInfo) -> None:
        super().__init__(root, checkpoint.image_size)
        self._pb = pb_utils
        self._outputs = residual_names(len(residual_shapes(checkpoint.unet_config, checkpoint.latent_size)))

    def runner(self, name: str) -> Residuals:
        model, outputs, pb = controlnet_model(name), self._outputs, self._pb

        def run(
            sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor, scale: float
        ) -> dict[str, object]:
            rows = sample.shape[0]
            # Per row, as the batched model takes them ([rows, 1], reshaped to [rows] by its config).
            inputs = {
                "sample": sample.to(torch.float32),
                "timestep": timestep.reshape(-1).expand(rows).reshape(-1, 1).to(torch.float32),
                "encoder_hidden_states": text.to(torch.float32),
                "controlnet_cond": image.expand(rows, -1, -1, -1).to(torch.float32),
                "conditioning_scale": torch.full((rows, 1), float(scale)),
            }
            return dict(bls_infer_torch(pb, model, inputs, outputs))

        return run
