"""Truncated denoising with classifier-free guidance: run steps K..N-1 from a cached state captured at step K.

The stages follow ``StableDiffusionPipeline.__call__`` (encode prompt → prepare latents → loop → decode) and
reproduce it exactly in fp32 when K = 0. Notation: x_t is the latent at timestep t, ε the UNet's noise
prediction, g the guidance scale, ε = ε(∅) + g·(ε(c) − ε(∅)).

The scheduler owns the timesteps: a resumed run calls ``set_timesteps(N)`` and starts at index K
(``set_begin_index(K)`` where the scheduler has it), never re-deriving timesteps. What a scheduler keeps
between steps must travel with the cached latent (:class:`ResumeState`): DPM-Solver++'s multistep history and,
for ancestral samplers, the random generator's state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import SchedulerMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import BatchEncoding, PreTrainedTokenizerBase

from nirvana.schedulers import (
    SCHEDULERS,
    UNET_SCHEDULERS,
    UnsupportedSchedulerError,
    check_resumable,
    make_scheduler,
    scheduler_name,
)
from nirvana.submodels import SubModels

if TYPE_CHECKING:
    from nirvana.addons.controlnet import Control

__all__ = [
    "SCHEDULERS",
    "UNET_SCHEDULERS",
    "DenoiseResult",
    "ResumeState",
    "ResumeStateError",
    "StepRangeError",
    "UnsupportedSchedulerError",
    "check_resumable",
    "decode",
    "denoise",
    "encode_prompts",
    "initial_latent",
    "make_scheduler",
    "scheduler_name",
    "tokenize_prompts",
]

# Samplers that draw fresh noise in step(): their generator state is part of the state at step K.
_STOCHASTIC = frozenset({"euler_a"})
_IMAGE_PROCESSOR = VaeImageProcessor()


class StepRangeError(ValueError):
    """A step index (resume or capture) lies outside the schedule."""


class ResumeStateError(ValueError):
    """A ResumeState does not fit the scheduler, or its arrays are incomplete."""


@dataclass
class ResumeState:
    """Everything needed to run steps K..N-1 of an N-step schedule with a fresh scheduler.

    ``latent`` is x before step K runs, ``[1, C, h, w]`` fp32 in scheduler space (not divided by the VAE
    scaling factor). ``model_outputs``/``lower_order_nums`` are DPM-Solver++'s multistep history (its x0
    predictions, ``[1, C, h, w]`` each); ``generator_state`` is the CPU generator's byte state for ancestral
    samplers. Fields a scheduler does not use stay None.
    """

    step: int
    latent: torch.Tensor
    model_outputs: list[torch.Tensor | None] | None = None
    lower_order_nums: int | None = None
    generator_state: torch.Tensor | None = field(default=None, repr=False)

    def for_new_prompt(self, history: str = "reset") -> ResumeState:
        """The state a DIFFERENT prompt resumes from.

        "reset" keeps only the latent: the multistep history is emptied (the next DPM step is first order) and
        the generator state dropped (the request's own generator draws the noise). "carry" keeps everything.
        """
        if history == "carry":
            return replace(self)
        if history != "reset":
            raise ResumeStateError(f"history must be 'reset' or 'carry', got {history!r}")
        return ResumeState(
            step=self.step,
            latent=self.latent,
            model_outputs=None if self.model_outputs is None else [None] * len(self.model_outputs),
            lower_order_nums=None if self.lower_order_nums is None else 0,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for the blob store: "latent", "num_model_outputs" + "model_output_<i>" (non-empty slots),
        "lower_order_nums" (int64 ``[1]``), "generator_state" (uint8). The step is kept by the caller."""
        arrays = {"latent": _to_numpy(self.latent)}
        if self.model_outputs is not None:
            arrays["num_model_outputs"] = np.array([len(self.model_outputs)], dtype=np.int64)
            for i, output in enumerate(self.model_outputs):
                if output is not None:
                    arrays[f"model_output_{i}"] = _to_numpy(output)
        if self.lower_order_nums is not None:
            arrays["lower_order_nums"] = np.array([self.lower_order_nums], dtype=np.int64)
        if self.generator_state is not None:
            arrays["generator_state"] = self.generator_state.numpy().astype(np.uint8, copy=True)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], step: int) -> ResumeState:
        """Inverse of :meth:`to_arrays` (exact for fp32)."""
        if "latent" not in arrays:
            raise ResumeStateError(f"resume arrays have no 'latent' (keys: {sorted(arrays)})")
        model_outputs = None
        if "num_model_outputs" in arrays:
            count = int(arrays["num_model_outputs"][0])
            model_outputs = [
                _from_numpy(arrays[f"model_output_{i}"]) if f"model_output_{i}" in arrays else None
                for i in range(count)
            ]
        lower = arrays.get("lower_order_nums")
        gen = arrays.get("generator_state")
        return cls(
            step=int(step),
            latent=_from_numpy(arrays["latent"]),
            model_outputs=model_outputs,
            lower_order_nums=None if lower is None else int(lower[0]),
            generator_state=None if gen is None else torch.from_numpy(np.array(gen, dtype=np.uint8)),
        )


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


