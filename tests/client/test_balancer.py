"""The client-side balancer (nirvana_client.balancer) with stub transports: choice, learning, threads, errors."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from nirvana_client.balancer import Balancer, ReplicaCost, latency_summary, run_balanced
from nirvana_client.cli import app
from nirvana_client.client import GenerateOptions, GenerateResult
from nirvana_client.load import Deadline, Timing
from nirvana_dev.install import free_ports


class FakeClock:
    """A clock the stub transport advances by each request's server time (sequential use only)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _result(steps_run: int, ms_per_step: float, fixed_ms: float, skipped: int = 0) -> GenerateResult:
    unet = steps_run * ms_per_step
    timings = {"unet_ms": unet, "total_ms": unet + fixed_ms}
    return GenerateResult(np.zeros((1, 1, 3), np.uint8), skipped > 0, skipped, 0.9, unet + fixed_ms, timings)


def _sequential_send(clock: FakeClock, ms_per_step: list[float], fixed_ms: float = 10.0, skipped=lambda p: 0):
    """A transport where replica i costs `ms_per_step[i]` per step; time passes only inside a request."""

    def send(index: int, prompt: str, options: GenerateOptions) -> GenerateResult:
        k = skipped(prompt)
        result = _result(options.steps - k, ms_per_step[index], fixed_ms, k)
        clock.now += result.server_timings_ms["total_ms"] / 1e3
        return result

    return send


def test_cost_model_learns_fixed_ms_and_step_ms_by_concurrency() -> None:
    cost = ReplicaCost(alpha=0.5, max_active=8)
    cost.observe(1.0, 20, {"unet_ms": 200.0, "total_ms": 230.0}, bypass=True)
    cost.observe(2.2, 20, {"unet_ms": 360.0, "total_ms": 390.0}, bypass=True)
    cost.observe(2.0, 20, {"unet_ms": 440.0, "total_ms": 470.0}, bypass=True)
    assert cost.fixed_ms == {"bypass": pytest.approx(30.0)}
    assert cost.fixed(bypass=False) == pytest.approx(30.0)  # the other path's figure until it has its own
    assert cost.step_ms == {1: pytest.approx(10.0), 2: pytest.approx((18.0 + 22.0) / 2)}  # EWMA at level 2
    curve = cost.curve()
    assert curve.rows == (2, 4) and curve.ms(4) == pytest.approx(20.0)
    cost.observe(3.0, 20, {"unet_ms": 100.0, "total_ms": 130.0}, bypass=True)  # noise: 3 in flight but faster
    assert cost.curve().ms(6) == pytest.approx(20.0)  # more rows are never predicted cheaper


def test_warm_up_learns_each_replica_and_predicted_completion_prefers_the_fast_one() -> None:
    clock = FakeClock()
    balancer = Balancer(["slow", "fast"], send=_sequential_send(clock, [30.0, 10.0]), clock=clock)
    balancer.warm_up(["a", "b", "c"], steps=20, concurrency=(1,))
    slow, fast = balancer.snapshot()
    assert slow["step_ms_by_concurrency"] == {1: pytest.approx(30.0)}
    assert fast["step_ms_by_concurrency"] == {1: pytest.approx(10.0)}
    assert slow["fixed_ms"]["bypass"] == pytest.approx(10.0)
    _, index, predicted = balancer.generate("x", GenerateOptions(steps=20))
    assert index == 1 and predicted == pytest.approx(20 * 10.0 + 10.0)
    assert balancer.prediction_errors()[0].relative_error == pytest.approx(0.0)


