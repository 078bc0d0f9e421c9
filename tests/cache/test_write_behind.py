"""AdmissionQueue over a real ApproximateCache (in-memory store of record): admissions are written in order, a full
queue drops and counts, close writes everything queued, one failing admission does not stop the writer; and the
`cache` model's endpoint answers an admission once it is queued."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from pydantic import ValidationError

from nirvana.cache.checks import CacheLimits
from nirvana.cache.endpoint import CacheEndpoint
from nirvana.cache.outcome import Reason
from nirvana.cache.wire import bytes_array, encode_states
from nirvana.cache.write_behind import Admission, AdmissionQueue
from nirvana.config import CacheConfig

DIM, KEY, TENANT, STEPS = 16, "ab" * 16, "t", 50  # a cache key as the pipeline makes them


def _vec(i: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[i % DIM]


def _admission(i: int, value: float = 0.0, replace: bool = False) -> Admission:
    states = {k: {"latent": np.full((1, 4, 8, 8), value + k, np.float32)} for k in (5, 25)}
    return Admission(f"prompt {i}", _vec(i), KEY, TENANT, states, replace=replace)


class _Spy:
    """Wraps `cache.admit`: records the prompts in the order written, can hold the writer, can fail one prompt."""

    def __init__(self, cache, fail: str | None = None) -> None:
        self.admit, self.fail = cache.admit, fail
        self.prompts: list[str] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()
        cache.admit = self

    def __call__(self, prompt, *args, **kwargs) -> int:
        self.started.set()
        self.release.wait(10)
        self.prompts.append(prompt)
        if prompt == self.fail:
            raise OSError("disk full")
        return self.admit(prompt, *args, **kwargs)


def test_admissions_are_written_in_submission_order(memory_cache) -> None:
    cache = memory_cache(DIM, near_equal_margin=0)  # prompts 3 and 19 share a vector: no random choice between them
    spy = _Spy(cache)
    queue = AdmissionQueue(cache, max_depth=64)
    for i in range(20):
        assert queue.submit(_admission(i))
    assert queue.submit(_admission(3, value=100.0, replace=True))  # a rewrite of prompt 3, after its first write
    assert queue.drain(timeout=10)
    assert spy.prompts == [f"prompt {i}" for i in range(20)] + ["prompt 3"]
    assert len(cache) == 20 and queue.written == 42 and queue.depth == 0 and queue.dropped == 0
    hit = cache.lookup(_vec(3), KEY, TENANT, STEPS)
    assert hit.hit and hit.arrays["latent"].max() == 125.0  # the later admission won
    queue.close()


def test_full_queue_drops_the_admission_and_counts_it(memory_cache) -> None:
    cache = memory_cache(DIM)
    spy = _Spy(cache)
    spy.release.clear()  # the writer holds the first admission
    queue = AdmissionQueue(cache, max_depth=3)
    assert queue.submit(_admission(0))
    assert spy.started.wait(5)
    assert all(queue.submit(_admission(i)) for i in (1, 2, 3))
    assert queue.depth == 3
    assert not queue.submit(_admission(4)) and not queue.submit(_admission(5))
    assert (queue.depth, queue.dropped) == (3, 2)
    assert not queue.drain(timeout=0.05)  # still held
    spy.release.set()
    assert queue.drain(timeout=10)
    assert spy.prompts == [f"prompt {i}" for i in range(4)] and len(cache) == 4
    assert cache.record(KEY, TENANT, "prompt 4") is None  # dropped: never cached
    queue.close()


def test_close_writes_everything_queued(memory_cache) -> None:
    cache = memory_cache(DIM)
    spy = _Spy(cache)
    spy.release.clear()
    queue = AdmissionQueue(cache, max_depth=32)
    for i in range(10):
        assert queue.submit(_admission(i))
    closing = threading.Thread(target=queue.close)
    closing.start()
    spy.release.set()
    closing.join(10)
    assert not closing.is_alive() and len(cache) == 10 and cache.entries == 20 and queue.depth == 0
    assert not queue.submit(_admission(11)) and queue.dropped == 1  # after close: refused, counted


def test_close_gives_up_after_its_timeout(memory_cache) -> None:
    cache = memory_cache(DIM)
    spy = _Spy(cache)
    spy.release.clear()
    queue = AdmissionQueue(cache, max_depth=8)
    for i in range(4):
        queue.submit(_admission(i))
    assert spy.started.wait(5)
    assert not queue.close(timeout=0.05)
    assert queue.depth == 0 and queue.dropped == 3  # the three behind the held one are given up
    spy.release.set()
    assert queue.drain(timeout=10) and spy.prompts == ["prompt 0"]


def test_a_failing_admission_does_not_stop_the_writer(memory_cache) -> None:
    cache = memory_cache(DIM)
    spy = _Spy(cache, fail="prompt 1")
    queue = AdmissionQueue(cache, max_depth=8)
    for i in range(4):
        queue.submit(_admission(i))
    assert queue.close(timeout=10)
    assert spy.prompts == [f"prompt {i}" for i in range(4)] and queue.failed == 1
    assert cache.record(KEY, TENANT, "prompt 1") is None and len(cache) == 3


def test_endpoint_answers_once_queued_and_a_lookup_meanwhile_misses(memory_cache) -> None:
    cache = memory_cache(DIM)
    spy = _Spy(cache)
    spy.release.clear()
    queue = AdmissionQueue(cache, max_depth=4)
    limits = CacheLimits(dim=DIM, latent_shape=(4, 8, 8), max_steps=200, max_prompt_chars=2000)
    endpoint = CacheEndpoint(cache, limits, queue)
    admission = _admission(0)
    request = {"op": "admit", "prompt": admission.prompt, "cache_key": KEY, "tenant": TENANT}
    response, _ = endpoint.serve(
        bytes_array(json.dumps(request).encode()), _vec(0), bytes_array(encode_states(admission.states))
    )
    assert json.loads(response) == {"admitted": 2, "queued": True}
    lookup = {"op": "lookup", "cache_key": KEY, "tenant": TENANT, "num_steps": STEPS}
    response, _ = endpoint.serve(bytes_array(json.dumps(lookup).encode()), _vec(0), None)
    assert json.loads(response)["reason"] == Reason.EMPTY  # still queued: a miss, as documented
    spy.release.set()
    assert queue.close(timeout=10)
    response, _ = endpoint.serve(bytes_array(json.dumps(lookup).encode()), _vec(0), None)
    assert json.loads(response)["hit"] and json.loads(response)["k"] == 25


def test_queue_depth_is_validated() -> None:
    assert CacheConfig().admission_queue == 256 and CacheConfig(admission_queue=0).admission_queue == 0
    with pytest.raises(ValidationError, match="admission_queue"):
        CacheConfig(admission_queue=-1)
    with pytest.raises(ValueError, match="max_depth=0"):
        AdmissionQueue(object(), max_depth=0)
