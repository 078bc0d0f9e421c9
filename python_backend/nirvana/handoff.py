"""A request's denoising loop handed to the step scheduler, and what comes back: the wire format of both ends.

The orchestrator keeps what is per request (encode, cache lookup, K, decode, admission); the step scheduler
(`nirvana.serving.scheduler_model`) runs the loop. A job is a JSON header (`JOB`) and one safetensors blob of
tensors (`TENSORS`); so is each answer (`EVENT`, `TENSORS`): a step event when the job asked for them, then the
final latent and the states captured for admission.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from nirvana.addons.controlnet import MAX_CONTROL_SCALE
from nirvana.contract.controlnet import CONTROLNET_PREFIX, UNET_CONTROL_MODEL, controlnet_model
from nirvana.contract.specs import SpecError
from nirvana.denoise import DenoiseResult, ResumeState

__all__ = [
    "DenoiseJob",
    "HandoffError",
    "JobControl",
    "decode_final",
    "decode_job",
    "decode_step",
    "encode_final",
    "encode_job",
    "encode_step",
]


class HandoffError(ValueError):
    """A job or an answer that is not in this format; the message names the field."""


# The UNet models a job may name: LoRA sets' models as `nirvana.addons.lora_onnx.variant_name` makes them (on `unet` or
# `unet_control`), and with a ControlNet the `unet_control` model itself.
UNET_MODEL_NAME = re.compile(r"unet_lora_[0-9a-f]{16}")
CONTROL_UNET_NAME = re.compile(rf"{UNET_CONTROL_MODEL}|{UNET_MODEL_NAME.pattern}")


@dataclass(frozen=True)
class JobControl:
    """A job's ControlNet: the `controlnet_<name>` model that gives the residuals at every step, the request's
    prepared control image ``[1, 3, H, W]`` and its conditioning scale."""

    model: str
    image: torch.Tensor = field(repr=False)
    scale: float


@dataclass
class DenoiseJob:
    """Everything the loop needs (`nirvana.denoise.denoise`'s arguments), by value."""

    job_id: str
    scheduler: str  # a `nirvana.schedulers` name; the step scheduler builds it from the checkpoint's config
    steps: int
    guidance: float
    embeddings: torch.Tensor  # [2, L, D] = [uncond, cond]
    generator_state: torch.Tensor  # uint8: the request's CPU generator after x_T was drawn
    latent: torch.Tensor | None = None  # x_T, or None when resuming
    start: ResumeState | None = None
    capture_at: list[int] = field(default_factory=list)
    added_cond: dict[str, torch.Tensor] | None = None  # SDXL
    events: bool = False  # answer a step event (with the latent) after each step
    unet_model: str | None = None  # a LoRA set's UNet model (`UNET_MODEL_NAME`); None: the base UNet
    control: JobControl | None = None  # with a ControlNet, `unet_model` is `unet_control` or its LoRA set's model


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    return save_tensors({name: np.ascontiguousarray(a) for name, a in arrays.items()}) if arrays else b""


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    try:
        return load_tensors(bytes(blob)) if blob else {}
    except Exception as err:  # safetensors has its own error types for a malformed header
        raise HandoffError(f"TENSORS: not a safetensors blob ({type(err).__name__})") from None


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").numpy()


def encode_job(job: DenoiseJob) -> tuple[bytes, bytes]:
    header = {
        "op": "denoise",
        "id": job.job_id,
        "scheduler": job.scheduler,
        "steps": job.steps,
        "guidance": job.guidance,
        "capture_at": sorted(job.capture_at),
        "events": job.events,
        "start_step": None if job.start is None else job.start.step,
        "unet_model": job.unet_model,
        "control": None if job.control is None else {"model": job.control.model, "scale": job.control.scale},
    }
    arrays = {"embeddings": _np(job.embeddings.float()), "generator_state": _np(job.generator_state)}
    if job.latent is not None:
        arrays["latent"] = _np(job.latent.float())
    if job.start is not None:
        arrays |= {f"start/{name}": a for name, a in job.start.to_arrays().items()}
    arrays |= {f"added/{name}": _np(t.float()) for name, t in (job.added_cond or {}).items()}
    if job.control is not None:
        arrays["control/image"] = _np(job.control.image.float())
    return json.dumps(header).encode(), _pack(arrays)


def decode_job(header: dict, blob: bytes) -> DenoiseJob:
    arrays = _unpack(blob)
    for name in ("embeddings", "generator_state"):
        if name not in arrays:
            raise HandoffError(f"TENSORS: no {name!r}")
    start = None
    if header.get("start_step") is not None:
        state = {k.removeprefix("start/"): a for k, a in arrays.items() if k.startswith("start/")}
        start = ResumeState.from_arrays(state, int(header["start_step"]))
    added = {k.removeprefix("added/"): torch.from_numpy(a) for k, a in arrays.items() if k.startswith("added/")}
    control = _control(header.get("control"), arrays.get("control/image"))
    unet_model = header.get("unet_model")
    names = UNET_MODEL_NAME if control is None else CONTROL_UNET_NAME
    if (unet_model is not None or control is not None) and not (
        isinstance(unet_model, str) and names.fullmatch(unet_model)
    ):
        raise HandoffError(f"unet_model={str(unet_model)[:80]!r}: not a UNet model for this job ({names.pattern})")
    return DenoiseJob(
        job_id=str(header["id"]),
        scheduler=str(header["scheduler"]),
        steps=int(header["steps"]),
        guidance=float(header["guidance"]),
        embeddings=torch.from_numpy(arrays["embeddings"]),
        generator_state=torch.from_numpy(arrays["generator_state"]),
        latent=torch.from_numpy(arrays["latent"]) if "latent" in arrays else None,
        start=start,
        capture_at=[int(k) for k in header.get("capture_at", [])],
        added_cond=added or None,
        events=bool(header.get("events", False)),
        unet_model=unet_model,
        control=control,
    )


def _control(header: object, image: np.ndarray | None) -> JobControl | None:
    """The job's ControlNet, checked: a `controlnet_<name>` model, a scale in [0, MAX_CONTROL_SCALE], an image."""
    if header is None:
        return None
    if not isinstance(header, dict) or not isinstance(header.get("model"), str):
        raise HandoffError(f"control={str(header)[:80]!r}: not {{model, scale}}")
    model, scale = header["model"], header.get("scale")
    try:
        if not model.startswith(CONTROLNET_PREFIX):
            raise SpecError(model)
        controlnet_model(model.removeprefix(CONTROLNET_PREFIX))  # the folder-name rule
    except SpecError:
        raise HandoffError(f"control.model={model[:80]!r}: not a ControlNet model (controlnet_<name>)") from None
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 <= scale <= MAX_CONTROL_SCALE:
        raise HandoffError(f"control.scale={scale!r}: not in [0, {MAX_CONTROL_SCALE}]")
    if image is None or image.ndim != 4 or image.shape[:2] != (1, 3) or image.dtype != np.float32:
        raise HandoffError(f"TENSORS: control/image {None if image is None else image.shape}: not float32 [1, 3, H, W]")
    return JobControl(model, torch.from_numpy(image), float(scale))


def encode_final(result: DenoiseResult, step_ms: list[tuple[int, float]]) -> tuple[bytes, bytes]:
    """The final answer: the latent, the captured states ("captured/<K>/<name>") and, per step run, (requests in the
    iteration, ms from hand-in to result) so the orchestrator's cost model learns from the loop it did not run."""
    arrays = {"latent": _np(result.latent)}
    for k, state in result.captured.items():
        arrays |= {f"captured/{k}/{name}": a for name, a in state.to_arrays().items()}
    header = {"event": "final", "steps_run": result.steps_run, "step_ms": step_ms}
    return json.dumps(header).encode(), _pack(arrays)


def decode_final(header: dict, blob: bytes) -> tuple[DenoiseResult, list[tuple[int, float]]]:
    arrays = _unpack(blob)
    if "latent" not in arrays:
        raise HandoffError("TENSORS: the final answer has no 'latent'")
    grouped: dict[int, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        if key.startswith("captured/"):
            _, k, name = key.split("/", 2)
            grouped.setdefault(int(k), {})[name] = array
    captured = {k: ResumeState.from_arrays(state, k) for k, state in grouped.items()}
    result = DenoiseResult(torch.from_numpy(arrays["latent"]), captured, int(header["steps_run"]))
    return result, [(int(n), float(ms)) for n, ms in header.get("step_ms", [])]


def encode_step(i: int, latent: torch.Tensor) -> tuple[bytes, bytes]:
    """A step event: step ``i`` (0-based) has run, ``latent`` is x after it (for previews)."""
    return json.dumps({"event": "step", "i": i}).encode(), _pack({"latent": _np(latent)})


def decode_step(header: dict, blob: bytes) -> tuple[int, torch.Tensor]:
    arrays = _unpack(blob)
    if "latent" not in arrays:
        raise HandoffError("TENSORS: the step event has no 'latent'")
    return int(header["i"]), torch.from_numpy(arrays["latent"])
