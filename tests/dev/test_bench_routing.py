"""`nirvana bench routing`'s bridge from learnt cost models to the simulator (no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana_client.balancer import BalancedRecord, ReplicaCost
from nirvana_dev.bench.routing import _sim_kinds, _simulated


def _cost(ms_per_step: float, bypass_ms: float, cached_ms: float) -> ReplicaCost:
    cost = ReplicaCost(alpha=1.0)
    cost.observe(1.0, 10, {"unet_ms": 10 * ms_per_step, "total_ms": 10 * ms_per_step + bypass_ms}, bypass=True)
    cost.observe(2.0, 10, {"unet_ms": 20 * ms_per_step, "total_ms": 20 * ms_per_step + cached_ms}, bypass=False)
    return cost


def test_learnt_costs_become_simulator_kinds_and_replay_the_measured_steps() -> None:
    kinds = _sim_kinds([_cost(10.0, 50.0, 80.0), _cost(40.0, 60.0, 60.0)], ["0:cpu", "1:torch"])
    assert kinds[0].step_cost.rows == (2, 4) and kinds[0].step_cost.ms(4) == pytest.approx(20.0)
    assert kinds[0].fixed_ms(cache=True) == pytest.approx(80.0) and kinds[1].fixed_ms(cache=False) == 60.0
    # arrivals 10 s apart never overlap: each request costs fixed + its steps (N − K) at one request's pace
    records = [
        BalancedRecord(i, "p", 10.0 * i, 0, 100.0, 100.0, 100.0, cache_hit=i == 1, skipped_steps=5 * (i == 1))
        for i in range(3)
    ]
    summary = _simulated(kinds, np.array([0.0, 10.0, 20.0]), records, 20, "predicted-completion", max_active=8)
    assert summary["mean_ms"] == pytest.approx(80.0 + (20 + 15 + 20) / 3 * 10.0)


def test_the_measured_shared_host_slowdown_reaches_the_simulator() -> None:
    costs = [_cost(10.0, 50.0, 50.0), _cost(10.0, 50.0, 50.0)]
    kinds = _sim_kinds(costs, ["0:cpu", "1:torch"], [1.5, 2.0])
    assert [k.shared_slowdown for k in kinds] == [1.5, 2.0]
    records = [BalancedRecord(i, "p", 0.0, 0, 100.0, 100.0, 100.0) for i in range(2)]
    args = (np.array([0.0, 0.0]), records, 20, "round-robin")
    apart, shared = (_simulated(kinds, *args, max_active=8, shared=s)["mean_ms"] for s in (False, True))
    # side by side from t=0: the first runs 20 steps at 15 ms (300); the second, whose fixed ms doubled, runs 15
    # steps at 20 ms by then and its last 5 alone at 10
    assert apart == pytest.approx(50.0 + 200.0)
    assert shared == pytest.approx((50.0 + 300.0 + 100.0 + 350.0) / 2)


def test_pinning_splits_the_usable_cores_evenly_between_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from nirvana_dev.bench.routing import _cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    assert _cores(2, pin=True) == [(0, 1), (2, 3)]
    assert _cores(2, pin=False) == [None, None]
    assert _cores(6, pin=True) == [None] * 6  # fewer cores than replicas: no pinning
