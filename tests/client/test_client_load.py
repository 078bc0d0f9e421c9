"""Schedulers: bounded in request count and in time, closed loop keeps its concurrency, arrivals as asked."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from nirvana_client.load import Deadline, Timing, poisson_offsets, run, schedule, trace_offsets


class Recorder:
    """A `send` that sleeps `service_s` and records when it ran and how many ran at once."""

    def __init__(self, service_s: float = 0.0) -> None:
        self.service_s = service_s
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.sent: list[tuple[int, float, float | None]] = []

    def __call__(self, item: int, scheduled_at: float | None) -> int:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.sent.append((item, time.perf_counter(), scheduled_at))
        time.sleep(self.service_s)
        with self.lock:
            self.active -= 1
        return item


def test_closed_loop_sends_each_item_once_with_at_most_c_outstanding() -> None:
    send = Recorder(0.01)
    results = run(list(range(40)), send, Timing("closed", concurrency=3), Deadline(None))
    assert results == list(range(40))
    assert send.peak == 3 and sorted(i for i, _, _ in send.sent) == list(range(40))


def test_closed_loop_stops_at_the_deadline() -> None:
    send = Recorder(0.05)
    start = time.perf_counter()
    results = run(list(range(1000)), send, Timing("closed", concurrency=2), Deadline(0.3))
    elapsed = time.perf_counter() - start
    sent = [r for r in results if r is not None]
    assert elapsed < 0.3 + 0.5  # the last requests in flight finish; nothing new starts
    assert 4 <= len(sent) <= 16 and results[len(sent) :] == [None] * (1000 - len(sent))


def test_poisson_offsets_have_the_asked_rate_and_count() -> None:
    offsets = poisson_offsets(20_000, rate=5.0, seed=1)
    assert offsets.size == 20_000 and offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    assert np.mean(np.diff(offsets)) == pytest.approx(0.2, rel=0.03)
    assert np.std(np.diff(offsets)) == pytest.approx(0.2, rel=0.05)  # exponential: sd = mean
    np.testing.assert_array_equal(offsets, poisson_offsets(20_000, rate=5.0, seed=1))


def test_open_loop_poisson_sends_on_schedule_and_stops_at_the_deadline() -> None:
    timing = Timing("poisson", rate=40.0, max_in_flight=4, seed=2)
    offsets = schedule(timing, 10_000)
    send = Recorder(0.0)
    start = time.perf_counter()
    results = run(list(range(10_000)), send, timing, Deadline(0.5), offsets)
    elapsed = time.perf_counter() - start
    sent = [r for r in results if r is not None]
    assert elapsed < 0.5 + 0.5
    assert 5 <= len(sent) <= 45  # about 20 expected in 0.5 s at 40/s
    for _, sent_at, scheduled_at in send.sent:  # never early, and on time while workers are free
        assert scheduled_at is not None and 0 <= sent_at - scheduled_at < 0.25
    scheduled = [at for _, _, at in sorted(send.sent)]
    np.testing.assert_allclose(np.diff(scheduled), np.diff(offsets[: len(sent)]), atol=1e-6)


def test_open_loop_does_not_wait_for_answers_but_caps_outstanding() -> None:
    timing = Timing("poisson", rate=1000.0, max_in_flight=5)
    send = Recorder(0.1)
    results = run(list(range(20)), send, timing, Deadline(None), schedule(timing, 20))
    assert sorted(results) == list(range(20)) and send.peak == 5


def test_trace_offsets_spread_requests_that_share_a_timestamp() -> None:
    minute = [0, 0, 0, 60, 120, 120]
    np.testing.assert_allclose(trace_offsets(minute), [0, 20, 40, 60, 120, 150])
    np.testing.assert_allclose(trace_offsets(minute, speed=60), [0, 1 / 3, 2 / 3, 1, 2, 2.5])
    with pytest.raises(ValueError, match="sorted"):
        trace_offsets([60, 0])


def test_trace_timing_needs_timestamps_and_bad_timings_are_named() -> None:
    with pytest.raises(ValueError, match="timestamp column"):
        schedule(Timing("trace"), 2, [None, None])
    with pytest.raises(ValueError, match="speed=0"):
        Timing("trace", speed=0)
    with pytest.raises(ValueError, match="concurrency=0"):
        Timing("closed", concurrency=0)
    with pytest.raises(ValueError, match="timing='burst'"):
        Timing("burst")  # type: ignore[arg-type]


def test_an_exception_in_send_reaches_the_caller() -> None:
    def send(item: int, at: float | None) -> int:
        raise RuntimeError(f"bug at {item}")

    with pytest.raises(RuntimeError, match="bug at"):
        run([1, 2], send, Timing("closed"), Deadline(None))
    timing = Timing("poisson", rate=100.0)
    with pytest.raises(RuntimeError, match="bug at"):
        run([1, 2], send, timing, Deadline(None), schedule(timing, 2))
