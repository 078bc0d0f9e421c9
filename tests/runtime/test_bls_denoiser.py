"""The orchestrator's end of the step scheduler: a LoRA set's job names the set's UNet model, and when that model was
unloaded mid-loop the job runs again, from its start, on the model loaded again."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from nirvana.denoise import DenoiseResult, make_scheduler
from nirvana.handoff import encode_final
from nirvana.runtime.bls import BlsError
from nirvana.runtime.bls_denoiser import BlsDenoiser

FIRST, SECOND = "unet_lora_" + "a" * 16, "unet_lora_" + "b" * 16


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
            return types.SimpleNamespace(message=lambda: self._error)

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
        get_output_tensor_by_name=lambda response, name: (
            _Tensor(name, response.outputs[name]) if name in response.outputs else None
        ),
    )
    return pb, jobs


class _SetModels:
    """The orchestrator's sub-models bound to a LoRA set (`BlsSubModels.with_unet`), as the denoiser sees them."""

    def __init__(self) -> None:
        self.unet_model, self.reloads, self.observed_steps = FIRST, 0, []

    def reload_unet(self) -> str:
        self.reloads += 1
        self.unet_model = SECOND
        return SECOND

    def observed(self, sharing: int, ms: float) -> None:
        self.observed_steps.append((sharing, ms))


def _call(denoiser: BlsDenoiser, models, tiny_checkpoint) -> DenoiseResult:
    scheduler = make_scheduler("ddim", tiny_checkpoint.scheduler_config)
    embeddings = torch.zeros(2, tiny_checkpoint.text_max_length, tiny_checkpoint.text_hidden_size)
    latent = torch.zeros(1, 4, 16, 16)
    return denoiser(models, scheduler, 4, embeddings, 7.5, generator=torch.Generator(), latent=latent)


def test_a_sets_job_names_its_model_and_runs_again_on_the_reloaded_model(tiny_checkpoint) -> None:
    final = encode_final(DenoiseResult(torch.ones(1, 4, 16, 16), {}, 4), [(1, 5.0)] * 4)
    pb, jobs = _fake_pb([f"model '{FIRST}' is not found", final])
    models = _SetModels()
    result = _call(BlsDenoiser(pb), models, tiny_checkpoint)
    assert [job["unet_model"] for job in jobs] == [FIRST, SECOND] and models.reloads == 1
    assert jobs[0]["id"] != jobs[1]["id"]  # a new job: the scheduler forgot the failed one
    assert torch.equal(result.latent, torch.ones(1, 4, 16, 16)) and len(models.observed_steps) == 4


def test_a_base_unet_job_is_not_retried_and_a_second_failure_is_raised(tiny_checkpoint) -> None:
    pb, jobs = _fake_pb(["denoising failed: RuntimeError: boom"])
    with pytest.raises(BlsError, match="boom"):
        _call(BlsDenoiser(pb), types.SimpleNamespace(), tiny_checkpoint)  # no unet_model: the base UNet
    assert [job["unet_model"] for job in jobs] == [None]
    pb, jobs = _fake_pb(["gone", "gone again"])
    with pytest.raises(BlsError, match="gone again"):
        _call(BlsDenoiser(pb), _SetModels(), tiny_checkpoint)
    assert len(jobs) == 2
