"""Progress of one request while it runs: the events `Pipeline.generate(on_event=...)` reports, cancellation, and
a cheap latent preview.

A request reports one :class:`CacheEvent` (the cache has answered, or was skipped) and then one :class:`StepEvent`
after every denoising step it runs: N − K of them. The callback cancels the request by raising :class:`Cancelled`:
the exception leaves `generate` at once, so the request's UNet rows are gone from the next batched step and nothing
of it is admitted to the cache (admission comes after the last step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SD_LATENT_RGB", "CacheEvent", "Cancelled", "EventCallback", "StepEvent", "latent_preview"]

# The well-known fixed linear map of Stable Diffusion 1.x/2.x latents (scheduler space, i.e. VAE latent × 0.18215)
# to RGB in ≈[-1, 1], rows = latent channels, columns = R, G, B (as ComfyUI's `SD15.latent_rgb_factors`): a preview
# without a VAE call. Random-weight models make colourful noise through it; trained ones a blurry thumbnail.
SD_LATENT_RGB = np.array(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    dtype=np.float32,
)


class Cancelled(Exception):
    """Raised by an `on_event` callback to stop its request; `generate` re-raises it and caches nothing."""


@dataclass(frozen=True)
class CacheEvent:
    """The cache answered: ``hit`` and ``skipped_steps`` (K) of ``steps`` (N); ``similarity`` to the best cached
    prompt (None when no search ran); ``reason`` the lookup's outcome (e.g. "hit", "below_threshold", "bypass")."""

    hit: bool
    skipped_steps: int
    steps: int
    similarity: float | None
    reason: str

    def to_json(self) -> dict:
        similarity = None if self.similarity is None or math.isnan(self.similarity) else round(self.similarity, 6)
        return {"event": "cache", "hit": self.hit, "skipped_steps": self.skipped_steps, "steps": self.steps,
                "similarity": similarity, "reason": self.reason}  # fmt: skip


@dataclass(frozen=True)
class StepEvent:
    """Step ``step`` of ``steps`` has run (1-based over the whole schedule: a hit at K reports K+1 … N).
    ``latent`` is x after that step, ``[1, C, h, w]`` fp32 in scheduler space; do not modify it."""

    step: int
    steps: int
    latent: torch.Tensor

    def to_json(self) -> dict:
        return {"event": "progress", "step": self.step, "steps": self.steps}


EventCallback = Callable[[CacheEvent | StepEvent], object]


def latent_preview(latent: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[h, w, 3]`` RGB of a 4-channel SD latent ``[1, 4, h, w]`` or ``[4, h, w]`` (scheduler space) by
    :data:`SD_LATENT_RGB`: one 4×3 matrix product per pixel (≈ 0.1 ms at 64×64), 1/8 of the image's size."""
    array = latent.detach().to("cpu", torch.float32).numpy() if isinstance(latent, torch.Tensor) else latent
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"latent_preview takes one latent, got batch {array.shape[0]}")
        array = array[0]
    if array.ndim != 3 or array.shape[0] != SD_LATENT_RGB.shape[0]:
        raise ValueError(f"latent_preview needs a [1, 4, h, w] SD latent, got shape {list(np.shape(latent))}")
    rgb = np.einsum("chw,cr->hwr", array, SD_LATENT_RGB)
    return ((rgb + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
