"""The orchestrator's end of the step scheduler: `nirvana.denoise.denoise`'s signature, the loop run by the
`step_scheduler` model (`nirvana.serving.scheduler_model`) over one decoupled BLS request."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from diffusers import SchedulerMixin

from nirvana.cache.wire import bytes_array
from nirvana.contract.controlnet import UNET_CONTROL_MODEL, controlnet_model
from nirvana.contract.specs import STEP_SCHEDULER_MODEL
from nirvana.denoise import DenoiseResult, ResumeState, denoise
from nirvana.handoff import DenoiseJob, JobControl, decode_final, decode_step, encode_job
from nirvana.progress import Cancelled
from nirvana.runtime.bls import BlsError, credential_parameters
from nirvana.runtime.decoupled import release_decoupled
from nirvana.schedulers import scheduler_name

if TYPE_CHECKING:
    from nirvana.addons.controlnet import Control

__all__ = ["BlsDenoiser", "SchedulerFull"]

log = logging.getLogger(__name__)


def _bytes_tensor(pb: Any, name: str, value: bytes) -> Any:
    return pb.Tensor(name, bytes_array(value))


def _one(pb: Any, response: Any, name: str) -> bytes | None:
    tensor = pb.get_output_tensor_by_name(response, name)
    return None if tensor is None else bytes(tensor.as_numpy().reshape(-1)[0])


class SchedulerFull(RuntimeError):
    """The step scheduler holds as many loops as it may (`scheduler_model.MAX_HELD`): the client may retry
    (UNAVAILABLE)."""


def _job_control(control: Control) -> JobControl:
    """The request's ControlNet as the step scheduler runs it: its served model, prepared image and scale."""
    return JobControl(controlnet_model(control.key[0]), control.image, control.scale)


class BlsDenoiser:
    """``denoiser(models, scheduler, steps, embeddings, guidance, generator=…, …)`` → `DenoiseResult`, as
    `nirvana.denoise.denoise`; `models` is asked which UNet model its steps go to (`unet_model`: a LoRA set's), to
    learn the step times (`observed`, `nirvana.service_time`), and runs the loop itself when the set's model went
    away mid-loop."""

    def __init__(self, pb_utils: Any, model: str = STEP_SCHEDULER_MODEL) -> None:
        self._pb, self._model = pb_utils, model

    def __call__(
        self,
        models: Any,
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
        job = DenoiseJob(
            job_id=uuid.uuid4().hex,
            scheduler=scheduler_name(scheduler),
            steps=num_steps,
            guidance=float(guidance_scale),
            embeddings=embeddings.detach().cpu(),
            generator_state=generator.get_state(),
            latent=latent,
            start=start,
            capture_at=list(capture_at),
            added_cond=None if added_cond is None else {k: v.detach().cpu() for k, v in added_cond.items()},
            events=on_step is not None,
            unet_model=getattr(models, "unet_model", None) if control is None else models.control_unet_model,
            control=None if control is None else _job_control(control),
        )
        try:
            result, step_ms = self._run(job, on_step)
        except BlsError as err:
            if job.unet_model in (None, UNET_CONTROL_MODEL):  # no LoRA set's model that could have gone away
                raise
            # The LoRA set's model was unloaded mid-loop (LRU: other sets needed the room). This request's loop
            # then runs here, a BLS call per step that loads the set again if it is gone again (`BlsSubModels`):
            # the generator went to the scheduler by value, so it starts from the same state and gives the same
            # image (a stream's step events start over).
            log.info("UNet model %s went away mid-loop (%s): the loop runs in the orchestrator", job.unet_model, err)
            return denoise(
                models,
                scheduler,
                num_steps,
                embeddings,
                guidance_scale,
                generator=generator,
                latent=latent,
                start=start,
                capture_at=job.capture_at,
                on_step=on_step,
                added_cond=added_cond,
                control=control,
            )
        observed = getattr(models, "observed", None)
        for sharing, ms in step_ms if observed is not None else ():
            observed(sharing, ms)
        return result

    def _request(self, header: bytes, blob: bytes | None) -> Any:
        pb = self._pb
        inputs = [_bytes_tensor(pb, "JOB", header)]
        if blob is not None:
            inputs.append(_bytes_tensor(pb, "TENSORS", blob))
        request = pb.InferenceRequest(
            model_name=self._model,
            requested_output_names=["EVENT", "TENSORS"],
            inputs=inputs,
            parameters=credential_parameters(),
        )
        try:
            return request.exec(decoupled=True)
        except Exception as err:
            raise BlsError(f"sub-model {self._model!r} could not be called: {type(err).__name__}: {err}") from err

    def _run(self, job: DenoiseJob, on_step: Callable | None) -> tuple[DenoiseResult, list]:
        pb = self._pb
        final, stopped = None, None
        responses = self._request(*encode_job(job))
        try:
            final, stopped = self._read(pb, job, responses, on_step)
        finally:
            release_decoupled(responses)  # before the responses go (`nirvana.runtime.decoupled`)
        if stopped is not None:
            raise stopped
        if final is None:
            raise BlsError(f"sub-model {self._model!r} ended the job without a final answer")
        return final

    def _read(self, pb: Any, job: DenoiseJob, responses: Any, on_step: Callable | None) -> tuple[Any, Any]:
        final, stopped = None, None
        for response in responses:
            if response.has_error():
                if stopped is not None:  # the scheduler's answer to our cancel
                    break
                error = response.error()
                busy = getattr(getattr(pb, "TritonError", None), "UNAVAILABLE", None)
                if busy is not None and hasattr(error, "code") and error.code() == busy:
                    raise SchedulerFull(error.message())  # not a BlsError: no fallback loop around the bound
                raise BlsError(f"sub-model {self._model!r} failed: {error.message()}")
            event = _one(pb, response, "EVENT")
            if event is None or stopped is not None:  # the flag-only last response, or steps after a cancel
                continue
            header, blob = json.loads(event), _one(pb, response, "TENSORS") or b""
            if header.get("event") == "final":
                final = decode_final(header, blob)
            elif on_step is not None:
                try:
                    on_step(*decode_step(header, blob))
                except Cancelled as err:  # stop the loop there: nothing more is computed for this request
                    stopped = err
                    self._cancel(job.job_id)
        return final, stopped

    def _cancel(self, job_id: str) -> None:
        responses = self._request(json.dumps({"op": "cancel", "id": job_id}).encode(), None)
        try:
            for _ in responses:
                pass
        finally:
            release_decoupled(responses)
