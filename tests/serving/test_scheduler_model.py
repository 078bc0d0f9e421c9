"""How the step scheduler runs the UNet on an iteration's rows: in process (the repository's ONNX file) or as the
`unet` model through BLS (what a TensorRT plan needs)."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
import torch

from nirvana.contract.specs import submodel_specs
from nirvana.handoff import DenoiseJob, encode_job
from nirvana.runtime.bls import credential_parameters, use_credential
from nirvana.runtime.onnx_runtime import OnnxModel
from nirvana.serving import scheduler_model
from nirvana.serving.scheduler_model import unet_runner
from nirvana_export.onnx_export import export_submodel


class _Tensor:
    """pb_utils.Tensor as BLS call sites use it: a name, a value, DLPack both ways."""

    def __init__(self, name, value) -> None:
        self.name, self.value = name, value

    @classmethod
    def from_dlpack(cls, name, value):
        return cls(name, value)

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(self.value)


def _rows(checkpoint, rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    return {
        "sample": torch.randn(rows, 4, 16, 16, generator=generator),
        "timestep": torch.linspace(981, 1, rows),  # one per row: requests are at different steps
        "encoder_hidden_states": torch.randn(rows, checkpoint.text_max_length, checkpoint.text_hidden_size),
    }


def test_session_runner_runs_the_repositorys_onnx_file_on_stacked_rows(tiny_checkpoint, tmp_path) -> None:
    spec = submodel_specs(tiny_checkpoint)["unet"]
    export_submodel(tiny_checkpoint, spec, tmp_path / "unet" / "1" / "model.onnx")
    run = unet_runner("session", tmp_path, tiny_checkpoint, {"intra_op_threads": "1"}, None)
    rows = _rows(tiny_checkpoint, 6)
    reference = OnnxModel(tmp_path / "unet" / "1" / "model.onnx", 1).run({k: v.numpy() for k, v in rows.items()})
    assert torch.equal(run(rows), torch.from_numpy(reference["noise_pred"]))  # the same file, the same rows


def test_bls_runner_sends_rows_as_the_batched_unet_config_takes_them_with_the_credential(tiny_checkpoint) -> None:
    sent: list = []

    class Request:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory, parameters=None) -> None:
            sent.append((model_name, {t.name: t.value for t in inputs}, parameters))

        def exec(self):
            return types.SimpleNamespace(has_error=lambda: False)

    noise = torch.ones(4, 4, 16, 16)
    pb = types.SimpleNamespace(
        InferenceRequest=Request,
        Tensor=_Tensor,
        PreferredMemory=lambda kind, index: (kind, index),
        TRITONSERVER_MEMORY_CPU="cpu",
        get_output_tensor_by_name=lambda response, name: _Tensor(name, noise),
    )
    use_credential("s" * 32)
    try:
        run = unet_runner("bls", None, tiny_checkpoint, {}, pb)
        assert torch.equal(run(_rows(tiny_checkpoint, 4)), noise)
        (model, inputs, parameters), *_ = sent
        assert model == "unet" and inputs["timestep"].shape == (4, 1) and parameters == credential_parameters()
    finally:
        use_credential(None)
    with pytest.raises(ValueError, match="unet_runner='engine'"):
        unet_runner("engine", None, tiny_checkpoint, {}, pb)


def test_loops_beyond_the_bound_are_refused_at_once_as_unavailable(monkeypatch) -> None:
    """Triton queues nothing for the step scheduler (no dynamic batcher), so it bounds the loops it holds itself:
    one more job is answered UNAVAILABLE at once, and a loop that ends makes room again."""
    monkeypatch.setattr(scheduler_model, "MAX_HELD", 2)
    answers: list = []

    class Sender:
        def send(self, response=None, flags=0) -> None:
            answers.append(response)

    class Request:
        def __init__(self, job_id: str) -> None:
            job = DenoiseJob(job_id, "ddim", 4, 7.5, torch.zeros(2, 3, 4), torch.Generator().get_state())
            self.tensors = dict(zip(("JOB", "TENSORS"), encode_job(job), strict=True))

        def get_response_sender(self) -> Sender:
            return Sender()

    class Error:
        UNAVAILABLE, INVALID_ARG = "UNAVAILABLE", "INVALID_ARG"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    pb = types.SimpleNamespace(
        TritonError=Error,
        InferenceResponse=lambda error: error,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
        get_input_tensor_by_name=lambda r, name: types.SimpleNamespace(
            as_numpy=lambda: np.array([r.tensors[name]], dtype=object)
        ),
    )
    submitted: list = []
    model = scheduler_model.TritonPythonModel()
    model.pb, model.gate = pb, types.SimpleNamespace(refusal=lambda request: None)
    model._cancelled, model._lock = {}, threading.Lock()
    model.workers = types.SimpleNamespace(submit=lambda fn, job, sender, cancelled: submitted.append(job.job_id))
    model.execute([Request("a"), Request("b"), Request("c")])
    assert submitted == ["a", "b"]
    (refused,) = answers
    assert refused.code == "UNAVAILABLE" and "2 loops held" in refused.message
    model._cancelled.pop("a")  # loop a ended
    model.execute([Request("d")])
    assert submitted == ["a", "b", "d"] and len(answers) == 1
    model._cancelled.pop("d")
    model.execute([Request("b")])  # an id already held: refused, the held one untouched
    assert submitted == ["a", "b", "d"] and answers[-1].code == "INVALID_ARG" and "already held" in answers[-1].message


@pytest.mark.parametrize("memory", ["cpu", "gpu"])
def test_control_rows_run_the_controlnet_once_and_hand_its_residuals_to_the_unet_untouched(tiny_checkpoint, memory):
    from nirvana.serving.scheduler_control import ControlRunner

    sent: list = []
    noise = torch.ones(4, 4, 16, 16)

    class Request:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory, parameters=None) -> None:
            self.outputs = requested_output_names
            sent.append((model_name, {t.name: t for t in inputs}, preferred_memory))

        def exec(self):
            found = {n: _Tensor(n, noise if n == "noise_pred" else f"residual {n}") for n in self.outputs}
            return types.SimpleNamespace(has_error=lambda: False, found=found)

    pb = types.SimpleNamespace(
        InferenceRequest=Request,
        Tensor=_Tensor,
        PreferredMemory=lambda kind, index: kind,
        TRITONSERVER_MEMORY_CPU="cpu",
        TRITONSERVER_MEMORY_GPU="gpu",
        get_output_tensor_by_name=lambda response, name: response.found[name],
    )
    rows = _rows(tiny_checkpoint, 4) | {
        "controlnet_cond": torch.rand(4, 3, 64, 64),
        "conditioning_scale": torch.tensor([1.0, 1.0, 0.5, 0.5]),  # two requests, two scales
    }
    result = ControlRunner(pb, tiny_checkpoint, memory)("controlnet_edges", "unet_control", rows)
    assert torch.equal(result, noise)
    (control, control_inputs, control_memory), (unet, unet_inputs, unet_memory) = sent
    assert (control, unet, control_memory, unet_memory) == ("controlnet_edges", "unet_control", memory, "cpu")
    assert control_inputs["conditioning_scale"].value.shape == (4, 1)
    residuals = [name for name in unet_inputs if name not in ("sample", "timestep", "encoder_hidden_states")]
    assert residuals and all(unet_inputs[n].value == f"residual {n}" for n in residuals)  # Triton's, not copies
    assert "controlnet_cond" not in unet_inputs and unet_inputs["timestep"].value.shape == (4, 1)
