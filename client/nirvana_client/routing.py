"""Request placement over a pool of replicas: state a balancer keeps per replica, and three policies.

Pure and protocol-free (no Triton, no I/O) so that one module serves both the discrete-event simulator
(`nirvana_sim`) and a real multi-URL client balancer. A replica is one Triton server running the diffusion
pipeline; its concurrent requests share one UNet execution per denoising step, with rows = 2 × active requests
(the classifier-free guidance pair), so a step's cost depends on how many requests share it.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StepCost:
    """Milliseconds of one UNet execution against its row count (batch rows, 2 per request).

    Linear interpolation between measured points, linear extrapolation past the last one (from the last two
    points), and the first point's cost below it: a GPU gets no faster with fewer rows than were measured.
    """

    rows: tuple[int, ...]
    ms_at_rows: tuple[float, ...]
    _slopes: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.ms_at_rows) or not self.rows:
            raise ValueError(f"StepCost needs as many rows as ms values, at least one: {self.rows}, {self.ms_at_rows}")
        if any(b <= a for a, b in zip(self.rows, self.rows[1:], strict=False)) or self.rows[0] < 1:
            raise ValueError(f"StepCost rows must be positive and strictly increasing: {self.rows}")
        if any(ms <= 0 for ms in self.ms_at_rows):
            raise ValueError(f"StepCost ms values must be positive: {self.ms_at_rows}")
        r, m = self.rows, self.ms_at_rows
        slopes = tuple((m[i + 1] - m[i]) / (r[i + 1] - r[i]) for i in range(len(r) - 1))
        object.__setattr__(self, "_slopes", slopes)

    def ms(self, rows: int) -> float:
        """Predicted ms of one execution with `rows` rows."""
        if rows <= self.rows[0] or not self._slopes:
            return self.ms_at_rows[0]
        # past the last point bisect lands on the last index; the last segment's slope then extrapolates
        i = min(bisect.bisect_right(self.rows, rows) - 1, len(self._slopes) - 1)
        value = self.ms_at_rows[i] + self._slopes[i] * (rows - self.rows[i])
        return max(value, min(self.ms_at_rows))  # a falling last segment must not extrapolate towards zero

    def scaled(self, factor: float) -> StepCost:
        """The same curve on a GPU `factor` times slower (factor < 1: faster)."""
        return StepCost(self.rows, tuple(ms * factor for ms in self.ms_at_rows))


@dataclass(slots=True)
class ReplicaState:
    """What a balancer knows about one replica when it places a request.

    `outstanding`: requests it holds (running or queued). `predicted_drain_ms`: predicted time to finish all of
    them if nothing else arrives. `fixed_ms`: per-request costs outside the shared step loop (encode, cache,
    decode). `max_active`: requests that share one step; the rest queue FIFO.
    """

    name: str
    outstanding: int
    predicted_drain_ms: float
    cost: StepCost
    fixed_ms: float = 0.0
    max_active: int = 8


def predict_service_ms(cost: StepCost, steps_left: int, active_rows: int, fixed_ms: float) -> float:
    """Service time of a request with `steps_left` steps joining a batch that already has `active_rows` rows.

    Its own pair adds 2 rows, so every step it runs costs `cost.ms(active_rows + 2)`; the batch shrinking as
    others finish is ignored, which makes this an upper bound.
    """
    return fixed_ms + steps_left * cost.ms(active_rows + 2)


def predict_drain_ms(cost: StepCost, steps_left: Sequence[int], max_active: int) -> float:
    """Time to finish held requests (`steps_left` in FIFO order, running ones first) with no new arrivals.

    Runs the replica's own schedule forward: the first `max_active` share each step, a queued request takes the
    slot of the first to finish. Finish points are kept as absolute step counts in a heap, so a long queue
    costs O(n log max_active).
    """
    step_ms = [cost.ms(2 * active) for active in range(max_active + 1)]
    finish_at = [steps for steps in steps_left[:max_active] if steps > 0]
    heapq.heapify(finish_at)
    queued = iter(steps_left[max_active:])
    elapsed_steps, total = 0, 0.0
    while finish_at:
        batch = len(finish_at)
        next_finish = heapq.heappop(finish_at)
        total += (next_finish - elapsed_steps) * step_ms[batch]
        elapsed_steps = next_finish
        admitted = next(queued, None)
        if admitted is not None:
            heapq.heappush(finish_at, elapsed_steps + admitted)
    return total


class Policy(Protocol):
    """Chooses the replica for one request of `steps` denoising steps; returns its index in `replicas`."""

    def choose(self, replicas: Sequence[ReplicaState], steps: int) -> int: ...


class RoundRobin:
    """Each replica in turn, blind to load and speed: the baseline."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaState], steps: int) -> int:
        index = self._next % len(replicas)
        self._next = index + 1
        return index


class LeastOutstanding:
    """The replica holding the fewest requests; ties go to the lowest index (deterministic)."""

    def choose(self, replicas: Sequence[ReplicaState], steps: int) -> int:
        return min(range(len(replicas)), key=lambda i: replicas[i].outstanding)


class PredictedCompletion:
    """The replica where this request is predicted to finish first: argmin over replicas of wait + service.

    With n = outstanding and A = max_active on replica r:

        wait(r)    = 0                                        if n < A  (it joins at the next step boundary)
                   = predicted_drain_ms · (n − A + 1) / n     if n ≥ A  (FIFO: n − A + 1 held requests must
                                                                         finish first; held work is assumed
                                                                         to drain at an even rate)
        service(r) = fixed_ms + steps · cost.ms(2 · min(n, A − 1) + 2)

    The service term prices batching: the request's own pair adds 2 rows to the shared step, so a replica that
    is fast but already busy pays a higher per-step cost, and a slow idle one pays its slow curve. Ties go to
    the lowest index.
    """

    def choose(self, replicas: Sequence[ReplicaState], steps: int) -> int:
        best, best_ms = 0, float("inf")
        for i, replica in enumerate(replicas):
            completion = self.completion_ms(replica, steps)
            if completion < best_ms:
                best, best_ms = i, completion
        return best

    @staticmethod
    def completion_ms(replica: ReplicaState, steps: int) -> float:
        """Predicted ms from now until a request of `steps` steps placed on `replica` finishes."""
        held, slots = replica.outstanding, replica.max_active
        wait = replica.predicted_drain_ms * (held - slots + 1) / held if held >= slots else 0.0
        active_rows = 2 * min(held, slots - 1)
        return wait + predict_service_ms(replica.cost, steps, active_rows, replica.fixed_ms)


POLICIES: dict[str, type] = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "predicted-completion": PredictedCompletion,
}


def make_policy(name: str) -> Policy:
    """A fresh policy by name (policies may keep state, such as round-robin's position)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "LeastOutstanding",
    "Policy",
    "PredictedCompletion",
    "ReplicaState",
    "RoundRobin",
    "StepCost",
    "make_policy",
    "predict_drain_ms",
    "predict_service_ms",
]
