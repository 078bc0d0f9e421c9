"""Sweeps: one pool × load levels × cache off/on × routing policies, summarised as one row per run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nirvana_client.routing import POLICIES, make_policy
from nirvana_sim.engine import (
    DIFFUSIONDB_CLIP,
    CacheProfile,
    SimResult,
    Workload,
    draw_steps,
    poisson_arrivals,
    simulate,
    trace_arrivals,
)
from nirvana_sim.model import GpuKind


def replica_capacity_rps(kind: GpuKind, steps: int, max_active: int = 8) -> float:
    """Requests/s one replica sustains at saturation: the best batch size's requests per step-loop cycle."""
    return max(1000.0 * active / (steps * kind.step_cost.ms(2 * active)) for active in range(1, max_active + 1))


def capacity_rps(pool: Sequence[GpuKind], steps: int = 50, max_active: int = 8) -> float:
    """The pool's joint saturation rate for requests of `steps` steps (no cache), the 100 % of a load fraction.

    Load is a fraction of the no-cache capacity so that cache on and off see the same arrival rate at one load.
    """
    return sum(replica_capacity_rps(kind, steps, max_active) for kind in pool)


def summarise(result: SimResult) -> dict[str, float]:
    """Mean/p50/p99 latency (ms), throughput (images/s over the run) and mean replica utilisation."""
    latencies = result.latencies_ms
    return {
        "mean_ms": float(latencies.mean()),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput_rps": 1000.0 * len(latencies) / result.span_ms,
        "utilisation": result.busy_ms / (result.replicas * result.span_ms),
    }


def run_sweep(
    pool: Sequence[GpuKind],
    loads: Sequence[float],
    requests: int,
    steps: int = 50,
    seed: int = 0,
    profile: CacheProfile = DIFFUSIONDB_CLIP,
    policies: Sequence[str] = tuple(POLICIES),
    max_active: int = 8,
    trace_gaps_ms: np.ndarray | None = None,
) -> list[dict]:
    """Every (load, cache, policy) on `pool`; all policies at one load see the same arrivals and steps."""
    capacity = capacity_rps(pool, steps, max_active)
    rows = []
    for load in loads:
        rate = load * capacity
        if trace_gaps_ms is None:
            arrivals = poisson_arrivals(requests, rate, seed)
        else:
            arrivals = trace_arrivals(requests, rate, trace_gaps_ms)
        for cache in (False, True):
            workload = Workload(arrivals, draw_steps(requests, steps, profile if cache else None, seed))
            for name in policies:
                result = simulate(pool, workload, make_policy(name), cache, max_active)
                run = {"load": load, "rate_rps": rate, "cache": "on" if cache else "off", "policy": name}
                rows.append(run | summarise(result))
    return rows
