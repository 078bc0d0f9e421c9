"""What SD 3.x and FLUX.1 transformers are conditioned on, as their pipelines' ``encode_prompt`` makes it.

SD 3: rows ``[uncond, cond]`` (classifier-free guidance; the negative prompt, "" by default, is encoded like the
prompt), text ``[2, 77 + T, D]`` and ``pooled_projections [2, P]``. FLUX.1: one row ``[cond]``; guidance is not CFG
but an input of the transformer (``guidance [1]``, guidance-distilled dev models), so a negative prompt is refused.

Retrieval pools from this same pass: the cache searches by ``pooled_projections`` — SD 3's CLIP-L + CLIP-G
projections (the vectors those encoders were trained to match images with, 2,048 wide at full size) and FLUX's
CLIP-L pooled output (768) — never by T5's states (a sequence, and 4,096 wide). No model call of its own.
"""

from __future__ import annotations

import torch

from nirvana.checkpoint import CheckpointInfo
from nirvana.checkpoint.dit import DitCheckpointInfo
from nirvana.request import RequestError
from nirvana.schedulers import IMAGE_SEQ_LEN
from nirvana.sdxl import SdxlConditioning
from nirvana.submodels import SubModels

__all__ = ["DitConditioning", "dit_tokens", "family_conditioning"]


def dit_tokens(checkpoint: DitCheckpointInfo, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids ``[B, L]`` by tokenizer folder: CLIP's padded to 77, T5's to ``max_sequence_length``."""
    t5 = checkpoint.t5_tokenizer
    out = {}
    for folder, tokenizer in checkpoint.tokenizers.items():
        length = checkpoint.max_sequence_length if tokenizer is t5 else tokenizer.model_max_length
        encoded = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out[folder] = encoded.input_ids
    return out


class DitConditioning:
    """Text conditioning and the transformer's added inputs for one request, in one call of the text encoders."""

    pooled_key = "pooled_projections"  # the added input the retrieval vector is pooled from

    def __init__(self, checkpoint: DitCheckpointInfo, models: SubModels) -> None:
        self.checkpoint, self.models = checkpoint, models
        self.family = checkpoint.family
        self.guidance_embeds = bool(checkpoint.unet_config.get("guidance_embeds", False))

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dit_tokens(self.checkpoint, texts)

    def encode(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(text [rows, T, D], {"pooled_projections": [rows, P]})``: rows ``[uncond, cond]`` for SD 3, ``[cond]``
        for FLUX (whose negative prompt is refused, naming the field)."""
        if self.family == "flux":
            if negative_prompt:
                raise RequestError(
                    "NEGATIVE_PROMPT",
                    negative_prompt,
                    "FLUX.1 is served without classifier-free guidance (its guidance is a transformer input); leave it "
                    "empty",
                )
            texts = [prompt]
        else:
            texts = [negative_prompt or "", prompt]
        hidden, pooled = self.models.encode_dit(self.tokens(texts))
        return hidden, {self.pooled_key: pooled}

    def loop_guidance(self, guidance: float, added: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        """The loop's CFG scale and added inputs for a request's ``guidance``: SD 3 guides by CFG as the UNets do;
        FLUX feeds it to the transformer (``guidance`` per row, as ``FluxPipeline``) and runs one row (scale 1)."""
        if self.family != "flux":
            return guidance, added
        if not self.guidance_embeds:  # schnell: guidance is not an input at all
            return 1.0, added
        rows = added[self.pooled_key].shape[0]  # 1 per request; B in a calibration batch
        return 1.0, {**added, "guidance": torch.full([rows], guidance, dtype=torch.float32)}

    def key_parts(self) -> dict[str, object]:
        """What changes the trajectory beyond checkpoint, scheduler, resolution, steps and guidance: T5's sequence
        length (padding tokens are attended to) and the image's token count the shift is computed from."""
        return {
            "family": self.family,
            "max_sequence_length": self.checkpoint.max_sequence_length,
            "image_seq_len": self.checkpoint.scheduler_config.get(IMAGE_SEQ_LEN),
        }


def family_conditioning(checkpoint: CheckpointInfo, models: SubModels) -> SdxlConditioning | DitConditioning | None:
    """The conditioning of a family with more than one text encoder (SDXL, SD 3, FLUX), or None for SD 1.x/2.x
    (one CLIP encoder, `nirvana.pipeline` encodes it itself). Each has ``encode``, ``pooled_key``,
    ``loop_guidance`` and ``key_parts``."""
    if isinstance(checkpoint, DitCheckpointInfo):
        return DitConditioning(checkpoint, models)
    if checkpoint.family == "sdxl":
        return SdxlConditioning(checkpoint, models)
    return None
