"""The orchestrator's end of the step scheduler: a LoRA set's job names the set's UNet model, and when that model went
away mid-loop the request's loop runs in the orchestrator from its start, giving what the loop gives there."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from nirvana.denoise import DenoiseResult, denoise, make_scheduler
from nirvana.handoff import encode_final
from nirvana.runtime.bls import BlsError
from nirvana.runtime.bls_denoiser import BlsDenoiser, SchedulerFull

FIRST = "unet_lora_" + "a" * 16


class _Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self._name, self._value = name, value

    def as_numpy(self) -> np.ndarray:
        return self._value


def _fake_pb(answers: list) -> tuple[types.SimpleNamespace, list[dict]]:
    """Each `exec(decoupled=True)` pops the next answer: an error message, or (event, tensors) bytes."""
    jobs: list[dict] = []

    class Response:
        def __init__(self, error: str | None = None, outputs: dict | None = None) -> None:
            self._error, self.outputs = error, outputs or {}

        def has_error(self) -> bool:
            return self._error is not None

        def error(self):
            code = "UNAVAILABLE" if self._error.startswith("step scheduler full") else "INTERNAL"
            return types.SimpleNamespace(message=lambda: self._error, code=lambda: code)

    class Request:
        def __init__(self, model_name, requested_output_names, inputs, parameters=None) -> None:
            self.header = json.loads(bytes(inputs[0].as_numpy().reshape(-1)[0]))

        def exec(self, decoupled: bool = False):
            assert decoupled
            jobs.append(self.header)
            answer = answers.pop(0)
            if isinstance(answer, str):
                return iter([Response(error=answer)])
            event, blob = answer
            arrays = {"EVENT": np.array([event], dtype=np.object_), "TENSORS": np.array([blob], dtype=np.object_)}
            return iter([Response(outputs=arrays), Response()])

    pb = types.SimpleNamespace(
        InferenceRequest=Request,
        Tensor=_Tensor,
        TritonError=types.SimpleNamespace(UNAVAILABLE="UNAVAILABLE"),
        get_output_tensor_by_name=lambda response, name: (
            _Tensor(name, response.outputs[name]) if name in response.outputs else None
        ),
    )
    return pb, jobs


class _SetModels:
    """The orchestrator's sub-models bound to a LoRA set (`BlsSubModels.with_unet`), as the denoiser sees them; its
    own UNet steps (the fallback loop) return a fixed fraction of the sample."""

    def __init__(self) -> None:
        self.unet_model, self.steps_here, self.observed_steps = FIRST, 0, []

    def unet(self, sample, timestep, text, added_cond=None) -> torch.Tensor:
        self.steps_here += 1
        return sample * 0.1

    def observed(self, sharing: int, ms: float) -> None:
        self.observed_steps.append((sharing, ms))


def _call(denoiser, models, tiny_checkpoint, seed: int = 3) -> DenoiseResult:
    scheduler = make_scheduler("ddim", tiny_checkpoint.scheduler_config)
    embeddings = torch.zeros(2, tiny_checkpoint.text_max_length, tiny_checkpoint.text_hidden_size)
    latent = torch.ones(1, 4, 16, 16)
    generator = torch.Generator().manual_seed(seed)
    return denoiser(models, scheduler, 4, embeddings, 7.5, generator=generator, latent=latent, capture_at=iter([2]))


def test_a_sets_job_names_its_model_and_a_scheduler_answer_is_used_as_it_is(tiny_checkpoint) -> None:
    final = encode_final(DenoiseResult(torch.ones(1, 4, 16, 16), {}, 4), [(1, 5.0)] * 4)
    pb, jobs = _fake_pb([final])
    models = _SetModels()
    result = _call(BlsDenoiser(pb), models, tiny_checkpoint)
    assert [(job["unet_model"], job["capture_at"]) for job in jobs] == [(FIRST, [2])]
    assert torch.equal(result.latent, torch.ones(1, 4, 16, 16)) and len(models.observed_steps) == 4
    assert models.steps_here == 0


def test_when_the_sets_model_went_away_the_loop_runs_here_from_its_start(tiny_checkpoint) -> None:
    pb, jobs = _fake_pb([f"denoising failed: model '{FIRST}' is not found"])
    models = _SetModels()
    result = _call(BlsDenoiser(pb), models, tiny_checkpoint)
    here = _call(denoise, _SetModels(), tiny_checkpoint)  # what the orchestrator's own loop gives
    assert len(jobs) == 1 and models.steps_here == 4  # one guidance pair per step, run here
    assert torch.equal(result.latent, here.latent) and set(result.captured) == set(here.captured) == {2}


def test_a_base_unet_job_that_fails_is_an_error(tiny_checkpoint) -> None:
    pb, jobs = _fake_pb(["denoising failed: RuntimeError: boom"])
    with pytest.raises(BlsError, match="boom"):
        _call(BlsDenoiser(pb), types.SimpleNamespace(), tiny_checkpoint)  # no unet_model: the base UNet
    assert [job["unet_model"] for job in jobs] == [None]


def test_a_full_scheduler_is_a_retryable_refusal_and_never_a_fallback_loop(tiny_checkpoint) -> None:
    pb, jobs = _fake_pb(["step scheduler full: 256 loops held"])
    models = _SetModels()  # a LoRA set's job: a lost model would fall back; a full scheduler must not
    with pytest.raises(SchedulerFull, match="256 loops held"):
        _call(BlsDenoiser(pb), models, tiny_checkpoint)
    assert len(jobs) == 1 and models.steps_here == 0
