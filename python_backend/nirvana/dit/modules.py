"""SD 3.x and FLUX.1 module calls: their text encoders and transformer, as their pipelines call them.

The loop keeps FLUX's latent unpacked ``[B, 16, h, w]`` like every other family's: the transformer call packs it into
2×2 patches ``[B, h/2 · w/2, 64]`` and unpacks the prediction. The Euler step is elementwise, so stepping the unpacked
latent gives exactly what ``FluxPipeline`` gets stepping the packed one, and the cache stores one layout for all.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["call_dit_encoders", "call_transformer", "combine_sd3", "image_ids", "pack", "unpack"]


def pack(latent: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → FLUX's 2×2 patches ``[B, h/2 · w/2, 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latent.shape
    patches = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` (``FluxPipeline._unpack_latents``)."""
    b, _, channels = packed.shape
    patches = packed.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """FLUX's RoPE positions of the image tokens ``[h/2 · w/2, 3]``: (0, row, column) of each 2×2 patch. Made on
    ``device``: no host copy per step (nor inside a CUDA graph's capture)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def call_dit_encoders(family: str, encoders: dict[str, Any], tokens: dict[str, torch.Tensor]):
    """Token ids by tokenizer folder → ``(hidden [B, T, D], pooled [B, P])`` as the family's ``encode_prompt``:
    SD 3: both CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's states after them;
    pooled = CLIP-L + CLIP-G projections. FLUX: T5's states; pooled = CLIP-L's pooled output."""
    clip = encoders["text_encoder"]
    if family == "flux":
        pooled = clip(tokens["tokenizer"].to(clip.device), output_hidden_states=False).pooler_output
        t5 = encoders["text_encoder_2"]
        return t5(tokens["tokenizer_2"].to(t5.device))[0], pooled
    first = clip(tokens["tokenizer"].to(clip.device), output_hidden_states=True)
    clip_g, t5 = encoders["text_encoder_2"], encoders["text_encoder_3"]
    second = clip_g(tokens["tokenizer_2"].to(clip_g.device), output_hidden_states=True)
    t5_states = t5(tokens["tokenizer_3"].to(t5.device))[0]
    return combine_sd3(first.hidden_states[-2], first[0], second.hidden_states[-2], second[0], t5_states)


def combine_sd3(
    clip_l: torch.Tensor, pooled_l: torch.Tensor, clip_g: torch.Tensor, pooled_g: torch.Tensor, t5: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD 3's text conditioning from its three encoders' outputs (``StableDiffusion3Pipeline.encode_prompt``): both
    CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's states after them; the pooled
    projections side by side."""
    states = torch.cat([clip_l, clip_g.to(clip_l.device)], dim=-1)
    t5 = t5.to(states.device)
    states = torch.nn.functional.pad(states, (0, t5.shape[-1] - states.shape[-1]))
    return torch.cat([states, t5], dim=-2), torch.cat([pooled_l, pooled_g.to(pooled_l.device)], dim=-1)


def call_transformer(
    family: str, transformer: Any, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, added: dict
) -> torch.Tensor:
    """Latent ``[B, C, h, w]``, timestep ``[B]`` (the scheduler's, 0..1000), text ``[B, T, D]`` and ``added``
    (``pooled_projections [B, P]``; FLUX: ``guidance [B]``) → velocity ``[B, C, h, w]``."""
    device, dtype = transformer.device, transformer.dtype
    pooled = added["pooled_projections"].to(device, dtype)
    if family != "flux":
        return transformer(
            hidden_states=sample.to(device, dtype),
            timestep=timestep.to(device),
            encoder_hidden_states=text.to(device, dtype),
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    h, w = sample.shape[-2:]
    guidance = added.get("guidance")
    out = transformer(
        hidden_states=pack(sample).to(device, dtype),
        timestep=(timestep.to(device, dtype) / 1000),  # FLUX's transformer takes t / 1000, in the latents' dtype
        guidance=None if guidance is None else guidance.to(device, torch.float32),
        pooled_projections=pooled,
        encoder_hidden_states=text.to(device, dtype),
        txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
        img_ids=image_ids(h, w, device).to(dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)
