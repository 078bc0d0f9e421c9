"""SDXL's conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` and its step 7 make it.

Two text encoders read the prompt: the UNet's cross-attention gets both penultimate hidden states side by side
``[B, L, D1 + D2]``, and its added conditioning gets the second encoder's pooled, projected ``text_embeds [B, P]``
and six micro-conditioning ``time_ids`` (original size, crop top-left, target size). An empty negative prompt is
all zeros (``force_zeros_for_empty_prompt``, as SDXL base ships), not the encoding of "".

Micro-conditioning is fixed at the checkpoint's own resolution with no crop (what the pipeline does by default);
it changes the image, so the cache key carries it (:func:`micro_conditioning`).
"""

from __future__ import annotations

import torch

from nirvana.checkpoint import CheckpointInfo
from nirvana.submodels import SubModels

__all__ = ["SdxlConditioning", "micro_conditioning", "time_ids"]


def micro_conditioning(checkpoint: CheckpointInfo) -> list[int]:
    """``original_size + crops_coords_top_left + target_size`` at the checkpoint's resolution, no crop."""
    height, width = checkpoint.image_size
    return [height, width, 0, 0, height, width]


def time_ids(checkpoint: CheckpointInfo, rows: int) -> torch.Tensor:
    """``[rows, 6]`` float32 ``time_ids``, the same for the unconditional and the conditional row."""
    return torch.tensor([micro_conditioning(checkpoint)], dtype=torch.float32).repeat(rows, 1)


def _tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids


class SdxlConditioning:
    """Text conditioning ``[2, L, D]`` and the UNet's added conditioning for ``[uncond, cond]``, in one call of
    each text encoder (diffusers makes two per encoder: the batch of two differs only by float rounding)."""

    pooled_key = "text_embeds"  # the added input the retrieval vector is pooled from

    def __init__(self, checkpoint: CheckpointInfo, models: SubModels) -> None:
        if checkpoint.tokenizer_2 is None:
            raise ValueError(f"{checkpoint.path} is not an SDXL checkpoint: it has no tokenizer_2")
        self.checkpoint, self.models = checkpoint, models

    def encode(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(text [2, L, D1 + D2], {"text_embeds": [2, P], "time_ids": [2, 6]})``, rows ``[uncond, cond]``."""
        zero_uncond = not negative_prompt and self.checkpoint.force_zeros_for_empty_prompt
        texts = [prompt] if zero_uncond else [negative_prompt, prompt]
        ids_1 = _tokens(self.checkpoint.tokenizer, texts)
        ids_2 = _tokens(self.checkpoint.tokenizer_2, texts)
        hidden, pooled = self.models.encode_text_pair(ids_1, ids_2)
        if zero_uncond:
            hidden = torch.cat([torch.zeros_like(hidden), hidden])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        return hidden, {"text_embeds": pooled, "time_ids": time_ids(self.checkpoint, 2)}

    def loop_guidance(self, guidance: float, added: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        return guidance, added  # classifier-free guidance, as SD 1.x

    def key_parts(self) -> dict[str, object]:
        return {"micro_conditioning": micro_conditioning(self.checkpoint)}
