"""What a stream of distinct LoRA sets may cost: scales on a grid, a bound on sets in line for a load, a bound on how
long a requester waits, eviction that keeps sets in steady use, and the loader model's door (no token, no load)."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
from tests.test_lora_onnx import _Models

from nirvana.addons.lora import AdapterError, format_adapters, parse_adapters, quantize_scale
from nirvana.addons.variant_pool import (
    TOKEN_DIGEST,
    TOKEN_PARAMETER,
    VARIANT_FILES,
    LoaderModel,
    LoadTimeout,
    PoolBusy,
    VariantPool,
)
from nirvana.config import AdaptersConfig, ConfigError, load_config

KNOWN = {"ink", "glow"}


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("ink:0.80001", "ink:0.8"),
        ("ink:0.8", "ink:0.8"),
        ("ink:0.824", "ink:0.8"),
        ("ink:0.826", "ink:0.85"),
        ("ink", "ink:1.0"),
        ("glow:0.05,ink:1.99", "glow:0.05,ink:2.0"),
    ],
)
def test_scales_are_rounded_to_the_grid_and_the_text_says_so(text: str, canonical: str) -> None:
    adapters = parse_adapters(text, KNOWN)
    assert format_adapters(adapters) == canonical
    assert parse_adapters(canonical, KNOWN) == adapters  # the canonical text reads back as the same set


def test_a_scale_that_rounds_to_zero_is_refused_naming_the_grid() -> None:
    with pytest.raises(AdapterError, match=r"rounds to 0 on the 0\.05 grid"):
        parse_adapters("ink:0.01", KNOWN)
    assert parse_adapters("ink:0.3", KNOWN, step=0.25) == (("ink", 0.25),)
    assert len({parse_adapters(f"ink:{0.8 + i * 1e-4}", KNOWN) for i in range(200)}) <= 2
    assert quantize_scale(0.15000000000000002) == 0.15


def test_adapters_config_fields_and_their_defaults() -> None:
    adapters = AdaptersConfig()
    assert (adapters.scale_step, adapters.max_pending_loads, adapters.load_wait_s) == (0.05, 4, 30.0)
    assert load_config({"checkpoint": "x", "adapters": {"scale_step": 0.1}}).adapters.scale_step == 0.1
    for bad in ({"scale_step": 0.03}, {"scale_step": 0.07}, {"max_pending_loads": 0}, {"load_wait_s": 0}):
        with pytest.raises(ConfigError, match="adapters"):
            load_config({"checkpoint": "x", "adapters": bad})


def _ask(pool: VariantPool, key: str) -> tuple[threading.Event, dict]:
    answered, got = threading.Event(), {}
    pool.request(key, lambda name, err: (got.update(name=name, err=err, at=time.monotonic()), answered.set()))
    return answered, got


def test_sets_beyond_the_pending_bound_are_refused_at_once_and_loaded_sets_still_answer() -> None:
    models = _Models()
    models.gate.set()
    pool = VariantPool(models.load, models.unload, max_loaded=4, max_pending=2)
    assert _ask(pool, "warm")[0].wait(5)
    models.gate.clear()  # every later load hangs until the gate opens
    waiting = [_ask(pool, key) for key in ("a", "b")]
    start = time.monotonic()
    answered, got = _ask(pool, "c")  # a third distinct set in line: over the bound
    assert answered.is_set() and isinstance(got["err"], PoolBusy) and time.monotonic() - start < 0.1
    assert "adapters.max_pending_loads=2" in str(got["err"])
    answered, got = _ask(pool, "a")  # a set already in line joins its load: no new slot needed
    assert not answered.is_set()
    answered, got = _ask(pool, "warm")  # a loaded set answers at once, loads in line or not
    assert answered.is_set() and got["name"] == "model_warm"
    models.gate.set()
    assert all(event.wait(5) for event, _ in waiting)
    assert pool.refused == 1 and pool.pending() == 0
    pool.close()


def test_a_requester_waits_at_most_wait_s_and_the_load_goes_on() -> None:
    models = _Models()
    pool = VariantPool(models.load, models.unload, max_loaded=2, max_pending=2, wait_s=0.3)
    start = time.monotonic()
    answered, got = _ask(pool, "slow")
    assert answered.wait(5) and isinstance(got["err"], LoadTimeout)
    assert 0.25 <= got["at"] - start < 2 and "adapters.load_wait_s" in str(got["err"])
    models.gate.set()  # the load finishes after its requester gave up; the next request finds the set loaded
    deadline = time.monotonic() + 5
    while pool.loaded() != ["slow"] and time.monotonic() < deadline:
        time.sleep(0.01)
    answered, got = _ask(pool, "slow")
    assert answered.is_set() and got["name"] == "model_slow" and pool.timeouts == 1
    pool.close()


def test_one_off_sets_evict_each_other_not_the_sets_in_steady_use() -> None:
    models = _Models()
    models.gate.set()
    pool = VariantPool(models.load, models.unload, max_loaded=3)
    for key in ("a", "b", "a", "b"):  # two sets in steady use
        assert _ask(pool, key)[0].wait(5)
    for key in ("churn1", "churn2", "churn3"):  # a stream of one-off sets: each loads, each is the next's victim
        assert _ask(pool, key)[0].wait(5)
    pool.close()
    assert sorted(pool.loaded()) == ["a", "b", "churn3"]
    assert models.unloaded == ["model_churn1", "model_churn2"]


class _Tensor:
    def __init__(self, value: str) -> None:
        self._value = np.array([value.encode()], dtype=np.object_)

    def as_numpy(self) -> np.ndarray:
        return self._value


class _Request:
    def __init__(self, parameters: dict, **inputs: str) -> None:
        self._parameters, self.inputs = json.dumps(parameters), {k: _Tensor(v) for k, v in inputs.items()}

    def parameters(self) -> str:
        return self._parameters


class _FakePb:
    """What LoaderModel uses of triton_python_backend_utils."""

    class TritonError:
        INTERNAL, UNAVAILABLE = "INTERNAL", "UNAVAILABLE"

        def __init__(self, message: str, code: str = "INTERNAL") -> None:
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None) -> None:
            self.output_tensors, self.error = output_tensors, error

    def __init__(self) -> None:
        self.loaded: list[tuple[str, dict, dict]] = []
        self.unloaded: list[str] = []

    @staticmethod
    def get_input_tensor_by_name(request: _Request, name: str):
        return request.inputs.get(name)

    @staticmethod
    def Tensor(name: str, value: np.ndarray):
        return name, value

    def load_model(self, model_name: str, config: str, files: dict) -> None:
        self.loaded.append((model_name, json.loads(config), files))

    def unload_model(self, model_name: str) -> None:
        self.unloaded.append(model_name)


def _loader(token: str) -> tuple[LoaderModel, _FakePb]:
    model, pb = LoaderModel(), _FakePb()
    model.pb = pb
    model._digest = hashlib.sha256(token.encode()).hexdigest()
    return model, pb


NAME = "unet_lora_0123456789abcdef"
CONFIG = json.dumps({"name": NAME, "backend": "python"})


@pytest.mark.parametrize("parameters", [{}, {TOKEN_PARAMETER: ""}, {TOKEN_PARAMETER: "guess"}, {"other": "t" * 43}])
def test_the_loader_model_refuses_a_request_without_the_token_before_reading_it(parameters: dict) -> None:
    model, pb = _loader("t" * 43)
    [response] = model.execute([_Request(parameters, ACTION="load", NAME=NAME, KIND="onnx", CONFIG=CONFIG)])
    assert response.error.code == "UNAVAILABLE" and response.error.message == "permission denied"
    assert pb.loaded == [] and pb.unloaded == []


def test_the_loader_model_loads_only_set_models_with_its_own_model_files() -> None:
    token = "t" * 43
    model, pb = _loader(token)
    good = {TOKEN_PARAMETER: token}
    [response] = model.execute([_Request(good, ACTION="load", NAME=NAME, KIND="onnx", CONFIG=CONFIG)])
    assert response.error is None and pb.loaded == [(NAME, {"name": NAME, "backend": "python"}, pb.loaded[0][2])]
    assert pb.loaded[0][2] == {"file:1/model.py": VARIANT_FILES["onnx"].encode()}
    refused = [
        dict(ACTION="load", NAME="nirvana", KIND="onnx", CONFIG=CONFIG),  # not a set model's name
        dict(ACTION="load", NAME=NAME, KIND="mine", CONFIG=CONFIG),  # no model.py of the caller's
        dict(ACTION="load", NAME=NAME, KIND="onnx", CONFIG=json.dumps({"name": "other", "backend": "python"})),
        dict(ACTION="load", NAME=NAME, KIND="onnx", CONFIG=json.dumps({"name": NAME, "backend": "onnxruntime"})),
        dict(ACTION="drop", NAME=NAME),
    ]
    for inputs in refused:
        [response] = model.execute([_Request(good, **inputs)])
        assert response.error is not None and response.error.code == "INTERNAL", inputs
    [response] = model.execute([_Request(good, ACTION="unload", NAME=NAME)])
    assert response.error is None and pb.unloaded == [NAME] and len(pb.loaded) == 1
    assert TOKEN_DIGEST == "loader_token_sha256"
