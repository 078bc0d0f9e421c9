"""Where BLS asks sub-models to deliver their outputs: a GPU placement we cannot cause on this CPU machine, so the
requests the orchestrator builds are recorded by a stand-in for `triton_python_backend_utils` and checked."""

from __future__ import annotations

import types

import pytest
import torch

from nirvana.runtime.bls import BlsError, BlsSubModels

GPU, CPU = "gpu", "cpu"


class _Tensor:
    def __init__(self, name: str, value: torch.Tensor) -> None:
        self.name, self.value = name, value

    @classmethod
    def from_dlpack(cls, name: str, value: torch.Tensor) -> _Tensor:
        return cls(name, value)

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(self.value)


def _fake_pb(outputs: dict[str, torch.Tensor], fail: bool = False):
    asked: list[tuple[str, tuple]] = []

    class Request:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory, parameters=None) -> None:
            self.model, self.memory = model_name, preferred_memory
            self.inputs = {t.name: t.value for t in inputs}

        def exec(self):
            asked.append((self.model, self.memory))
            if fail:
                raise RuntimeError("shared memory region exhausted")
            return types.SimpleNamespace(has_error=lambda: False)

    pb = types.SimpleNamespace(
        Tensor=_Tensor,
        InferenceRequest=Request,
        PreferredMemory=lambda kind, index: (kind, index),
        TRITONSERVER_MEMORY_CPU=CPU,
        TRITONSERVER_MEMORY_GPU=GPU,
        get_output_tensor_by_name=lambda response, name: _Tensor(name, outputs[name]),
    )
    return pb, asked


def test_only_the_text_conditioning_is_delivered_to_the_gpu() -> None:
    outputs = {
        "last_hidden_state": torch.zeros(1, 77, 32),
        "noise_pred": torch.zeros(2, 4, 16, 16),
        "image": torch.zeros(1, 3, 64, 64),
    }
    pb, asked = _fake_pb(outputs)
    models = BlsSubModels(pb, conditioning_device="cuda:0")
    models.encode_text(torch.zeros(1, 77, dtype=torch.int64))
    models.unet(torch.zeros(2, 4, 16, 16), torch.tensor(981.0), torch.zeros(2, 77, 32))
    models.decode(torch.zeros(1, 4, 16, 16))
    assert asked == [("text_encoder", (GPU, 0)), ("unet", (CPU, 0)), ("vae_decoder", (CPU, 0))]


def test_the_tensorrt_image_gets_every_output_in_host_memory() -> None:
    pb, asked = _fake_pb({"last_hidden_state": torch.zeros(1, 77, 32)})
    BlsSubModels(pb).encode_text(torch.zeros(1, 77, dtype=torch.int64))  # CPU torch there: no DLPack from a GPU
    assert asked == [("text_encoder", (CPU, 0))]


def test_a_stub_failure_becomes_a_bls_error_naming_the_model() -> None:
    pb, _ = _fake_pb({}, fail=True)
    with pytest.raises(BlsError, match=r"'vae_decoder' could not be called.*shared memory"):
        BlsSubModels(pb).decode(torch.zeros(1, 4, 16, 16))
