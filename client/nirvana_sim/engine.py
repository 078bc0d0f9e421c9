"""Discrete-event simulation of a replica pool: requests arrive, a routing policy places each, replicas batch steps.

On a replica, the requests it holds (up to `max_active`; the rest queue FIFO) advance one denoising step together
in one UNet execution of 2 rows per request, costing `step_cost.ms(rows)` for the replica's kind. A request joins
the running batch at the next step boundary. Its fixed costs (encode, cache path, decode) are added to its own
latency and do not block the step loop. A kind whose curve was learnt by requests in flight (`by_in_flight`) has
it looked up by the requests its replica holds, each finished one until its fixed ms are over, at step boundaries:
the curve already holds what their encode and decode cost the steps beside them.

Replicas may share a host (`hosts`): CPU servers on one machine, or GPUs sharing a PCIe switch. While any other
replica on its host holds work, a replica's steps and fixed costs take its kind's `shared_slowdown` times longer.
The factor is applied at step boundaries, like a join: a neighbour starting or stopping reschedules the next
boundary of every busy replica beside it.

Events are batch changes, not steps: between two changes the batch is fixed, so the next completion time is known
in closed form. That keeps a run at a few heap operations per request (64 replicas × 2000 requests in well under a
second), where one event per step would cost ~25× more.
"""

from __future__ import annotations

import csv
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from nirvana_client.routing import Policy, ReplicaState, predict_drain_ms
from nirvana_sim.model import GpuKind


@dataclass(frozen=True)
class CacheProfile:
    """How often the approximate cache hits and how many steps (K) a hit skips, measured at `measured_steps`."""

    hit_rate: float
    skipped_counts: dict[int, int]
    measured_steps: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.hit_rate <= 1.0:
            raise ValueError(f"hit_rate must lie in [0, 1], got {self.hit_rate}")
        if not self.skipped_counts or any(k < 1 or c < 0 for k, c in self.skipped_counts.items()):
            raise ValueError(f"skipped_counts must map K >= 1 to counts >= 0, got {self.skipped_counts}")


# DiffusionDB trace in this project, N = 50, CLIP embedder: 288 hits, K histogram below.
DIFFUSIONDB_CLIP = CacheProfile(hit_rate=0.593, skipped_counts={5: 58, 10: 148, 15: 57, 20: 17, 25: 8})


@dataclass(frozen=True)
class Workload:
    """Arrival times (ms, ascending) and denoising steps to run, one entry per request."""

    arrivals_ms: np.ndarray
    steps: np.ndarray


@dataclass(frozen=True)
class SimResult:
    """Per-request latency (ms, arrival to image) and pool busy time, for summary statistics."""

    latencies_ms: np.ndarray
    span_ms: float  # first arrival to last image
    busy_ms: float  # summed over replicas: time with a non-empty batch
    replicas: int


def poisson_arrivals(count: int, rate_rps: float, seed: int) -> np.ndarray:
    """`count` arrival times (ms) of a Poisson process at `rate_rps`."""
    rng = np.random.default_rng([seed, 0])
    return np.cumsum(rng.exponential(1000.0 / rate_rps, count))


def trace_arrivals(count: int, rate_rps: float, gaps_ms: np.ndarray) -> np.ndarray:
    """`count` arrivals following a trace's gaps (cycled), rescaled so that the mean rate is `rate_rps`."""
    unit = gaps_ms / gaps_ms.mean()
    reps = math.ceil(count / len(unit))
    return np.cumsum(np.tile(unit, reps)[:count] * (1000.0 / rate_rps))


