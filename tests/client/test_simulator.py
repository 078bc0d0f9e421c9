"""The replica-pool simulator (nirvana_sim): queueing sanity, cache and policy effects, determinism, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from nirvana_client.routing import StepCost, make_policy
from nirvana_sim.cli import app
from nirvana_sim.engine import DIFFUSIONDB_CLIP, Workload, draw_steps, poisson_arrivals, simulate
from nirvana_sim.experiments import capacity_rps, run_sweep
from nirvana_sim.model import BUILTIN_KINDS, GpuKind, load_kinds, parse_pool

H200 = BUILTIN_KINDS["h200"]


def _mean_latency(spec: str, load: float, requests: int, policy: str = "round-robin", cache: bool = False) -> float:
    pool = parse_pool(spec, BUILTIN_KINDS)
    arrivals = poisson_arrivals(requests, load * capacity_rps(pool), seed=3)
    workload = Workload(arrivals, draw_steps(requests, 50, DIFFUSIONDB_CLIP if cache else None, seed=3))
    return float(simulate(pool, workload, make_policy(policy), cache).latencies_ms.mean())


def test_one_replica_at_low_load_serves_each_request_in_its_service_time() -> None:
    service_ms = H200.fixed_ms(cache=False) + 50 * H200.step_cost.ms(2)
    assert _mean_latency("h200:1", load=0.01, requests=300) == pytest.approx(service_ms, rel=0.01)


def test_past_capacity_latency_keeps_growing_with_the_number_of_requests() -> None:
    short, long = _mean_latency("h200:1", 2.0, 150), _mean_latency("h200:1", 2.0, 300)
    assert long > 1.5 * short


def test_cache_hits_lower_mean_latency_at_equal_load() -> None:
    assert _mean_latency("h100:2", 0.7, 400, cache=True) < _mean_latency("h100:2", 0.7, 400, cache=False)


def test_predicted_completion_beats_round_robin_on_unequal_replicas() -> None:
    spec = "h100:1,a100:1"
    predicted = _mean_latency(spec, 0.7, 600, policy="predicted-completion")
    assert predicted < _mean_latency(spec, 0.7, 600, policy="round-robin")


def test_a_sweep_is_identical_for_the_same_seed() -> None:
    pool = parse_pool("h100:2,l4:2", BUILTIN_KINDS)
    first, second = (run_sweep(pool, [0.5], 200, seed=7) for _ in range(2))
    assert first == second and len(first) == 6
    assert run_sweep(pool, [0.5], 200, seed=8) != first


def test_cli_prints_a_table_and_writes_json_and_plot(tmp_path) -> None:
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["simulate", "--replicas", "h100:2,l4:2", "--loads", "0.3,0.6", "--requests", "150"]
    result = CliRunner().invoke(app, [*args, "--json", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "predicted-completion" in result.output
    report = json.loads(out_json.read_text())
    assert report["config"]["pool_size"] == 4 and len(report["rows"]) == 2 * 2 * 3
    assert np.isfinite([row["p99_ms"] for row in report["rows"]]).all()
    assert out_png.stat().st_size > 0


def test_cli_refuses_an_unknown_kind_and_takes_kinds_from_a_file(tmp_path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--replicas", "tpu:2", "--requests", "10"])
    assert result.exit_code == 2 and "tpu" in result.output
    kinds = tmp_path / "kinds.json"
    spec = {"rows": [1, 2, 4], "ms": [300.0, 420.0, 700.0], "encode_ms": 40, "decode_ms": 900, "cache_ms": 5}
    kinds.write_text(json.dumps({"cpu": spec}))
    args = ["simulate", "--replicas", "cpu:2", "--loads", "0.5", "--requests", "50", "--kinds-file", str(kinds)]
    result = CliRunner().invoke(app, [*args, "--steps", "20"])
    assert result.exit_code == 0, result.output
    kinds.write_text(json.dumps({"cpu": spec | {"by_in_flight": True}}))
    assert load_kinds(kinds)["cpu"].by_in_flight and not BUILTIN_KINDS["h100"].by_in_flight


def test_trace_arrivals_replay_the_diffusiondb_gaps(tmp_path) -> None:
    trace = tmp_path / "trace.csv"
    stamps = ["2022-08-14 00:45:00+00:00"] * 3 + ["2022-08-14 00:47:00+00:00", "2022-08-14 00:46:00+00:00"]
    trace.write_text("prompt,timestamp\n" + "".join(f"p{i},{s}\n" for i, s in enumerate(stamps)))
    args = ["simulate", "--replicas", "h100:2", "--loads", "0.5", "--requests", "40", "--trace", str(trace)]
    out_json = tmp_path / "t.json"
    assert CliRunner().invoke(app, [*args, "--json", str(out_json)]).exit_code == 0
    assert json.loads(out_json.read_text())["config"]["trace"] == str(trace)


def _flat_kind(step_ms: float, fixed_ms: float, shared_slowdown: float) -> GpuKind:
    return GpuKind("flat", StepCost((2,), (step_ms,)), fixed_ms, 0.0, 0.0, shared_slowdown)


def test_replicas_sharing_a_host_slow_each_other_only_while_both_hold_work() -> None:
    pool = [_flat_kind(10.0, 0.0, 2.0)] * 2
    # request 0 runs 5 steps alone (50 ms), then 5 beside request 1 at 20 ms; request 1 runs 5 at 20 ms until
    # request 0 finishes at 150 ms, then its last 5 alone at 10 ms
    workload = Workload(np.array([0.0, 50.0]), np.array([10, 10]))
    shared = simulate(pool, workload, make_policy("round-robin"), cache=False, hosts=[0, 0])
    assert shared.latencies_ms.tolist() == pytest.approx([150.0, 150.0])
    apart = simulate(pool, workload, make_policy("round-robin"), cache=False, hosts=[0, 1])
    assert apart.latencies_ms.tolist() == pytest.approx([100.0, 100.0])
    assert simulate(pool, workload, make_policy("round-robin"), cache=False).latencies_ms.tolist() == [100.0, 100.0]


def test_fixed_costs_take_the_slowdown_when_a_neighbour_is_busy_at_arrival() -> None:
    pool = [_flat_kind(10.0, 30.0, 1.5)] * 2
    workload = Workload(np.array([0.0, 0.0, 1000.0]), np.array([10, 10, 10]))
    latencies = simulate(pool, workload, make_policy("round-robin"), cache=False, hosts=[7, 7]).latencies_ms
    # both at t=0: the first arrives beside an idle neighbour (fixed 30) but steps at 15 once the second starts
    assert latencies.tolist() == pytest.approx([30.0 + 150.0, 45.0 + 150.0, 30.0 + 100.0])


def test_hosts_must_name_one_host_per_replica_and_slowdown_is_at_least_one() -> None:
    workload = Workload(np.array([0.0]), np.array([5]))
    with pytest.raises(ValueError, match="one host per replica"):
        simulate([H200, H200], workload, make_policy("round-robin"), cache=False, hosts=[0])
    with pytest.raises(ValueError, match="shared_slowdown"):
        _flat_kind(10.0, 0.0, 0.5)


def test_a_curve_learnt_by_requests_in_flight_counts_those_still_in_their_fixed_ms() -> None:
    curve = StepCost((2, 4), (10.0, 20.0))  # ms per step with 1 and 2 requests
    workload = Workload(np.array([0.0, 10.0]), np.array([1, 1]))
    # request 0 steps alone (0-10 ms), then spends 100 fixed ms; request 1 arrives at 10 ms, as 0 leaves the batch
    by_rows = GpuKind("rows", curve, 100.0, 0.0, 0.0)
    latencies = simulate([by_rows], workload, make_policy("round-robin"), cache=False).latencies_ms
    assert latencies.tolist() == pytest.approx([110.0, 110.0])  # 1 request in the batch: 10 ms
    by_in_flight = GpuKind("learnt", curve, 100.0, 0.0, 0.0, by_in_flight=True)
    latencies = simulate([by_in_flight], workload, make_policy("round-robin"), cache=False).latencies_ms
    assert latencies.tolist() == pytest.approx([110.0, 120.0])  # request 0 is still held until 110 ms: 20 ms
