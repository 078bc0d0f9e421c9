"""The request path, independent of Triton: encode → embed → look up → resume at K → denoise → decode ∥ admit.

Stages follow docs/architecture.md, "How a request flows". Sub-model calls go through a `SubModels` adapter (torch
in-process here; onnxruntime or Triton BLS when served), so the same code runs in tests, in the benchmark and
inside the BLS model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nirvana.addons.registry import AddOnRegistry, AddOns
from nirvana.cache.client import CacheClient
from nirvana.cache.outcome import Lookup, Reason
from nirvana.checkpoint import Checkpoint, load_checkpoint
from nirvana.config import EngineConfig
from nirvana.denoise import (
    ResumeState,
    decode,
    denoise,
    initial_latent,
    make_scheduler,
    tokenize_prompts,
)
from nirvana.dit.conditioning import family_conditioning
from nirvana.embed import Embedder, make_embedder
from nirvana.progress import CacheEvent, EventCallback, StepEvent
from nirvana.request import GenerationRequest, validate_request
from nirvana.runtime.torch_dit import in_process_models
from nirvana.runtime.torch_runtime import TorchSubModels
from nirvana.schedulers import resolve_scheduler
from nirvana.service_time import LoadBoard, ServiceTimes
from nirvana.submodels import SubModels

if TYPE_CHECKING:
    from transformers import BatchEncoding

log = logging.getLogger(__name__)
NO_ADDONS = AddOns()


class NonFiniteError(RuntimeError):
    """The model produced NaN or infinity (e.g. an fp16 engine that overflowed); nothing of it was cached."""


@dataclass
class GenerationResult:
    image: np.ndarray  # uint8 [H, W, 3]
    cache_hit: bool
    skipped_steps: int
    similarity: float  # of the best cached prompt; NaN when no search ran
    matched_prompt: str | None
    reason: Reason  # why it hit or missed; BYPASS or REFRESH when CACHE_MODE skipped the lookup
    steps: int
    admitted: int  # latents saved by this request
    non_finite: int = 0  # runs of this request that produced NaN/inf (their latents were never cached)
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Text-to-image with approximate caching. Thread-safe for concurrent `generate` calls."""

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: Checkpoint | None = None,
        models: SubModels | None = None,
        embedder: Embedder | None = None,
        cache: CacheClient | None = None,
        service: ServiceTimes | None = None,
        served_adapters: object = None,
        served_controlnets: Any = None,
        denoiser: Callable[..., Any] | None = None,
    ) -> None:
        """Served, the orchestrator passes its BLS ``models``, ``cache`` client, the server's ``service`` times, and
        clients of the `adapters`, ControlNet and step-scheduler models (``denoiser``: runs the loops of requests
        without add-ons; default `nirvana.denoise.denoise`, here)."""
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config, self.denoiser = config, denoiser or denoise
        self.checkpoint = checkpoint or load_checkpoint(config.checkpoint)
        self.models = models or in_process_models(self.checkpoint)
        self.embedder = embedder or make_embedder(config.embedder, self.checkpoint)
        self.scheduler_name = resolve_scheduler(config.scheduler, self.checkpoint.scheduler_config)
        in_process = isinstance(self.models, TorchSubModels)  # add-ons are checked before the cache is opened
        self.addons = AddOnRegistry(config, self.checkpoint, in_process, served_adapters, served_controlnets)
        # served: a client of the one `cache` model; in process: the cache itself
        if cache is None:  # in-process: this process owns Milvus. Served, `cache` is the BLS client of the `cache`
            # model, and the orchestrators never load pymilvus (nor the pandas it imports).
            from nirvana.cache.factory import open_cache

            cache = open_cache(config.cache, self.embedder.dim)
        self.cache = cache
        # memoised (it builds a scheduler and hashes its config), bounded: each guidance a client sends is a key
        self._base_keys = functools.lru_cache(maxsize=256)(self._base_key)
        self._empty_uncond: torch.Tensor | None = None  # text embedding of the empty negative prompt [1, L, D]
        # SDXL, SD 3 and FLUX: their text encoders, added inputs and guidance (None: SD 1.x/2.x, encoded here)
        self._family = family_conditioning(self.checkpoint, self.models)
        # side calls: MiniLM beside the text encoder, admission beside the VAE decode
        self._side_calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nirvana-side")
        # served: the board the server's stubs share; in process: this pipeline's own
        self._own_board = None if service is not None else LoadBoard.private()
        self.service = service or ServiceTimes(self._own_board)

    # -- validation ---------------------------------------------------------------------------------
    def request(self, prompt: str, **options: object) -> GenerationRequest:
        """Fill defaults and validate every field (`nirvana.request.validate_request`); raises RequestError naming
        the field and value."""
        return validate_request(self.config, prompt, **options)  # type: ignore[arg-type]

    def cache_key(self, steps: int, guidance: float, addons: AddOns = NO_ADDONS) -> str:
        """Latents are only reusable under the same checkpoint, scheduler, resolution, steps and guidance (and for
        SDXL the same micro-conditioning, for SD 3 and FLUX the same T5 length and image token count; with add-ons
        the same adapter files and scales, ControlNet and image)."""
        base = self._base_keys(steps, round(guidance, 4))
        if addons == NO_ADDONS:
            return base
        # Not memoised: every control image is a key of its own, and the memo must stay bounded.
        parts = {"base": base, **addons.key_parts(self.addons.adapters)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def _base_key(self, steps: int, guidance: float) -> str:
        scheduler = make_scheduler(self.scheduler_name, self.checkpoint.scheduler_config)
        parts = {
            "checkpoint": self.checkpoint.fingerprint,
            "scheduler": [
                type(scheduler).__name__,
                {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            ],
            "resolution": list(self.checkpoint.image_size),
            "steps": steps,
            "guidance": round(guidance, 4),
        }
        if self._family is not None:  # not for SD 1.x/2.x, so the keys of caches already on disk stay valid
            parts.update(self._family.key_parts())
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    # -- the request path ---------------------------------------------------------------------------
    def generate(self, prompt: str, on_event: EventCallback | None = None, **options: object) -> GenerationResult:
        """Generate one image; options as in `request()`: negative_prompt, seed, steps, guidance, cache_mode, tenant,
        lora (``"name:scale,…"``), controlnet + control_image + controlnet_scale (`nirvana.addons.registry`).

        ``on_event`` (`nirvana.progress`) gets a CacheEvent once the cache has answered, then a StepEvent after each
        denoising step; raising `Cancelled` from it stops the request with nothing admitted."""
        req = self.request(prompt, **options)  # type: ignore[arg-type]
        addons = self.addons.resolve(req)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        key = self.cache_key(req.steps, req.guidance, addons)
        models = self.addons.unet_models(self.models, addons, timings)
        embeddings, added_cond, vector = self._encode(req, timings)
        cfg, added_cond = (
            (req.guidance, None) if self._family is None else self._family.loop_guidance(req.guidance, added_cond)
        )
        if req.cache_mode == "auto":
            lookup = self.cache.lookup(vector, key, req.tenant, req.steps)
            timings.update(lookup.timings_ms)
        else:
            lookup = Lookup(False, Reason(req.cache_mode))  # bypass or refresh: no lookup
        start = self._resume_state(lookup, req)
        if on_event is not None:
            on_event(CacheEvent(lookup.hit, lookup.k, req.steps, lookup.similarity, str(lookup.reason)))
        admit_ks = self.cache.selector.admit_ks(req.steps) if not lookup.hit and req.cache_mode != "bypass" else []
        scheduler = make_scheduler(self.scheduler_name, self.checkpoint.scheduler_config)
        generator = torch.Generator().manual_seed(req.seed)
        latent = None if start else initial_latent(self._latent_shape(), generator, scheduler, num_steps=req.steps)
        with self.service.track(req.steps - (start.step if start else 0)) as loop:
            # K is known now: the rest is forecast from this replica's step costs and the requests beside it
            predicted = loop.predict((time.perf_counter() - t_start) * 1e3, admits=bool(admit_ks))
            result = _timed(
                timings,
                "unet_ms",
                self.denoiser,
                loop.models(models),
                scheduler,
                req.steps,
                embeddings,
                cfg,
                generator=generator,
                latent=latent,
                start=start,
                capture_at=admit_ks,
                on_step=None if on_event is None else lambda i, x: on_event(StepEvent(i + 1, req.steps, x)),
                added_cond=added_cond,
                control=addons.control,
            )
        admission = None
        if admit_ks and _finite(result.latent):
            # Admission needs the captured states, not the image: it runs beside the VAE decode.
            admission = self._admit_beside(req, vector, key, result.captured)
        scale, shift = self.checkpoint.scaling_factor, self.checkpoint.shift_factor
        pixels = _timed(timings, "decode_ms", decode, self.models, result.latent, scale, shift)
        admitted = 0 if admission is None else self._admitted(admission, timings)
        if not (_finite(result.latent) and _finite(pixels)):
            if lookup.hit:  # the cached start may be what broke it: run the request in full, uncached
                return self._retry_uncached(req, lookup, on_event)
            cached = f"its {admitted} finite latents were cached" if admitted else "nothing was cached"
            raise NonFiniteError(
                f"the model produced non-finite values (NaN/inf) for this request ({req.steps} steps, guidance "
                f"{req.guidance}); {cached}. An fp16 engine overflowing does this: build it in fp32."
            )
        end = time.perf_counter()
        timings["total_ms"] = (end - t_start) * 1e3
        self.service.learn_after(bool(admit_ks), (end - loop.loop_end) * 1e3)
        if predicted is not None:
            timings["predicted_total_ms"] = predicted
        return GenerationResult(
            image=(pixels * 255).round().clip(0, 255).astype(np.uint8),
            cache_hit=lookup.hit,
            skipped_steps=lookup.k,
            similarity=float("nan") if lookup.similarity is None else lookup.similarity,
            matched_prompt=lookup.matched_prompt,
            reason=lookup.reason,
            steps=req.steps,
            admitted=admitted,
            timings_ms=timings,
        )

    def _admit_beside(
        self, req: GenerationRequest, vector: np.ndarray, key: str, captured: dict[int, ResumeState]
    ) -> Future[tuple[int, float]]:
        """Start admitting a miss's captured states on a side thread; the future gives (admitted, call ms)."""
        # Never cache a non-finite latent: a later hit would serve it to other requests.
        states = {k: s.to_arrays() for k, s in captured.items() if _finite(s.latent)}
        meta = {"negative_prompt": req.negative_prompt}
        replace = req.cache_mode == "refresh"

        def admit() -> tuple[int, float]:
            t0 = time.perf_counter()
            admitted = self.cache.admit(req.prompt, vector, key, req.tenant, states, replace=replace, meta=meta)
            return admitted, (time.perf_counter() - t0) * 1e3

        return self._side_calls.submit(admit)

    @staticmethod
    def _admitted(admission: Future[tuple[int, float]], timings: dict[str, float]) -> int:
        """Wait for it. `admit_ms`: the wait after the decode (its cost on the response path); `admit_call_ms`."""
        t0 = time.perf_counter()
        admitted, timings["admit_call_ms"] = admission.result()
        timings["admit_ms"] = (time.perf_counter() - t0) * 1e3
        return admitted

    def _encode(
        self, req: GenerationRequest, timings: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, np.ndarray | None]:
        """Text conditioning ``[2, L, D]`` ``[uncond, cond]`` (one text-encoder call; FLUX: ``[cond]``), the family's
        added conditioning (None for SD 1.x/2.x) and the retrieval vector ``[dim]`` (None when bypassing: nothing is
        looked up or admitted).

        The model's own CLIP embedder pools the vector from the cond row of that same pass (SDXL: its pooled
        ``text_embeds``; SD 3, FLUX: ``pooled_projections``); any other (MiniLM) makes its own model call,
        overlapped with the text encoder's.
        """
        own_call = None
        if req.cache_mode != "bypass" and not self.embedder.pools_from_conditioning:
            # MiniLM's own model call needs nothing from the text encoder's: the two run at once.
            own_call = self._side_calls.submit(self.embedder.embed_one, req.prompt)
        added_cond = None
        if self._family is not None:
            encode = self._family.encode
            embeddings, added_cond = _timed(timings, "text_encode_ms", encode, req.prompt, req.negative_prompt)
        else:
            tokens = tokenize_prompts(self.checkpoint.tokenizer, req.prompt, req.negative_prompt)
            embeddings = _timed(timings, "text_encode_ms", self._conditioning, tokens, bool(req.negative_prompt))
        if req.cache_mode == "bypass":
            return embeddings, added_cond, None
        t0 = time.perf_counter()  # embed_ms: what retrieval adds after the text encoder (its hidden part excluded)
        if own_call is not None:
            vector = own_call.result()
        elif added_cond is not None:
            vector = self.embedder.embed_from_pooled(added_cond[self._family.pooled_key][-1:])[0]
        else:
            vector = self.embedder.embed_from_hidden(embeddings[1:], tokens.input_ids[1:])[0]
        timings["embed_ms"] = (time.perf_counter() - t0) * 1e3
        return embeddings, added_cond, vector

    def _conditioning(self, tokens: BatchEncoding, has_negative: bool) -> torch.Tensor:
        """``[uncond, cond]`` in one text-encoder call. Without a negative prompt (the usual request) the uncond row
        is the same for every request: encoded once, alone, and kept; the call then carries the prompt's row only.
        Each row's batch is thus fixed by the request, so a request's image never depends on what ran before it."""
        if has_negative:
            return self.models.encode_text(tokens.input_ids, tokens.attention_mask)
        if self._empty_uncond is None:  # concurrent first requests may both encode it: the same value either way
            self._empty_uncond = self.models.encode_text(tokens.input_ids[:1], tokens.attention_mask[:1])
        cond = self.models.encode_text(tokens.input_ids[1:], tokens.attention_mask[1:])
        return torch.cat([self._empty_uncond.to(cond.device), cond])

    def _retry_uncached(
        self, req: GenerationRequest, lookup: Lookup, on_event: EventCallback | None
    ) -> GenerationResult:
        log.warning("a hit on %r (K=%d) made NaN/inf: entry dropped, run uncached", lookup.matched_prompt, lookup.k)
        if lookup.entry_id is not None:  # its next similar request must not meet the same latent
            self.cache.invalidate(lookup.entry_id, req.tenant)
        fields = ("negative_prompt", "seed", "steps", "guidance", "tenant", "lora", "controlnet", "control_image")
        fields += ("controlnet_scale",)
        # on_event hears it as a second cache event ("bypass") and steps from 1 again
        retried = self.generate(req.prompt, on_event, cache_mode="bypass", **{f: getattr(req, f) for f in fields})
        retried.reason, retried.non_finite = Reason.NON_FINITE, retried.non_finite + 1
        return retried

    def _resume_state(self, lookup: Lookup, req: GenerationRequest) -> ResumeState | None:
        if not lookup.hit or lookup.arrays is None:
            return None
        state = ResumeState.from_arrays(lookup.arrays, lookup.k)
        same_conditioning = lookup.matched_prompt == req.prompt and lookup.meta.get("negative_prompt") == (
            req.negative_prompt
        )
        if same_conditioning:
            return state  # same conditioning: the saved scheduler state is exactly what resuming needs
        return state.for_new_prompt(self.config.cache.resume_history)

    def _latent_shape(self) -> tuple[int, int, int, int]:
        h, w = self.checkpoint.latent_size
        return (1, self.checkpoint.latent_channels, h, w)

    def close(self) -> None:
        self._side_calls.shutdown(wait=True)
        if self._own_board is not None:
            self._own_board.close()
        self.addons.close()
        self.cache.close()


def _finite(values: torch.Tensor | np.ndarray) -> bool:
    return bool(torch.isfinite(torch.as_tensor(values)).all())


def _timed(timings: dict[str, float], name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[name] = (time.perf_counter() - t0) * 1e3
