"""Bad input matrix over gRPC and HTTP: a clear error naming the field, the server stays ready, the cache unchanged."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import requests
from tritonclient.utils import InferenceServerException

from nirvana_client import GenerateOptions

pytestmark = pytest.mark.integration

STR, I64, I32, F32, F64 = "BYTES", "INT64", "INT32", "FP32", "FP64"
NP = {STR: np.object_, I64: np.int64, I32: np.int32, F32: np.float32, F64: np.float64}


def _t(value, datatype: str, shape=(1,)) -> tuple[np.ndarray, str]:
    return np.array(value, dtype=NP[datatype]).reshape(shape), datatype


OK_PROMPT = _t([b"a red fox"], STR)
# (case id, inputs, substrings the error must contain)
CASES = [
    ("missing-prompt", {"SEED": _t([1], I64)}, ["PROMPT"]),
    ("unknown-tensor", {"PROMPT": OK_PROMPT, "FOO": _t([1], I64)}, ["FOO"]),
    ("prompt-int", {"PROMPT": _t([5], I32)}, ["PROMPT"]),
    ("seed-float", {"PROMPT": OK_PROMPT, "SEED": _t([1.5], F32)}, ["SEED"]),
    ("steps-int64", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([20], I64)}, ["NUM_INFERENCE_STEPS"]),
    ("guidance-fp64", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([7.5], F64)}, ["GUIDANCE_SCALE"]),
    ("cache-mode-int", {"PROMPT": OK_PROMPT, "CACHE_MODE": _t([1], I32)}, ["CACHE_MODE"]),
    ("tenant-float", {"PROMPT": OK_PROMPT, "TENANT": _t([1.0], F32)}, ["TENANT"]),
    ("negative-int", {"PROMPT": OK_PROMPT, "NEGATIVE_PROMPT": _t([3], I64)}, ["NEGATIVE_PROMPT"]),
    ("prompt-empty", {"PROMPT": _t([b""], STR)}, ["PROMPT", "empty"]),
    ("prompt-blank", {"PROMPT": _t([b"   "], STR)}, ["PROMPT", "empty"]),
    ("prompt-10k", {"PROMPT": _t([b"x" * 10_000], STR)}, ["PROMPT", "10000 bytes"]),  # refused before decoding
    ("prompt-2001", {"PROMPT": _t([b"y" * 2001], STR)}, ["PROMPT", "2001 characters"]),
    ("prompt-not-utf8", {"PROMPT": _t([b"\xff\xfe fox"], STR)}, ["PROMPT", "UTF-8"]),
    ("prompt-nul", {"PROMPT": _t([b"fox\x00"], STR)}, ["PROMPT", "control"]),
    ("prompt-escape", {"PROMPT": _t([b"\x1b[31mred fox"], STR)}, ["PROMPT", "control"]),
    ("negative-10k", {"PROMPT": OK_PROMPT, "NEGATIVE_PROMPT": _t([b"n" * 10_000], STR)}, ["NEGATIVE_PROMPT"]),
    ("negative-not-utf8", {"PROMPT": OK_PROMPT, "NEGATIVE_PROMPT": _t([b"\xc3\x28"], STR)}, ["NEGATIVE_PROMPT"]),
    ("steps-0", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([0], I32)}, ["NUM_INFERENCE_STEPS=0"]),
    ("steps-negative", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([-5], I32)}, ["NUM_INFERENCE_STEPS=-5"]),
    ("steps-1", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([1], I32)}, ["NUM_INFERENCE_STEPS=1"]),
    ("steps-10000", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([10_000], I32)}, ["NUM_INFERENCE_STEPS=10000"]),
    ("steps-201", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([201], I32)}, ["NUM_INFERENCE_STEPS=201"]),
    ("guidance-nan", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([np.nan], F32)}, ["GUIDANCE_SCALE=nan"]),
    ("guidance-inf", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([np.inf], F32)}, ["GUIDANCE_SCALE=inf"]),
    ("guidance-negative", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([-1.0], F32)}, ["GUIDANCE_SCALE=-1.0"]),
    ("guidance-half", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([0.5], F32)}, ["GUIDANCE_SCALE=0.5"]),
    ("guidance-1000", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([1000.0], F32)}, ["GUIDANCE_SCALE=1000.0"]),
    ("seed-negative", {"PROMPT": OK_PROMPT, "SEED": _t([-1], I64)}, ["SEED=-1"]),
    ("cache-mode-unknown", {"PROMPT": OK_PROMPT, "CACHE_MODE": _t([b"sometimes"], STR)}, ["CACHE_MODE='sometimes'"]),
    ("cache-mode-upper", {"PROMPT": OK_PROMPT, "CACHE_MODE": _t([b"AUTO"], STR)}, ["CACHE_MODE='AUTO'"]),
    ("tenant-long", {"PROMPT": OK_PROMPT, "TENANT": _t([b"t" * 1000], STR)}, ["TENANT", "1-128 characters"]),
    ("tenant-control", {"PROMPT": OK_PROMPT, "TENANT": _t([b"acme\nevil"], STR)}, ["TENANT", "letters, digits"]),
    ("tenant-empty", {"PROMPT": OK_PROMPT, "TENANT": _t([b""], STR)}, ["TENANT=''", "1-128 characters"]),
    ("tenant-reserved", {"PROMPT": OK_PROMPT, "TENANT": _t([b"*"], STR)}, ["TENANT='*'", "reserved"]),
    ("controlnet-scale-nan", {"PROMPT": OK_PROMPT, "CONTROLNET_SCALE": _t([np.nan], F32)}, ["CONTROLNET_SCALE=nan"]),
    ("controlnet-scale-inf", {"PROMPT": OK_PROMPT, "CONTROLNET_SCALE": _t([-np.inf], F32)}, ["CONTROLNET_SCALE=-inf"]),
    ("tenant-not-utf8", {"PROMPT": OK_PROMPT, "TENANT": _t([b"\xff"], STR)}, ["TENANT", "UTF-8"]),
    ("prompt-batch-of-two", {"PROMPT": _t([b"a", b"b"], STR, (2,))}, ["PROMPT"]),
    ("prompt-rank-2", {"PROMPT": _t([[b"a"]], STR, (1, 1))}, ["PROMPT"]),
    ("seed-three-values", {"PROMPT": OK_PROMPT, "SEED": _t([1, 2, 3], I64, (3,))}, ["SEED"]),
    ("steps-empty-shape", {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([], I32, (0,))}, ["NUM_INFERENCE_STEPS"]),
    ("guidance-two-values", {"PROMPT": OK_PROMPT, "GUIDANCE_SCALE": _t([7.5, 8.0], F32, (2,))}, ["GUIDANCE_SCALE"]),
    ("everything-wrong", {"PROMPT": _t([b""], STR), "NUM_INFERENCE_STEPS": _t([0], I32)}, ["PROMPT"]),
]


def _infer(client, inputs: dict[str, tuple[np.ndarray, str]]):
    tc = client._tc
    tensors = []
    for name, (array, datatype) in inputs.items():
        tensor = tc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client._client.infer("nirvana", tensors)


def _gauges(served) -> tuple[float, float]:
    text = requests.get(served["server"].urls.metrics, timeout=10).text
    values = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("nirvana_cache_")
    }
    return values["nirvana_cache_entries"], values["nirvana_cache_bytes"]


@pytest.fixture(scope="module")
def warm(served):
    """One admitted prompt, so 'unchanged' is checked against a non-empty cache."""
    from nirvana_client import NirvanaClient

    client = NirvanaClient(served["server"].urls.grpc, "grpc")
    client.generate("a warm-up prompt about lighthouses", GenerateOptions(steps=6))
    client.close()
    # Admission is written behind the response and the gauges refresh every second: wait until they settle.
    deadline, last = time.monotonic() + 30, None
    while (now := _gauges(served)) != last or now[0] == 0:
        assert time.monotonic() < deadline, f"cache gauges never settled: {now}"
        last = now
        time.sleep(1.5)
    return served


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("inputs", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(warm, connect, protocol, inputs, needles) -> None:
    before = _gauges(warm)
    client = connect(protocol)
    with pytest.raises(InferenceServerException) as err:
        _infer(client, inputs)
    for needle in needles:
        assert needle in err.value.message(), err.value.message()
    assert client.ready()
    assert _gauges(warm) == before


def test_mixed_valid_and_invalid_requests_in_flight(warm, connect) -> None:
    clients = [connect("grpc") for _ in range(4)]
    bad = {"PROMPT": OK_PROMPT, "NUM_INFERENCE_STEPS": _t([0], I32)}
    good = {"PROMPT": _t([b"a green heron by a pond"], STR), "NUM_INFERENCE_STEPS": _t([6], I32)}

    def send(pair):
        client, inputs = pair
        try:
            return _infer(client, inputs).as_numpy("IMAGE").shape
        except InferenceServerException as err:
            return err.message()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, zip(clients, [good, bad, good, bad], strict=True)))
    assert results[0] == results[2] == (64, 64, 3)
    assert "NUM_INFERENCE_STEPS=0" in results[1] and "NUM_INFERENCE_STEPS=0" in results[3]
