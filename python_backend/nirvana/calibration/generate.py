"""Prompt pairs generated as the server serves them: B uncached, and B resumed from A's latent at each candidate K.

For each pair (cached prompt A, new prompt B, one seed):

1. A is generated uncached with its state captured before every candidate step K (what admission stores);
2. B is generated uncached from the same x_T (same seed): the reference image;
3. B is generated from A's state at each K, stored as the latent store stores it (float16 by default) and reset
   for a new prompt (``ResumeState.for_new_prompt("reset")``), running steps K..N-1 with B's conditioning —
   exactly what the server does on a hit.

Pairs run in batches (embeddings ``[uncond×B, cond×B]``, latents ``[B, ...]``) through ``nirvana.denoise``, the
engine's own loop; ``tests/quality/test_evaluate.py`` checks that a batch gives the images one-by-one generation
gives. Used by ``nirvana calibrate --workload`` and by the research harness (``nirvana_quality.evaluate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from nirvana.cache.latent_codec import CODECS, roundtrip
from nirvana.checkpoint import Checkpoint
from nirvana.denoise import denoise, encode_prompts, initial_latent, make_scheduler
from nirvana.dit.conditioning import family_conditioning
from nirvana.k_choice import scale_k
from nirvana.runtime.torch_dit import in_process_models
from nirvana.schedulers import resolve_scheduler

__all__ = ["DEFAULT_BATCH", "DEFAULT_KS", "DEFAULT_STEPS", "PairGenerator", "PairImages", "PairSettings", "default_ks"]

DEFAULT_STEPS = 20
DEFAULT_KS = (2, 4, 6, 8, 10, 12, 14, 16)  # at DEFAULT_STEPS; scaled for other step counts
DEFAULT_BATCH = 16
_IMAGE_PROCESSOR = VaeImageProcessor()  # the one nirvana.denoise.decode uses (default config)


def default_ks(steps: int) -> tuple[int, ...]:
    """:data:`DEFAULT_KS` scaled from 20 to ``steps`` denoising steps (distinct, ascending)."""
    return tuple(sorted({scale_k(k, steps, DEFAULT_STEPS) for k in DEFAULT_KS} - {0}))


def stored_as(latents: torch.Tensor, codec: str) -> torch.Tensor:
    """A batch of latents ``[B, C, h, w]`` as the latent store gives each back (one blob per request) under
    ``codec``."""
    rows = [torch.from_numpy(roundtrip(row[None].detach().cpu().numpy(), codec)) for row in latents]
    return torch.cat(rows).to(latents.device)


@dataclass(frozen=True)
class PairSettings:
    """Generation settings shared by every pair: N, the candidate Ks (steps skipped), guidance, batch size."""

    steps: int = DEFAULT_STEPS
    ks: tuple[int, ...] = DEFAULT_KS
    guidance: float = 7.5
    batch_size: int = DEFAULT_BATCH
    scheduler: str = "auto"
    latent_dtype: str = "float16"  # as the server's latent store keeps them (cache.latent_dtype)

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        bad = [k for k in self.ks if not 0 < k < self.steps]
        if not self.ks or bad or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks={list(self.ks)}: need distinct Ks in [1, {self.steps - 1}] (steps={self.steps})")
        if not self.guidance > 1.0:  # denoise() drops the unconditional half at g <= 1, which a batch cannot
            raise ValueError(f"guidance must be > 1, got {self.guidance}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.latent_dtype not in CODECS:
            raise ValueError(f"latent_dtype must be one of {CODECS}, got {self.latent_dtype!r}")
        object.__setattr__(self, "ks", tuple(sorted(int(k) for k in self.ks)))


@dataclass
class PairImages:
    """uint8 ``[B, H, W, 3]`` images of a batch of pairs: A and B uncached, B cached at each K."""

    cached_source: np.ndarray
    uncached: np.ndarray
    cached: dict[int, np.ndarray]


class PairGenerator:
    """Generates batches of pairs with the engine's own denoise/decode, as the server would serve them."""

    def __init__(self, checkpoint: Checkpoint, settings: PairSettings) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.models = in_process_models(checkpoint)
        # SDXL, SD 3, FLUX: their text encoders, added inputs and guidance, as `Pipeline.generate` uses them
        self._family = family_conditioning(checkpoint, self.models)
        self.scheduler_name = resolve_scheduler(settings.scheduler, checkpoint.scheduler_config)
        if self.scheduler_name == "euler_a":  # one generator per batch would not give each pair its own noise
            raise ValueError("scheduler 'euler_a' draws noise in every step; evaluate with ddim, euler or dpmpp")

    def _embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``[2B, L, D]`` = ``[uncond×B, cond×B]`` (FLUX: ``[cond×B]``), each row as the request path builds it for
        one prompt, and the family's added inputs in the same row order (None for SD 1.x/2.x)."""
        if self._family is None:
            rows = [encode_prompts(self.checkpoint.tokenizer, self.models, p) for p in prompts]
            return _by_row(rows), None
        encoded = [self._family.encode(p) for p in prompts]
        added = {name: _by_row([a[name] for _, a in encoded]) for name in encoded[0][1]}
        return _by_row([text for text, _ in encoded]), added

    def _images(self, latent: torch.Tensor) -> np.ndarray:
        """Final latents ``[B, C, h, w]`` → uint8 ``[B, H, W, 3]``: ``denoise.decode`` on a batch, then
        ``Pipeline.generate``'s rounding."""
        shift = self.checkpoint.shift_factor or 0.0  # SD 3, FLUX
        pixels = _IMAGE_PROCESSOR.postprocess(
            self.models.decode(latent / self.checkpoint.scaling_factor + shift), output_type="np"
        )
        return (pixels * 255).round().clip(0, 255).astype(np.uint8)

    def _denoise(self, conditioning: tuple, seeds: Sequence[int], **kwargs) -> object:
        scheduler = make_scheduler(self.scheduler_name, self.checkpoint.scheduler_config)
        generator = torch.Generator().manual_seed(int(seeds[0]))  # DDIM (eta=0) never draws from it
        embeddings, added = conditioning
        scale = self.settings.guidance
        if self._family is not None:
            scale, added = self._family.loop_guidance(scale, added)
        return denoise(
            self.models,
            scheduler,
            self.settings.steps,
            embeddings,
            scale,
            generator=generator,
            added_cond=added,
            **kwargs,
        )

    def x_t(self, seeds: Sequence[int]) -> torch.Tensor:
        """``[B, C, h, w]`` initial latents, each drawn from its own seed exactly as ``Pipeline.generate`` does."""
        h, w = self.checkpoint.latent_size
        shape = (1, self.checkpoint.latent_channels, h, w)
        rows = []
        for seed in seeds:
            scheduler = make_scheduler(self.scheduler_name, self.checkpoint.scheduler_config)
            rows.append(
                initial_latent(
                    shape, torch.Generator().manual_seed(int(seed)), scheduler, num_steps=self.settings.steps
                )
            )
        return torch.cat(rows)

    def generate(self, cached_prompts: Sequence[str], new_prompts: Sequence[str], seeds: Sequence[int]) -> PairImages:
        x_t = self.x_t(seeds)
        source = self._denoise(self._embeddings(cached_prompts), seeds, latent=x_t, capture_at=self.settings.ks)
        new_embeddings = self._embeddings(new_prompts)
        reference = self._denoise(new_embeddings, seeds, latent=x_t)
        cached = {}
        for k in self.settings.ks:
            start = source.captured[k].for_new_prompt("reset")  # what the server does on a hit
            # ... after a round trip through the latent store's dtype
            start.latent = stored_as(start.latent, self.settings.latent_dtype)
            cached[k] = self._images(self._denoise(new_embeddings, seeds, start=start).latent)
        return PairImages(self._images(source.latent), self._images(reference.latent), cached)


def _by_row(rows: list[torch.Tensor]) -> torch.Tensor:
    """One request's rows each (``[uncond, cond]`` or ``[cond]``) → ``[uncond×B, cond×B]``: row i of every request,
    then row i + 1, as ``denoise`` reads a batch of B latents."""
    return torch.cat([torch.cat([r[i : i + 1] for r in rows]) for i in range(rows[0].shape[0])])
