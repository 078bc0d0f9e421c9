"""Schedulers that can resume at step K, by name: the registry, and building one from a checkpoint's config.

Only schedulers whose whole between-step state a :class:`nirvana.denoise.ResumeState` can carry are registered;
the rest (PNDM, LMS) are refused with the names that would work.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
)

__all__ = ["SCHEDULERS", "UnsupportedSchedulerError", "check_resumable", "make_scheduler", "scheduler_name"]

# Schedulers whose whole between-step state a ResumeState can carry.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}
# Config a registered name implies on top of the checkpoint's scheduler config.
_CONFIG_OVERRIDES: dict[str, dict] = {"dpmpp": {"algorithm_type": "dpmsolver++"}}


class UnsupportedSchedulerError(ValueError):
    """The scheduler cannot be resumed at step K (or the name is unknown); the message lists the supported names."""


def _supported() -> str:
    return ", ".join(repr(name) for name in SCHEDULERS)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Registry name of ``scheduler`` ("ddim", "euler", "euler_a", "dpmpp"); raises if it is not resumable."""
    detail = ""
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is not cls:
            continue
        overrides = _CONFIG_OVERRIDES.get(name, {})
        if all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
        detail = " with " + ", ".join(f"{k}={scheduler.config.get(k)!r}" for k in overrides)
    raise UnsupportedSchedulerError(
        f"{type(scheduler).__name__}{detail} cannot be resumed at step K (its between-step state is not cached); "
        f"use one of {_supported()}"
    )


def check_resumable(scheduler: SchedulerMixin) -> None:
    """Raise :class:`UnsupportedSchedulerError` naming the class unless the scheduler is in the registry."""
    scheduler_name(scheduler)


def make_scheduler(name: str, base_config: dict) -> SchedulerMixin:
    """Build scheduler ``name`` from the checkpoint's ``scheduler_config``; "auto" keeps the checkpoint's class."""
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
        raise UnsupportedSchedulerError(f"unknown scheduler {name!r}; use 'auto' or one of {_supported()}")
    return SCHEDULERS[name].from_config(base_config, **_CONFIG_OVERRIDES.get(name, {}))
