"""When requests are sent: trace replay (sped up), closed loop, open-loop Poisson — bounded in count and time.

The runners know nothing of Triton: they call `send(item, scheduled_at)` for each item they get to and return
what it returned, in item order, with None for items not sent because the deadline passed. `scheduled_at` is
the `time.perf_counter()` instant the schedule asked for (None in closed loop), so the caller can record how
far the load generator fell behind its schedule.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")
TimingMode = Literal["trace", "closed", "poisson"]
TIMING_MODES = ("trace", "closed", "poisson")


@dataclass(frozen=True)
class Timing:
    """How requests are paced.

    `trace`: at the workload's own timestamps divided by `speed`, at most `max_in_flight` outstanding.
    `closed`: `concurrency` workers, each sending its next request when the previous one answered.
    `poisson`: open loop, exponential gaps with mean 1/`rate` seconds (seeded by `seed`), at most
    `max_in_flight` outstanding; a request that finds them all busy waits and its lag is recorded.
    """

    mode: TimingMode = "closed"
    speed: float = 1.0
    concurrency: int = 1
    rate: float = 1.0
    max_in_flight: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in TIMING_MODES:
            raise ValueError(f"timing={self.mode!r}: must be one of {', '.join(TIMING_MODES)}")
        for name in ("speed", "rate"):
            value = getattr(self, name)
            if not (value > 0 and np.isfinite(value)):
                raise ValueError(f"{name}={value!r}: must be a positive number")
        for name in ("concurrency", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be at least 1")

    @property
    def workers(self) -> int:
        """Requests outstanding at most."""
        return self.concurrency if self.mode == "closed" else self.max_in_flight


class Deadline:
    """A wall-clock limit shared by every block of a run (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.perf_counter() >= self.end

    def wait_until(self, instant: float) -> bool:
        """Sleep until `instant` (perf_counter); False if the deadline comes first."""
        stop = instant if self.end is None else min(instant, self.end)
        while (left := stop - time.perf_counter()) > 0:
            time.sleep(min(left, 0.05))
        return not self.expired()


def poisson_offsets(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times (s, first at 0) of a Poisson process with `rate` requests per second."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


def trace_offsets(timestamps: Sequence[float], speed: float = 1.0) -> np.ndarray:
    """Arrival times (s, first at 0) of recorded timestamps (sorted), divided by `speed`.

    Traces record times coarsely (DiffusionDB: to the minute), so several requests share a timestamp. Sending
    them as one burst would test a load the users never made; instead the k requests of a timestamp are spread
    evenly over the gap to the next distinct timestamp (the last group over the median gap).
    """
    stamps = np.asarray(timestamps, dtype=float)
    if stamps.size == 0:
        return np.zeros(0)
    if np.any(np.diff(stamps) < 0):
        raise ValueError("trace timestamps must be sorted (load_workload sorts by the timestamp column)")
    distinct = np.unique(stamps)
    gaps = np.diff(distinct)
    last_gap = float(np.median(gaps)) if gaps.size else 0.0
    offsets = np.empty_like(stamps)
    for value, gap in zip(distinct, [*gaps, last_gap], strict=True):
        group = np.flatnonzero(stamps == value)
        offsets[group] = value + gap * np.arange(group.size) / group.size
    return (offsets - offsets[0]) / speed


def schedule(timing: Timing, n: int, timestamps: Sequence[float | None] | None = None) -> np.ndarray | None:
    """Arrival offsets (s) of n requests for an open-loop timing; None for closed loop."""
    if timing.mode == "closed":
        return None
    if timing.mode == "poisson":
        return poisson_offsets(n, timing.rate, timing.seed)
    if timestamps is None or any(t is None for t in timestamps):
        raise ValueError("timing=trace needs a workload with a timestamp column (see --timestamp-column)")
    return trace_offsets([float(t) for t in timestamps], timing.speed)  # type: ignore[arg-type]


def run_closed_loop(
    items: Sequence[T], send: Callable[[T, float | None], R], concurrency: int, deadline: Deadline
) -> list[R | None]:
    """`concurrency` workers take the next item as soon as their previous request answered."""
    results: list[R | None] = [None] * len(items)
    next_index = iter(range(len(items)))
    lock = threading.Lock()

    failures: list[BaseException] = []

    def worker() -> None:
        while not deadline.expired() and not failures:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                results[i] = send(items[i], None)
            except BaseException as err:  # re-raised in the caller's thread, not lost with this one
                failures.append(err)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


def run_open_loop(
    items: Sequence[T],
    offsets: Sequence[float],
    send: Callable[[T, float | None], R],
    max_in_flight: int,
    deadline: Deadline,
) -> list[R | None]:
    """Send item i at start + offsets[i] whether or not earlier requests answered (up to `max_in_flight`)."""
    if len(offsets) != len(items):
        raise ValueError(f"{len(offsets)} offsets for {len(items)} items")
    results: list[R | None] = [None] * len(items)
    start = time.perf_counter()

    def task(i: int, scheduled_at: float) -> None:
        if not deadline.expired():  # a request queued behind busy workers is dropped once time is up
            results[i] = send(items[i], scheduled_at)

    with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="replay") as pool:
        futures = []
        for i, offset in enumerate(offsets):
            instant = start + float(offset)
            if not deadline.wait_until(instant):
                break
            futures.append(pool.submit(task, i, instant))
    for future in futures:
        future.result()  # raises what `send` raised
    return results


def run(
    items: Sequence[T],
    send: Callable[[T, float | None], R],
    timing: Timing,
    deadline: Deadline,
    offsets: Sequence[float] | None = None,
) -> list[R | None]:
    """Run `items` under `timing`; open-loop timings need the `offsets` from `schedule`."""
    if timing.mode == "closed":
        return run_closed_loop(items, send, timing.concurrency, deadline)
    if offsets is None:
        raise ValueError(f"timing={timing.mode!r} needs arrival offsets")
    return run_open_loop(items, offsets, send, timing.max_in_flight, deadline)
