"""Schedulers that can resume at step K, by name: the registry, and building one from a checkpoint's config.

Only schedulers whose whole between-step state a :class:`nirvana.denoise.ResumeState` can carry are registered;
the rest (PNDM, LMS) are refused with the names that would work. The transformer (flow-matching) families run
``flow_euler`` only, and the UNet families never do: a UNet's prediction means nothing to a flow-matching step.
"""

from __future__ import annotations

import logging

import numpy as np
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

# Hidden keys (diffusers keeps "_"-prefixed config keys without passing them to __init__) the checkpoint loader adds
# to a flow-matching scheduler config: the image's token count (for a resolution-dependent shift) and whether the
# pipeline passes FLUX's linear sigmas.
IMAGE_SEQ_LEN, LINEAR_SIGMAS = "_image_seq_len", "_linear_sigmas"


class FlowMatchSchedule(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(N)`` makes the schedule its pipeline makes:
    FLUX's ``sigmas = linspace(1, 1/N, N)`` and, with dynamic shifting, ``mu`` from the image's token count
    (``calculate_shift``), as ``FluxPipeline``/``StableDiffusion3Pipeline.__call__`` pass them. So every caller
    (the in-process loop, the served step scheduler, calibration) gets the same timesteps from N alone."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        config = self.config
        if sigmas is None and timesteps is None and config.get(LINEAR_SIGMAS):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if mu is None and config.use_dynamic_shifting:
            seq = config.get(IMAGE_SEQ_LEN)
            if seq is None:
                raise ValueError("a dynamically shifted flow-matching schedule needs the image's token count")
            mu = calculate_shift(
                seq, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
            )
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


__all__ = [
    "SCHEDULERS",
    "UNET_SCHEDULERS",
    "UnsupportedSchedulerError",
    "check_resumable",
    "make_scheduler",
    "resolve_scheduler",
    "scheduler_name",
]
log = logging.getLogger(__name__)
FALLBACK_SCHEDULER = "dpmpp"

# Schedulers whose whole between-step state a ResumeState can carry.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "flow_euler": FlowMatchSchedule,
}
# The transformer families' schedulers, by the class name their checkpoint folders save.
_FLOW = {"FlowMatchEulerDiscreteScheduler": "flow_euler"}
# The schedulers a UNet checkpoint can run.
UNET_SCHEDULERS = tuple(name for name in SCHEDULERS if name not in _FLOW.values())
# Config under which a registered scheduler's state would not fit a ResumeState (fresh noise in every step).
_REFUSED = {"flow_euler": {"stochastic_sampling": True}}
# Config a registered name implies on top of the checkpoint's scheduler config.
_CONFIG_OVERRIDES: dict[str, dict] = {"dpmpp": {"algorithm_type": "dpmsolver++"}}


class UnsupportedSchedulerError(ValueError):
    """The scheduler cannot be resumed at step K (or the name is unknown); the message lists the supported names."""


def _supported(flow: bool = False) -> str:
    """The names a checkpoint of this kind can run (flow matching: `flow_euler`; a UNet: the others)."""
    return ", ".join(repr(name) for name in (_FLOW.values() if flow else UNET_SCHEDULERS))


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Registry name of ``scheduler`` ("ddim", "euler", "euler_a", "dpmpp", "flow_euler"); raises if it is not
    resumable."""
    detail = ""
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is not cls:
            continue
        refused = {k: v for k, v in _REFUSED.get(name, {}).items() if scheduler.config.get(k) == v}
        if refused:
            detail = " with " + ", ".join(f"{k}={v!r}" for k, v in refused.items())
            break
        overrides = _CONFIG_OVERRIDES.get(name, {})
        if all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
        detail = " with " + ", ".join(f"{k}={scheduler.config.get(k)!r}" for k in overrides)
    raise UnsupportedSchedulerError(
        f"{type(scheduler).__name__}{detail} cannot be resumed at step K (its between-step state is not cached); "
        f"use one of {_supported(isinstance(scheduler, FlowMatchEulerDiscreteScheduler))}"
    )


def check_resumable(scheduler: SchedulerMixin) -> None:
    """Raise :class:`UnsupportedSchedulerError` naming the class unless the scheduler is in the registry."""
    scheduler_name(scheduler)


def make_scheduler(name: str, base_config: dict) -> SchedulerMixin:
    """Build scheduler ``name`` from the checkpoint's ``scheduler_config``; "auto" keeps the checkpoint's class."""
    flow = base_config.get("_class_name") in _FLOW
    if name != "auto" and flow != (name in _FLOW.values()):
        kind = "a flow-matching (transformer) checkpoint" if flow else "a UNet checkpoint"
        allowed = list(_FLOW.values()) if flow else list(UNET_SCHEDULERS)
        raise UnsupportedSchedulerError(f"scheduler {name!r} cannot run {kind}; use 'auto' or one of {allowed}")
    if name == "auto" and flow:  # the checkpoint's own class: the same checks as a named one
        name = _FLOW[base_config["_class_name"]]
    if name == "auto":
        class_name = base_config.get("_class_name")
        for cls in SCHEDULERS.values():
            if cls.__name__ == class_name:
                scheduler = cls.from_config(base_config)
                check_resumable(scheduler)
                return scheduler
        raise UnsupportedSchedulerError(
            f"the checkpoint's scheduler {class_name} cannot be resumed at step K; choose one of {_supported()}"
        )
    if name not in SCHEDULERS:
        raise UnsupportedSchedulerError(f"unknown scheduler {name!r}; use 'auto' or one of {_supported(flow)}")
    scheduler = SCHEDULERS[name].from_config(base_config, **_CONFIG_OVERRIDES.get(name, {}))
    check_resumable(scheduler)  # e.g. flow matching with stochastic_sampling: refused at start, not at a miss
    return scheduler


def resolve_scheduler(name: str, base_config: dict) -> str:
    """Validate the scheduler once at start. `auto` keeps the checkpoint's own scheduler when it can resume at K;
    otherwise (SD 1.5 ships PNDM, which cannot) it falls back to DPM-Solver++ with a warning. A flow-matching
    checkpoint has no fallback: its one scheduler is refused with the reason."""
    try:
        make_scheduler(name, base_config)
    except UnsupportedSchedulerError as err:
        if name != "auto" or base_config.get("_class_name") in _FLOW:
            raise
        log.warning("%s; using scheduler=%r instead", err, FALLBACK_SCHEDULER)
        return FALLBACK_SCHEDULER
    return name