def test_round_robin_and_least_outstanding_ignore_speed() -> None:
    clock = FakeClock()
    balancer = Balancer(["slow", "fast"], policy="round-robin", send=_sequential_send(clock, [30.0, 10.0]), clock=clock)
    assert [balancer.generate("x", GenerateOptions(steps=5))[1] for _ in range(4)] == [0, 1, 0, 1]
    balancer = Balancer(["slow", "fast"], policy="least-outstanding", send=_sequential_send(clock, [30.0, 10.0]))
    assert [balancer.generate("x", GenerateOptions(steps=5))[1] for _ in range(3)] == [0, 0, 0]  # ties: lowest
    with pytest.raises(ValueError, match="unknown routing policy"):
        Balancer(["a"], policy="random")


def test_predicted_completion_moves_to_the_slow_replica_when_the_fast_one_is_busy() -> None:
    """The fast replica (10 ms/step alone, 40 ms/step with 4 in flight) holds 3 requests; the slow idle one
    (35 ms/step) then finishes a new request sooner, so it gets it."""
    release = threading.Event()
    clock = FakeClock()

    def send(index: int, prompt: str, options: GenerateOptions) -> GenerateResult:
        if prompt == "hold":
            release.wait(5)
        return _result(options.steps, 10.0, 10.0)

    balancer = Balancer(["slow", "fast"], send=send, clock=clock)
    with balancer._lock:  # a learnt state, as warm-up would leave it
        balancer._replicas[0].cost.step_ms = {1: 35.0}
        balancer._replicas[1].cost.step_ms = {1: 10.0, 2: 20.0, 4: 40.0}
    holders = [threading.Thread(target=balancer.generate, args=("hold", GenerateOptions(steps=20))) for _ in range(3)]
    for thread in holders:
        thread.start()
        while sum(r["in_flight"] for r in balancer.snapshot()) < holders.index(thread) + 1:
            time.sleep(0.001)
    assert [r["in_flight"] for r in balancer.snapshot()] == [0, 3]  # the first three all went to the fast one
    _, index, _ = balancer.generate("new", GenerateOptions(steps=20))
    release.set()
    for thread in holders:
        thread.join()
    assert index == 0


def test_expected_steps_use_the_pools_mean_skip_and_errors_are_split_by_hit() -> None:
    clock = FakeClock()
    send = _sequential_send(clock, [10.0], fixed_ms=0.0, skipped=lambda p: 10 if p.startswith("repeat") else 0)
    balancer = Balancer(["only"], send=send, clock=clock)
    balancer.warm_up(["w"], steps=20, concurrency=(1,))
    for prompt in ["new 1", "repeat 1", "new 2", "repeat 2"]:
        balancer.generate(prompt, GenerateOptions(steps=20))
    assert balancer.expected_skipped() == pytest.approx(5.0)  # (0 + 10 + 0 + 10) / 4
    _, _, predicted = balancer.generate("repeat 3", GenerateOptions(steps=20))
    assert predicted == pytest.approx(15 * 10.0)  # N − mean K steps; the hit runs 10 → 50 % too slow
    summary = balancer.error_summary()
    assert summary["hits"]["count"] == 3 and summary["misses"]["count"] == 2
    assert summary["hits"]["median"] > summary["misses"]["median"]
    _, _, predicted = balancer.generate("bypass", GenerateOptions(steps=20, cache_mode="bypass"))
    assert predicted == pytest.approx(20 * 10.0)  # bypass skips nothing