def load_trace_gaps(path: Path, seed: int, column: str = "timestamp") -> np.ndarray:
    """Gaps (ms) between a trace's sorted timestamps.

    DiffusionDB stamps are whole minutes, so many requests share one; each is placed uniformly at random (seeded)
    inside its minute, which keeps the per-minute rate of the trace without inventing structure below it.
    """
    with Path(path).open(newline="") as handle:
        stamps = [datetime.fromisoformat(row[column]).timestamp() for row in csv.DictReader(handle)]
    if len(stamps) < 2:
        raise ValueError(f"{path}: need at least two {column!r} values, got {len(stamps)}")
    seconds = np.sort(np.array(stamps))
    resolution = 60.0 if np.all(seconds % 60 == 0) else (1.0 if np.all(seconds % 1 == 0) else 0.0)
    jittered = np.sort(seconds + np.random.default_rng([seed, 2]).uniform(0, resolution, len(seconds)))
    return np.diff(jittered) * 1000.0


def draw_steps(count: int, steps: int, profile: CacheProfile | None, seed: int) -> np.ndarray:
    """Steps each request runs: `steps`, minus K on a cache hit (K scaled from the profile's measured N)."""
    if profile is None:
        return np.full(count, steps, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])  # its own stream: cache on/off see the same arrivals
    ks = np.array(list(profile.skipped_counts), dtype=np.float64) * steps / profile.measured_steps
    weights = np.array(list(profile.skipped_counts.values()), dtype=np.float64)
    skipped = rng.choice(np.rint(ks).astype(np.int64), size=count, p=weights / weights.sum())
    hits = rng.random(count) < profile.hit_rate
    return np.maximum(steps - skipped * hits, 1)


class _Replica:
    """One server's step loop; `held` entries are [request index, steps left as of `clock`, fixed ms]."""

    __slots__ = (
        "active",
        "busy_ms",
        "by_in_flight",
        "clock",
        "cost",
        "drain_end",
        "event_at",
        "index",
        "max_active",
        "siblings",
        "slowdown",
        "state",
        "step_ms",
        "tails",
        "version",
        "waiting",
    )

    def __init__(self, index: int, kind: GpuKind, max_active: int, cache: bool) -> None:
        self.index = index
        self.siblings: list[_Replica] = []  # other replicas on this one's host
        self.slowdown = kind.shared_slowdown
        self.cost = kind.step_cost
        self.by_in_flight = kind.by_in_flight
        self.tails: list[float] = []  # when finished requests' fixed ms end (by_in_flight only)
        self.max_active = max_active
        self.active: list[list[int]] = []
        self.waiting: deque[list[int]] = deque()
        self.clock = self.step_ms = self.busy_ms = self.drain_end = 0.0
        self.event_at = math.inf
        self.version = 0
        self.state = ReplicaState(kind.name, 0, 0.0, kind.step_cost, kind.fixed_ms(cache), max_active)

    def next_boundary(self, now: float) -> float:
        """The first step boundary at or after `now`."""
        if not self.active:
            return now
        return self.clock + math.ceil((now - self.clock) / self.step_ms - 1e-9) * self.step_ms

    def advance(self, t: float) -> list[list[int]]:
        """Run the batch to boundary `t`, admit queued requests into free slots; returns those that finished."""
        finished: list[list[int]] = []
        if self.active:
            done = round((t - self.clock) / self.step_ms)
            self.busy_ms += t - self.clock
            running = []
            for held in self.active:
                held[1] -= done
                (finished if held[1] <= 0 else running).append(held)
            self.active = running
        self.clock = t
        while self.waiting and len(self.active) < self.max_active:
            self.active.append(self.waiting.popleft())
        if self.by_in_flight:  # finished requests stay held until their fixed ms are over
            self.tails = [end for end in self.tails if end > t] + [t + held[2] for held in finished]
        self.step_ms = self.cost.ms(2 * self.in_flight()) * self.contention() if self.active else 0.0
        self.refresh_drain(t)
        return finished

    def in_flight(self) -> int:
        """Requests the step cost is looked up by: the batch, plus (by_in_flight) those still in their fixed ms."""
        return min(len(self.active) + len(self.tails), self.max_active) if self.by_in_flight else len(self.active)

    def contention(self) -> float:
        """The time factor of this replica's work now: its `shared_slowdown` while a neighbour holds work."""
        return self.slowdown if any(sibling.active for sibling in self.siblings) else 1.0

    def next_completion(self) -> float:
        return self.clock + min(held[1] for held in self.active) * self.step_ms

    def refresh_drain(self, boundary: float) -> None:
        """Predicted end of all held work, from the batch as it will stand at `boundary`."""
        done = round((boundary - self.clock) / self.step_ms) if self.active else 0
        left = [held[1] - done for held in self.active if held[1] > done] + [held[1] for held in self.waiting]
        self.drain_end = boundary + predict_drain_ms(self.cost, left, self.max_active)