@dataclass
class DenoiseResult:
    """``latent``: final x_0 ``[1, C, h, w]`` in scheduler space; ``captured``: states at the requested steps."""

    latent: torch.Tensor
    captured: dict[int, ResumeState]
    steps_run: int


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompt: str, negative_prompt: str = "") -> BatchEncoding:
    """``input_ids``/``attention_mask`` ``[2, L]`` int64 of ``[negative_prompt, prompt]``, both padded to
    ``L = model_max_length`` as ``StableDiffusionPipeline.encode_prompt`` pads them."""
    return tokenizer([negative_prompt or "", prompt], padding="max_length", truncation=True, return_tensors="pt")


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, models: SubModels, prompt: str, negative_prompt: str = ""
) -> torch.Tensor:
    """``[2, L, D]`` fp32 text embeddings ``[uncond, cond]``, as ``StableDiffusionPipeline.encode_prompt``.

    One text-encoder call for both rows, where diffusers makes two: on the tiny checkpoint (torch CPU fp32)
    the batch of 2 differs from two calls by at most 2.4e-7 (0 for most prompts).
    """
    tokens = tokenize_prompts(tokenizer, prompt, negative_prompt)
    return models.encode_text(tokens.input_ids, tokens.attention_mask)


def initial_latent(
    shape: tuple[int, ...], generator: torch.Generator, scheduler: SchedulerMixin, *, num_steps: int | None = None
) -> torch.Tensor:
    """x_T ``shape`` fp32 = N(0, I) · ``init_noise_sigma``; consumes ``generator`` exactly as the pipeline does.

    Euler's ``init_noise_sigma`` depends on the schedule, so ``set_timesteps`` must have run: pass ``num_steps``
    to run it here.
    """
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler.set_timesteps(N) has not run; pass num_steps=N")
    noise = randn_tensor(tuple(shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    # Flow matching starts from the noise itself (its schedulers have no init_noise_sigma).
    return noise * getattr(scheduler, "init_noise_sigma", 1.0)


def _check_steps(num_steps: int, start: ResumeState | None, capture_at: Iterable[int]) -> set[int]:
    if num_steps < 1:
        raise StepRangeError(f"num_steps must be ≥ 1, got {num_steps}")
    first = 0 if start is None else start.step
    if start is not None and not 0 < first < num_steps:
        raise StepRangeError(f"resume step {first} is outside 0 < K < num_steps={num_steps}")
    captures = {int(k) for k in capture_at}
    for k in sorted(captures):
        if not (0 < k < num_steps and k >= first):
            raise StepRangeError(f"capture step {k} is outside max(1, resume step {first}) ≤ K < {num_steps}")
    return captures


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator) -> dict:
    # As StableDiffusionPipeline.prepare_extra_step_kwargs: eta=0 and the generator, where step() accepts them.
    params = inspect.signature(scheduler.step).parameters
    wanted = {"eta": 0.0, "generator": generator}
    return {name: value for name, value in wanted.items() if name in params}


def _capture(scheduler: SchedulerMixin, latent: torch.Tensor, step: int, generator: torch.Generator) -> ResumeState:
    history = getattr(scheduler, "model_outputs", None)
    return ResumeState(
        step=step,
        latent=latent.clone(),
        model_outputs=None if history is None else [None if t is None else t.clone() for t in history],
        lower_order_nums=getattr(scheduler, "lower_order_nums", None),
        generator_state=generator.get_state() if scheduler_name(scheduler) in _STOCHASTIC else None,
    )


def _restore(scheduler: SchedulerMixin, start: ResumeState, generator: torch.Generator) -> None:
    if start.model_outputs is not None:
        slots = getattr(scheduler, "model_outputs", None)
        if slots is None or len(slots) != len(start.model_outputs):
            raise ResumeStateError(
                f"state at step {start.step} carries {len(start.model_outputs)} model outputs; "
                f"{type(scheduler).__name__} keeps {None if slots is None else len(slots)}"
            )
        scheduler.model_outputs = [None if t is None else t.clone() for t in start.model_outputs]
    if start.lower_order_nums is not None:
        scheduler.lower_order_nums = start.lower_order_nums
    if start.generator_state is not None:
        generator.set_state(start.generator_state)


def denoise(
    models: SubModels,
    scheduler: SchedulerMixin,
    num_steps: int,
    embeddings: torch.Tensor,
    guidance_scale: float,
    *,
    generator: torch.Generator,
    latent: torch.Tensor | None = None,
    start: ResumeState | None = None,
    capture_at: Iterable[int] = (),
    on_step: Callable[[int, torch.Tensor], object] | None = None,
    added_cond: dict[str, torch.Tensor] | None = None,
    control: Control | None = None,
) -> DenoiseResult:
    """Run an N-step schedule from x_T (``latent``) or from ``start`` (steps K..N-1 only), with CFG.

    ``embeddings`` ``[2, L, D]`` = ``[uncond, cond]`` (a batch of B latents: ``[uncond×B, cond×B]``; FLUX: the cond
    rows only, run at g = 1); guidance applies when g > 1 (else only the cond rows are used, as
    in the pipeline). ``generator`` is the CPU generator the pipeline would pass to ``step()``; resuming an
    ancestral sampler overwrites its state with ``start.generator_state``. States before each step in
    ``capture_at`` are returned cloned. ``on_step(i, x)`` runs after step i (0-based) with x after it; what it
    raises (e.g. ``nirvana.progress.Cancelled``) ends the loop there. SDXL: ``added_cond`` to every UNet call;
    ``control.residuals(x_in, t, text)`` gives a ControlNet's residuals for each UNet call
    (``nirvana.addons.controlnet``).
    """
    captures = _check_steps(num_steps, start, capture_at)
    if (latent is None) == (start is None):
        raise ValueError("pass exactly one of latent (x_T, see initial_latent) or start (a ResumeState)")
    if start is not None or captures:
        check_resumable(scheduler)

    # 1. Timesteps: owned by the scheduler; a resumed run starts at index K of the same schedule.
    scheduler.set_timesteps(num_steps)
    first = 0 if start is None else start.step
    if start is not None:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)  # after set_timesteps, which resets it
        _restore(scheduler, start, generator)
    x = (latent if start is None else start.latent).to(torch.float32).clone()

    # 2. Denoising loop.
    guided = guidance_scale > 1.0
    rows = x.shape[0]  # one per request here; a batch of B requests in calibration (rows [uncond×B, cond×B])
    text = embeddings if guided else embeddings[-rows:]
    added = {} if not added_cond else {"added_cond": {k: v if guided else v[-rows:] for k, v in added_cond.items()}}
    step_kwargs = _step_kwargs(scheduler, generator)
    captured: dict[int, ResumeState] = {}
    timesteps = scheduler.timesteps
    for i in range(first, len(timesteps)):
        t = timesteps[i]
        if i in captures:
            captured[i] = _capture(scheduler, x, i, generator)
        model_input = _scale(scheduler, torch.cat([x] * 2) if guided else x, t)
        timestep = t.expand(model_input.shape[0])
        extra = added if control is None else {**added, "residuals": control.residuals(model_input, timestep, text)}
        eps = models.unet(model_input, timestep, text, **extra)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step(i, x)
    return DenoiseResult(latent=x, captured=captured, steps_run=len(timesteps) - first)


def _scale(scheduler: SchedulerMixin, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Flow-matching schedulers feed the latent to the transformer unscaled (they have no scale_model_input).
    scale = getattr(scheduler, "scale_model_input", None)
    return model_input if scale is None else scale(model_input, t)


def decode(
    models: SubModels, latent: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> np.ndarray:
    """Final latent ``[1, C, h, w]`` (scheduler space) → image ``[H, W, 3]`` float32 in [0, 1], as the pipeline's
    ``image_processor.postprocess(output_type="np")``. SD 3 and FLUX's VAEs also shift: ``latent / s + shift``."""
    image = models.decode(latent / scaling_factor if shift_factor is None else latent / scaling_factor + shift_factor)
    return _IMAGE_PROCESSOR.postprocess(image, output_type="np")[0]