@pytest.mark.parametrize("policy", ["round-robin", "least-outstanding", "predicted-completion"])
def test_concurrent_generate_keeps_in_flight_counts_right(policy: str) -> None:
    peak = [0]
    lock = threading.Lock()

    def send(index: int, prompt: str, options: GenerateOptions) -> GenerateResult:
        held = sum(r["in_flight"] for r in balancer.snapshot())
        with lock:
            peak[0] = max(peak[0], held)
        assert 1 <= held <= 12
        time.sleep(random.uniform(0, 0.002))
        return _result(options.steps, 1.0, 1.0)

    balancer = Balancer(["a", "b", "c"], policy=policy, send=send)
    threads = [
        threading.Thread(target=lambda: [balancer.generate("p", GenerateOptions(steps=4)) for _ in range(25)])
        for _ in range(12)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = balancer.snapshot()
    assert [r["in_flight"] for r in snapshot] == [0, 0, 0]
    assert sum(r["answered"] for r in snapshot) == 300 and len(balancer.prediction_errors()) == 300
    assert peak[0] > 1  # the calls really overlapped


def test_a_transport_error_propagates_and_frees_the_slot() -> None:
    def send(index: int, prompt: str, options: GenerateOptions) -> GenerateResult:
        raise ConnectionError(f"replica {index} down")

    balancer = Balancer(["a", "b"], send=send)
    with pytest.raises(ConnectionError, match="replica 0 down"):
        balancer.generate("p", GenerateOptions(steps=4))
    snapshot = balancer.snapshot()
    assert [r["in_flight"] for r in snapshot] == [0, 0] and snapshot[0]["errors"] == 1
    assert balancer.prediction_errors() == []


def test_run_balanced_paces_requests_and_keeps_failures_as_records() -> None:
    def send(index: int, prompt: str, options: GenerateOptions) -> GenerateResult:
        if prompt == "bad":
            raise RuntimeError("server said no")
        return _result(options.steps, 1.0, 1.0, skipped=2 if prompt == "hit" else 0)

    balancer = Balancer(["a", "b"], policy="round-robin", send=send)
    pairs = [(p, GenerateOptions(steps=5)) for p in ["miss", "hit", "bad", "miss"]]
    records = run_balanced(balancer, pairs, Timing("poisson", rate=200.0, seed=1), Deadline(10.0))
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert [r.ok for r in records] == [True, True, False, True] and records[2].error == "server said no"
    summary = latency_summary(records, 2)
    assert summary["errors"] == 1 and summary["hit_rate"] == pytest.approx(1 / 3)
    assert sum(summary["share"]) == pytest.approx(1.0)


def test_cli_replay_over_several_urls_reports_unreachable_replicas_as_errors(tmp_path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("a cat\na dog\n")
    ports = free_ports(2)  # nothing listens there
    out = tmp_path / "o"
    urls = [arg for port in ports for arg in ("--url", f"127.0.0.1:{port}")]
    args = ["replay", str(workload), "-o", str(out), *urls, "--policy", "round-robin", "--rate", "50"]
    result = CliRunner().invoke(app, [*args, "--timeout", "5"])
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == "round-robin" and report["errors"] == 2
    assert [r["errors"] for r in report["replicas"]] == [1, 1]
    result = CliRunner().invoke(app, [*args, "--compare-bypass"])
    assert result.exit_code == 2 and "one --url" in result.output
    result = CliRunner().invoke(app, ["replay", str(workload), "-o", str(out), "--policy", "random"])
    assert result.exit_code == 2 and "policy" in result.output


def test_dns_urls_expand_to_every_address_and_bad_ones_are_named() -> None:
    from nirvana_client.balancer import expand_urls

    assert expand_urls(["dns:localhost:8001", "10.0.0.7:8001"])[-1] == "10.0.0.7:8001"
    assert "127.0.0.1:8001" in expand_urls(["dns:localhost:8001"])
    with pytest.raises(ValueError, match="write dns:HOST:PORT"):
        expand_urls(["dns:localhost"])
    with pytest.raises(ValueError, match="does not resolve"):
        expand_urls(["dns:no-such-host.invalid:8001"])


def test_server_prediction_errors_skip_answers_without_a_prediction() -> None:
    from nirvana_client.balancer import BalancedRecord, server_prediction_errors

    def rec(predicted, actual):
        return BalancedRecord(0, "p", 0.0, 0, 1.0, 1.0, actual, server_predicted_ms=predicted)

    stats = server_prediction_errors([rec(110.0, 100.0), rec(None, 100.0), rec(90.0, 100.0), rec(100.0, None)])
    assert stats["count"] == 2 and abs(stats["median"] - 0.1) < 1e-9
