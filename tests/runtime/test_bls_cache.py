"""The cache model's wire format without Triton: states, lookups and requests survive the JSON + safetensors round
trip exactly, and malformed requests are refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nirvana.cache.outcome import Lookup, Reason
from nirvana.runtime.bls_cache import (
    CacheEndpoint,
    CacheRequestError,
    bytes_array,
    decode_arrays,
    decode_states,
    encode_arrays,
    encode_states,
    lookup_from_message,
    lookup_message,
)


def _resume_arrays(seed: int) -> dict[str, np.ndarray]:
    """What `ResumeState.to_arrays` yields, every dtype it uses; zeros at the end test that no trailing NUL byte of
    the blob is lost on the way."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    latent[..., -1] = 0.0
    return {
        "latent": latent,
        "num_model_outputs": np.array([2], np.int64),
        "model_output_1": rng.standard_normal((1, 4, 8, 8)).astype(np.float16),
        "lower_order_nums": np.array([1], np.int64),
        "generator_state": np.concatenate([rng.integers(0, 255, 100, dtype=np.uint8), np.zeros(8, np.uint8)]),
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name])


def test_states_round_trip_exactly() -> None:
    states = {5: _resume_arrays(0), 25: _resume_arrays(1)}
    blob = encode_states(states)
    assert blob.endswith(b"\x00" * 8)  # the generator state's zeros are the blob's last bytes
    decoded = decode_states(blob)
    assert sorted(decoded) == [5, 25]
    for k in states:
        _assert_same(states[k], decoded[k])
    assert decode_states(encode_states({})) == {} and encode_states({}) == b""


def test_hit_and_miss_round_trip_through_json_and_safetensors() -> None:
    hit = Lookup(
        True, Reason.HIT, 0.93, 10, "a red fox", _resume_arrays(2), {"search_ms": 0.4}, {"negative_prompt": ""}
    )
    miss = Lookup(False, Reason.BELOW_THRESHOLD, 0.51, timings_ms={"search_ms": 0.2})
    empty = Lookup(False, Reason.EMPTY)
    for lookup in (hit, miss, empty):
        message, state = lookup_message(lookup)
        wire = json.loads(json.dumps(message))  # what RESPONSE carries
        back = lookup_from_message(wire, state)
        assert (back.hit, back.reason, back.similarity, back.k) == (
            lookup.hit,
            lookup.reason,
            lookup.similarity,
            lookup.k,
        )
        assert (back.matched_prompt, back.meta, back.timings_ms) == (
            lookup.matched_prompt,
            lookup.meta,
            lookup.timings_ms,
        )
        if lookup.arrays is None:
            assert back.arrays is None and state == b""
        else:
            _assert_same(lookup.arrays, back.arrays)


def test_bytes_array_keeps_trailing_nul_bytes() -> None:
    blob = encode_arrays({"x": np.zeros(4, np.float32)})
    array = bytes_array(blob)
    assert array.dtype == np.object_ and array.shape == (1,) and array[0] == blob
    _assert_same(decode_arrays(array[0]), {"x": np.zeros(4, np.float32)})


class _Cache:
    """Records what the endpoint asks of the cache."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def lookup(self, vector, cache_key, tenant, num_steps) -> Lookup:
        self.calls.append(("lookup", vector.tolist(), cache_key, tenant, num_steps))
        return Lookup(True, Reason.HIT, 1.0, 3, "p", {"latent": np.ones((1, 2), np.float32)})

    def admit(self, prompt, vector, cache_key, tenant, states, replace=False, meta=None) -> int:
        self.calls.append(("admit", prompt, cache_key, tenant, sorted(states), replace, meta))
        return len(states)


def _request(**fields) -> np.ndarray:
    return bytes_array(json.dumps(fields).encode())


def test_endpoint_dispatches_lookup_and_admit() -> None:
    cache = _Cache()
    endpoint = CacheEndpoint(cache, dim=2)
    vector = np.array([0.6, 0.8], np.float32)
    response, state = endpoint.serve(_request(op="lookup", cache_key="k", tenant="t", num_steps=20), vector, None)
    lookup = lookup_from_message(json.loads(response), state)
    assert lookup.hit and lookup.k == 3 and lookup.arrays["latent"].tolist() == [[1.0, 1.0]]
    states = bytes_array(encode_states({4: {"latent": np.zeros((1, 2), np.float32)}}))
    request = _request(op="admit", prompt="p", cache_key="k", tenant="t", replace=True, meta={"negative_prompt": "n"})
    response, state = endpoint.serve(request, vector, states)
    assert json.loads(response) == {"admitted": 1} and state == b""
    assert cache.calls == [
        ("lookup", [pytest.approx(0.6), pytest.approx(0.8)], "k", "t", 20),
        ("admit", "p", "k", "t", [4], True, {"negative_prompt": "n"}),
    ]


@pytest.mark.parametrize(
    ("request_bytes", "vector", "needle"),
    [
        (b"not json", [1.0, 0.0], "REQUEST: not JSON"),
        (json.dumps({"op": "delete"}).encode(), [1.0, 0.0], "op='delete'"),
        (json.dumps(["lookup"]).encode(), [1.0, 0.0], "op=['lookup']"),
        (json.dumps({"op": "lookup", "cache_key": "k", "tenant": "t"}).encode(), [1.0, 0.0], "num_steps=None"),
        (json.dumps({"op": "lookup", "cache_key": 3, "tenant": "t", "num_steps": 2}).encode(), [1.0, 0.0], "cache_key"),
        (json.dumps({"op": "lookup", "cache_key": "k", "tenant": "t", "num_steps": 2}).encode(), [1.0], "VECTOR"),
    ],
)
def test_endpoint_refuses_malformed_requests_naming_the_field(request_bytes, vector, needle) -> None:
    with pytest.raises(CacheRequestError) as err:
        CacheEndpoint(_Cache(), dim=2).serve(bytes_array(request_bytes), np.array(vector, np.float32), None)
    assert needle in str(err.value)


class _Queue:
    """A write-behind queue that holds `room` admissions."""

    def __init__(self, room: int) -> None:
        self.room, self.queued = room, []

    def submit(self, admission) -> bool:
        if len(self.queued) >= self.room:
            return False
        self.queued.append(admission)
        return True


def test_endpoint_with_a_queue_answers_queued_dropped_or_unavailable() -> None:
    cache, queue = _Cache(), _Queue(room=1)
    cache.available = True
    endpoint = CacheEndpoint(cache, dim=2, admissions=queue)
    vector = np.array([0.6, 0.8], np.float32)
    states = bytes_array(encode_states({4: {"latent": np.zeros((1, 2), np.float32)}, 8: {"latent": np.ones((1, 2))}}))
    request = _request(op="admit", prompt="p", cache_key="k", tenant="t", meta={"negative_prompt": "n"})
    assert json.loads(endpoint.serve(request, vector, states)[0]) == {"admitted": 2, "queued": True}
    assert json.loads(endpoint.serve(request, vector, states)[0]) == {"admitted": 0, "queued": False}  # full
    cache.available = False
    queue.room = 2
    assert json.loads(endpoint.serve(request, vector, states)[0]) == {"admitted": 0, "queued": False}
    assert cache.calls == [] and len(queue.queued) == 1  # nothing written on the response path
    (admission,) = queue.queued
    assert (admission.prompt, admission.cache_key, admission.tenant) == ("p", "k", "t")
    assert sorted(admission.states) == [4, 8]
    assert admission.meta == {"negative_prompt": "n"} and admission.vector.tolist() == pytest.approx([0.6, 0.8])
