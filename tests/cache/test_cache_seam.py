"""The cache model's wire format without Triton: states, lookups and requests survive the JSON + safetensors round
trip exactly, and malformed requests are refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nirvana.cache.checks import CacheLimits, CacheRequestError
from nirvana.cache.endpoint import CacheEndpoint
from nirvana.cache.outcome import Lookup, Reason
from nirvana.cache.wire import (
    bytes_array,
    decode_arrays,
    decode_states,
    encode_arrays,
    encode_states,
    lookup_from_message,
    lookup_message,
)
from nirvana.security.ratelimit import TenantBuckets


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


KEY = "0123456789abcdef" * 2  # what `Pipeline.cache_key` makes: 32 hex digits
LIMITS = CacheLimits(dim=2, latent_shape=(2, 1, 1), max_steps=50, max_prompt_chars=100)
LATENT = np.zeros((1, 2, 1, 1), np.float32)
VECTOR = np.array([0.6, 0.8], np.float32)


class _Cache:
    """Records what the endpoint asks of the cache; answers lookups with `answer`."""

    def __init__(self, answer: Lookup | None = None) -> None:
        self.calls: list[tuple] = []
        self.answer = answer or Lookup(True, Reason.HIT, 1.0, 3, "p", {"latent": np.ones((1, 2), np.float32)})

    def lookup(self, vector, cache_key, tenant, num_steps, expected_shapes=None) -> Lookup:
        self.calls.append(("lookup", vector.tolist(), cache_key, tenant, num_steps))
        assert expected_shapes == {"latent": LATENT.shape}  # a cached latent of another shape is never served
        return self.answer

    def invalidate(self, entry_id, tenant) -> bool:
        self.calls.append(("invalidate", entry_id, tenant))
        if not entry_id.startswith("e"):
            raise ValueError(f"not a cache entry id: {entry_id!r}")
        return True

    def admit(self, prompt, vector, cache_key, tenant, states, replace=False, meta=None) -> int:
        self.calls.append(("admit", prompt, cache_key, tenant, sorted(states), replace, meta))
        return len(states)


def _request(**fields) -> np.ndarray:
    return bytes_array(json.dumps(fields).encode())


def _lookup(**overrides) -> np.ndarray:
    return _request(**({"op": "lookup", "cache_key": KEY, "tenant": "t", "num_steps": 20} | overrides))


def _admit(**overrides) -> np.ndarray:
    return _request(**({"op": "admit", "prompt": "p", "cache_key": KEY, "tenant": "t"} | overrides))


def test_endpoint_dispatches_lookup_and_admit() -> None:
    cache = _Cache()
    endpoint = CacheEndpoint(cache, LIMITS)
    response, state = endpoint.serve(_lookup(), VECTOR, None)
    lookup = lookup_from_message(json.loads(response), state)
    assert lookup.hit and lookup.k == 3 and lookup.arrays["latent"].tolist() == [[1.0, 1.0]]
    states = bytes_array(encode_states({4: {"latent": LATENT}}))
    response, state = endpoint.serve(_admit(replace=True, meta={"negative_prompt": "n"}), VECTOR, states)
    assert json.loads(response) == {"admitted": 1} and state == b""
    assert cache.calls == [
        ("lookup", [pytest.approx(0.6), pytest.approx(0.8)], KEY, "t", 20),
        ("admit", "p", KEY, "t", [4], True, {"negative_prompt": "n"}),
    ]


BAD_LOOKUPS = [
    (b"not json", VECTOR, "REQUEST: not JSON"),
    (json.dumps({"op": "delete"}).encode(), VECTOR, "op='delete'"),
    (json.dumps(["lookup"]).encode(), VECTOR, "op=['lookup']"),
    (_lookup(num_steps=None)[0], VECTOR, "num_steps=None"),
    (_lookup(num_steps=51)[0], VECTOR, "num_steps=51"),
    (_lookup(cache_key=3)[0], VECTOR, "cache_key=3"),
    (_lookup(cache_key="k")[0], VECTOR, "cache_key='k'"),
    (_lookup(tenant="")[0], VECTOR, "tenant=''"),
    (_lookup(tenant="*")[0], VECTOR, "is reserved"),
    (_lookup(tenant=["a"])[0], VECTOR, "tenant=['a']"),
    (_lookup()[0], np.array([1.0], np.float32), "VECTOR: expected 2"),
    (_lookup()[0], np.array([1000.0, 1000.0], np.float32), "VECTOR: norm"),  # outscores any real cosine
    (_lookup()[0], np.array([np.nan, 1.0], np.float32), "VECTOR: holds NaN"),
    (_lookup()[0], np.array([np.inf, 0.0], np.float32), "VECTOR: holds NaN"),
]


@pytest.mark.parametrize(("request_bytes", "vector", "needle"), BAD_LOOKUPS)
def test_endpoint_refuses_malformed_requests_naming_the_field(request_bytes, vector, needle) -> None:
    cache = _Cache()
    with pytest.raises(CacheRequestError) as err:
        CacheEndpoint(cache, LIMITS).serve(bytes_array(request_bytes), vector, None)
    assert needle in str(err.value) and cache.calls == []


BAD_ADMISSIONS = [
    ({"prompt": ""}, {4: {"latent": LATENT}}, "prompt=''"),
    ({"prompt": "x" * 101}, {4: {"latent": LATENT}}, "over the limit"),
    ({"meta": {"a": [1, 2]}}, {4: {"latent": LATENT}}, "meta="),
    ({"meta": {"a": "x" * 5000}}, {4: {"latent": LATENT}}, "meta: over"),
    ({}, {50: {"latent": LATENT}}, "K must be in [1, 50)"),
    ({}, {4: {"latent": np.zeros((1, 2, 2, 2), np.float32)}}, "expected float [1, 2, 1, 1]"),  # wrong shape
    ({}, {4: {"latent": np.full((1, 2, 1, 1), np.nan, np.float32)}}, "holds NaN"),
    ({}, {4: {"latent": LATENT.astype(np.int32)}}, "expected float"),
    ({}, {4: {"latent": LATENT, "model_output_0": np.full((1, 2, 1, 1), np.inf, np.float32)}}, "holds NaN"),
    ({}, {4: {"latent": LATENT, "payload": np.zeros(3, np.float32)}}, "unexpected tensor 'payload'"),
    ({}, {4: {"latent": LATENT, "lower_order_nums": np.array([99], np.int64)}}, "lower_order_nums"),
    ({}, {4: {"latent": LATENT, "generator_state": np.zeros(20000, np.uint8)}}, "generator_state"),
    ({}, {4: {"model_output_0": LATENT}}, "no 'latent'"),
]


@pytest.mark.parametrize(("fields", "states", "needle"), BAD_ADMISSIONS)
def test_endpoint_refuses_admissions_that_would_break_later_requests(fields, states, needle) -> None:
    cache = _Cache()
    with pytest.raises(CacheRequestError) as err:
        CacheEndpoint(cache, LIMITS).serve(_admit(**fields), VECTOR, bytes_array(encode_states(states)))
    assert needle in str(err.value) and cache.calls == []


def test_endpoint_refuses_a_states_blob_that_is_not_one() -> None:
    with pytest.raises(CacheRequestError, match="STATES: not a safetensors blob"):
        CacheEndpoint(_Cache(), LIMITS).serve(_admit(), VECTOR, bytes_array(b"\xff" * 64))
    forged = bytes_array(encode_arrays({"x/latent": LATENT}))
    with pytest.raises(CacheRequestError, match="not named '<K>/<name>'"):
        CacheEndpoint(_Cache(), LIMITS).serve(_admit(), VECTOR, forged)


def test_a_miss_reports_no_similarity_unless_configured() -> None:
    near = Lookup(False, Reason.BELOW_THRESHOLD, 0.62)
    quiet = json.loads(CacheEndpoint(_Cache(near), LIMITS).serve(_lookup(), VECTOR, None)[0])
    assert quiet["hit"] is False and quiet["similarity"] is None  # nothing for a prober to climb
    near = Lookup(False, Reason.BELOW_THRESHOLD, 0.62)
    told = json.loads(CacheEndpoint(_Cache(near), LIMITS, similarity_on_miss=True).serve(_lookup(), VECTOR, None)[0])
    assert told["similarity"] == pytest.approx(0.62)


def test_lookups_over_a_tenants_rate_are_refused_with_a_retry_hint() -> None:
    clock = [0.0]
    buckets = TenantBuckets(rate=2.0, burst=3, clock=lambda: clock[0])
    cache = _Cache()
    endpoint = CacheEndpoint(cache, LIMITS, buckets=buckets)
    answers = [json.loads(endpoint.serve(_lookup(tenant="mallory"), VECTOR, None)[0]) for _ in range(5)]
    assert [a.get("rate_limited", False) for a in answers] == [False, False, False, True, True]
    assert answers[3]["retry_after_s"] == pytest.approx(0.5)
    assert "rate_limited" not in json.loads(endpoint.serve(_lookup(tenant="alice"), VECTOR, None)[0])  # others: not
    clock[0] = 0.5  # one token back
    assert "rate_limited" not in json.loads(endpoint.serve(_lookup(tenant="mallory"), VECTOR, None)[0])
    assert buckets.refused == 2 and len(cache.calls) == 5  # refused lookups never reach the cache


def test_endpoint_invalidates_the_entry_a_hit_named() -> None:
    cache = _Cache()
    endpoint = CacheEndpoint(cache, LIMITS)
    ask = _request(op="invalidate", entry_id="e1-k10.abc", tenant="t")
    assert json.loads(endpoint.serve(ask, np.zeros(1, np.float32), None)[0]) == {"invalidated": True}
    for bad, needle in ((7, "entry_id='7'"), ("x" * 200, "expected an entry id"), ("bogus", "not a cache entry id")):
        with pytest.raises(CacheRequestError, match=needle):
            endpoint.serve(_request(op="invalidate", entry_id=bad, tenant="t"), np.zeros(1, np.float32), None)
    assert cache.calls[0] == ("invalidate", "e1-k10.abc", "t")


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
    endpoint = CacheEndpoint(cache, LIMITS, admissions=queue)
    states = bytes_array(encode_states({4: {"latent": LATENT}, 8: {"latent": LATENT + 1}}))
    request = _admit(meta={"negative_prompt": "n"})
    assert json.loads(endpoint.serve(request, VECTOR, states)[0]) == {"admitted": 2, "queued": True}
    assert json.loads(endpoint.serve(request, VECTOR, states)[0]) == {"admitted": 0, "queued": False}  # full
    cache.available = False
    queue.room = 2
    assert json.loads(endpoint.serve(request, VECTOR, states)[0]) == {"admitted": 0, "queued": False}
    assert cache.calls == [] and len(queue.queued) == 1  # nothing written on the response path
    (admission,) = queue.queued
    assert (admission.prompt, admission.cache_key, admission.tenant) == ("p", KEY, "t")
    assert sorted(admission.states) == [4, 8]
    assert admission.meta == {"negative_prompt": "n"} and admission.vector.tolist() == pytest.approx([0.6, 0.8])
