"""The sub-model interface the denoising loop runs against: torch, onnxruntime and Triton BLS adapters alike."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["SubModels"]


@runtime_checkable
class SubModels(Protocol):
    """Text encoder, UNet and VAE decoder of one Stable Diffusion checkpoint.

    SDXL adapters add ``encode_text_pair(input_ids, input_ids_2) -> (hidden [B, L, D1 + D2], text_embeds [B, P])``:
    both encoders' penultimate hidden states and the second's pooled projection (``nirvana.sdxl``).

    All tensors are CPU tensors; adapters move them to their device and back. Outputs are float32 whatever the
    adapter computes in, so the scheduler arithmetic stays in fp32.
    """

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` int64 → last hidden state ``[B, L, D]`` float32.

        ``attention_mask`` ``[B, L]`` is used only by text encoders whose config sets ``use_attention_mask``
        (SD 1.x/2.x do not); adapters for other encoders may ignore it.
        """
        ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Noise prediction ε ``[B, C, h, w]`` float32.

        ``sample`` ``[B, C, h, w]`` is the scheduler-scaled latent, ``timestep`` ``[B]`` (int64 or float, in
        training-timestep units 0..999), ``encoder_hidden_states`` ``[B, L, D]``. Adapters of SDXL checkpoints
        also take ``added_cond={"text_embeds": [B, P], "time_ids": [B, 6]}`` (``nirvana.sdxl``); only they are
        called with it.
        """
        ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE latent ``[B, C, h, w]`` (already divided by ``scaling_factor``) → image ``[B, 3, H, W]`` in ≈[-1, 1]."""
        ...