def _link_hosts(replicas: list[_Replica], hosts: Sequence[int] | None) -> None:
    if hosts is None:
        return
    if len(hosts) != len(replicas):
        raise ValueError(f"hosts must name one host per replica: {len(hosts)} for {len(replicas)} replicas")
    for replica in replicas:
        replica.siblings = [r for r in replicas if r is not replica and hosts[r.index] == hosts[replica.index]]


def simulate(
    pool: Sequence[GpuKind],
    workload: Workload,
    policy: Policy,
    cache: bool,
    max_active: int = 8,
    hosts: Sequence[int] | None = None,
) -> SimResult:
    """Run `workload` through `pool`, each request placed by `policy` on the replicas' state at its arrival.

    `hosts`: a host id per replica; replicas with the same id slow each other down (see the module text).
    """
    replicas = [_Replica(index, kind, max_active, cache) for index, kind in enumerate(pool)]
    _link_hosts(replicas, hosts)
    states = [replica.state for replica in replicas]
    arrivals, steps = workload.arrivals_ms.tolist(), workload.steps.tolist()
    finish = [0.0] * len(arrivals)
    fixed = [0.0] * len(arrivals)
    events: list[tuple[float, int, int, int]] = []  # (time, tie-break, replica, version)
    sequence = 0

    def schedule(index: int, at: float) -> None:
        nonlocal sequence
        replica = replicas[index]
        replica.version += 1
        replica.event_at = at
        sequence += 1
        heapq.heappush(events, (at, sequence, index, replica.version))

    def nudge_siblings(replica: _Replica, at: float) -> None:
        """`replica` started or stopped holding work: its busy neighbours change speed at their next boundary."""
        for sibling in replica.siblings:
            if sibling.active and (join_at := sibling.next_boundary(at)) < sibling.event_at:
                schedule(sibling.index, join_at)

    def boundary(at: float, index: int, version: int) -> None:
        replica = replicas[index]
        if version != replica.version:
            return  # superseded by an earlier join boundary
        was_busy = bool(replica.active)
        for request, *_ in replica.advance(at):
            finish[request] = at
        replica.state.outstanding = len(replica.active) + len(replica.waiting)
        if replica.active:
            schedule(index, replica.next_completion())
        else:
            replica.event_at = math.inf
        if was_busy != bool(replica.active):
            nudge_siblings(replica, at)

    for request, (now, request_steps) in enumerate(zip(arrivals, steps, strict=True)):
        while events and events[0][0] <= now:
            at, _, index, version = heapq.heappop(events)
            boundary(at, index, version)
        for replica in replicas:
            replica.state.predicted_drain_ms = max(0.0, replica.drain_end - now)
        index = policy.choose(states, request_steps)
        replica = replicas[index]
        fixed[request] = replica.state.fixed_ms * replica.contention()
        replica.waiting.append([request, request_steps, fixed[request]])
        replica.state.outstanding += 1
        if not replica.active:
            replica.clock = now
            replica.advance(now)
            schedule(index, replica.next_completion())
            nudge_siblings(replica, now)
        else:
            join_at = replica.next_boundary(now)
            if len(replica.active) < max_active and join_at < replica.event_at:
                schedule(index, join_at)
            replica.refresh_drain(join_at)
    while events:
        at, _, index, version = heapq.heappop(events)
        boundary(at, index, version)

    latencies = np.array(finish) - np.array(arrivals) + np.array(fixed)
    span = float(max(f + x for f, x in zip(finish, fixed, strict=True)) - arrivals[0])
    return SimResult(latencies, span, sum(r.busy_ms for r in replicas), len(replicas))
