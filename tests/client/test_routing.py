"""Placement policies and step-cost prediction (nirvana_client.routing), on hand-made replica states."""

from __future__ import annotations

import pytest

from nirvana_client.routing import (
    LeastOutstanding,
    PredictedCompletion,
    ReplicaState,
    RoundRobin,
    StepCost,
    make_policy,
    predict_drain_ms,
    predict_service_ms,
)

H200 = StepCost((1, 2, 4, 8, 16), (24.4, 23.7, 25.0, 30.1, 50.1))
SLOW = H200.scaled(2.0)


def _state(name: str, outstanding: int = 0, drain_ms: float = 0.0, cost: StepCost = H200) -> ReplicaState:
    return ReplicaState(name, outstanding, drain_ms, cost, fixed_ms=30.0, max_active=8)


def test_step_cost_interpolates_between_points_and_extrapolates_past_the_last() -> None:
    assert H200.ms(2) == pytest.approx(23.7)
    assert H200.ms(3) == pytest.approx((23.7 + 25.0) / 2)
    assert H200.ms(12) == pytest.approx((30.1 + 50.1) / 2)
    assert H200.ms(32) == pytest.approx(50.1 + (50.1 - 30.1) / 8 * 16)  # last segment's slope, 2.5 ms/row
    assert H200.ms(1) == H200.ms(0) == pytest.approx(24.4)  # no faster below the first measured point
    assert SLOW.ms(3) == pytest.approx(2 * H200.ms(3))


@pytest.mark.parametrize(
    ("rows", "ms"), [((2, 1), (1.0, 2.0)), ((1, 2), (1.0, -2.0)), ((1, 2), (1.0,)), ((0, 2), (1.0, 2.0))]
)
def test_step_cost_refuses_bad_curves(rows: tuple, ms: tuple) -> None:
    with pytest.raises(ValueError, match="StepCost"):
        StepCost(rows, ms)


def test_service_and_drain_follow_the_shared_batch() -> None:
    assert predict_service_ms(H200, 50, active_rows=6, fixed_ms=30.0) == pytest.approx(30.0 + 50 * 30.1)
    # two running (10 and 20 steps left): 10 steps at 4 rows, then 10 at 2 rows
    assert predict_drain_ms(H200, [10, 20], max_active=8) == pytest.approx(10 * 25.0 + 10 * 23.7)
    # one slot: strictly one after the other, each alone in a 2-row (guidance pair) batch
    assert predict_drain_ms(H200, [10, 20], max_active=1) == pytest.approx(30 * 23.7)
    # two slots, three queued: the third takes the first free slot
    assert predict_drain_ms(H200, [10, 10, 10], max_active=2) == pytest.approx(10 * 25.0 + 10 * 23.7)
    assert predict_drain_ms(H200, [], max_active=8) == 0.0


def test_round_robin_cycles_regardless_of_load() -> None:
    policy = RoundRobin()
    replicas = [_state("a", 5), _state("b"), _state("c")]
    assert [policy.choose(replicas, 50) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_least_outstanding_picks_the_emptiest_and_breaks_ties_by_index() -> None:
    policy = LeastOutstanding()
    assert policy.choose([_state("a", 3), _state("b", 1), _state("c", 1)], 50) == 1
    assert policy.choose([_state("a", 0), _state("b", 0)], 50) == 0


def test_predicted_completion_prefers_a_fast_idle_replica_over_a_slow_idle_one() -> None:
    policy = PredictedCompletion()
    assert policy.choose([_state("slow", cost=SLOW), _state("fast")], 50) == 1


def test_predicted_completion_avoids_a_fast_replica_whose_batch_is_full() -> None:
    # 16 held on a fast replica (8 running, 8 queued): ~5 s of work ahead, against ~2.4 s on the idle slow one
    loaded = _state("fast", outstanding=16, drain_ms=2 * 50 * 50.1)
    policy = PredictedCompletion()
    assert policy.choose([loaded, _state("slow", cost=SLOW)], 50) == 1
    assert PredictedCompletion.completion_ms(loaded, 50) > PredictedCompletion.completion_ms(_state("s", cost=SLOW), 50)


def test_predicted_completion_batches_onto_a_fast_replica_with_free_slots() -> None:
    # 3 running on the fast one: joining costs 50 steps at 8 rows (~1.5 s) < 50 at 2 rows on the slow one (~2.4 s)
    busy_fast = _state("fast", outstanding=3, drain_ms=50 * 30.1)
    assert PredictedCompletion().choose([_state("slow", cost=SLOW), busy_fast], 50) == 1


def test_make_policy_by_name_and_unknown_names_are_refused() -> None:
    assert isinstance(make_policy("round-robin"), RoundRobin)
    assert isinstance(make_policy("least-outstanding"), LeastOutstanding)
    assert isinstance(make_policy("predicted-completion"), PredictedCompletion)
    with pytest.raises(ValueError, match=r"'fastest'.*round-robin, least-outstanding, predicted-completion"):
        make_policy("fastest")
