"""Cache efficiency arithmetic on synthetic per-request server timings."""

from __future__ import annotations

import math

import pytest

from nirvana_client.efficiency import Sample, cache_efficiency, cache_work_ms, lookup_ms, summary, unet_step_ms

STEP_MS = 5.0


def bypass(total: float, steps: int = 20, index: int = 0) -> Sample:
    timings = {"text_encode_ms": 2.0, "unet_ms": STEP_MS * steps, "decode_ms": 3.0, "total_ms": total}
    return Sample("bypass", steps, 0, False, timings, index)


def hit(total: float, k: int, steps: int = 20, index: int = 0, **extra: float) -> Sample:
    timings = {"embed_ms": 1.0, "search_ms": 0.5, "select_ms": 0.1, "latent_load_ms": 0.4, "total_ms": total}
    return Sample("cached", steps, k, True, timings | {"unet_ms": STEP_MS * (steps - k)} | extra, index)


def miss(total: float, steps: int = 20, index: int = 0, **extra: float) -> Sample:
    timings = {"embed_ms": 1.0, "search_ms": 0.5, "select_ms": 0.1, "admit_ms": 2.0, "total_ms": total}
    return Sample("cached", steps, 0, False, timings | {"unet_ms": STEP_MS * steps} | extra, index)


def test_a_hit_that_saves_what_it_skips_has_efficiency_one() -> None:
    # 10 steps of 5 ms skipped, server time 50 ms below the bypass mean
    e = cache_efficiency([bypass(140.0), bypass(160.0), hit(100.0, k=10, index=7)])
    assert e["unet_step_ms"] == STEP_MS
    (row,) = e["requests"]
    assert row == {
        "index": 7,
        "steps": 20,
        "k": 10,
        "hit": True,
        "server_ms": 100.0,
        "bypass_server_ms": 150.0,
        "unet_saved_ms": 50.0,
        "delta_ms": 50.0,
        "efficiency": 1.0,
    }
    assert e["overall"] == 1.0 and e["per_hit"]["p50"] == 1.0 and e["by_k"] == {"10": 1.0}
    assert e["miss"] is None  # no miss to measure


def test_a_hit_that_saves_half_has_efficiency_half() -> None:
    e = cache_efficiency([bypass(150.0), hit(125.0, k=10)])
    assert e["requests"][0]["efficiency"] == 0.5 and e["overall"] == 0.5


def test_overall_counts_what_misses_cost_against_what_hits_save() -> None:
    # bypass 150 ms; two hits (K=10 → 100 ms, K=4 → 132 ms); two misses each 6 ms slower than bypass
    samples = [bypass(150.0), bypass(150.0), hit(100.0, 10), hit(132.0, 4), miss(156.0), miss(156.0)]
    e = cache_efficiency(samples)
    saved = (50.0 + 20.0) / 4  # UNet ms saved per cached request, misses saving 0
    cached_mean = (100.0 + 132.0 + 156.0 + 156.0) / 4
    assert e["unet_saved_ms_mean"] == pytest.approx(saved)
    assert e["server_saved_ms_mean"] == pytest.approx(150.0 - cached_mean)
    assert e["overall"] == pytest.approx((150.0 - cached_mean) / saved)  # (150 − 136) / 17.5 = 0.8
    assert e["overall"] == pytest.approx(0.8)
    assert e["by_k"] == {"4": pytest.approx(0.9), "10": pytest.approx(1.0)}
    assert e["per_hit"]["count"] == 2 and e["per_hit"]["mean"] == pytest.approx(0.95)
    misses = [r for r in e["requests"] if not r["hit"]]
    assert [r["efficiency"] for r in misses] == [None, None] and [r["delta_ms"] for r in misses] == [-6.0, -6.0]


def test_cache_path_share_of_a_miss() -> None:
    e = cache_efficiency([bypass(100.0), bypass(100.0), miss(104.0), hit(60.0, 8)])
    m = e["miss"]
    assert m["misses"] == 1
    assert m["cache_ms_by_phase"] == {"embed_ms": 1.0, "lookup_ms": pytest.approx(0.6), "admit_ms": 2.0}
    assert m["cache_ms_mean"] == pytest.approx(3.6) and m["bypass_server_ms_mean"] == 100.0
    assert m["share"] == pytest.approx(0.036) and m["share_per_miss"]["p50"] == pytest.approx(0.036)
    assert m["phases_not_reported"] == []


def test_the_bls_round_trip_replaces_its_parts() -> None:
    timings = {"embed_ms": 1.0, "search_ms": 0.5, "select_ms": 0.1, "cache_call_ms": 3.0, "admit_ms": 2.0}
    assert lookup_ms(timings) == 3.0  # search and select are inside the round trip: not counted twice
    assert cache_work_ms(timings) == {"embed_ms": 1.0, "lookup_ms": 3.0, "admit_ms": 2.0}
    e = cache_efficiency([bypass(100.0), Sample("cached", 20, 0, False, timings | {"total_ms": 106.0})])
    assert e["miss"]["share"] == pytest.approx(0.06)


def test_a_phase_no_miss_reported_is_named() -> None:
    no_admit = Sample("cached", 20, 0, False, {"search_ms": 1.0, "unet_ms": 100.0, "total_ms": 110.0})
    assert cache_efficiency([bypass(100.0), no_admit])["miss"]["phases_not_reported"] == ["embed_ms", "admit_ms"]


def test_each_request_pairs_with_bypass_requests_of_its_step_count() -> None:
    samples = [bypass(100.0, steps=20), bypass(60.0, steps=10), hit(50.0, 10, steps=20), hit(35.0, 5, steps=10)]
    e = cache_efficiency(samples)
    assert unet_step_ms([s for s in samples if s.mode == "bypass"]) == STEP_MS
    assert [r["bypass_server_ms"] for r in e["requests"]] == [100.0, 60.0]
    assert [r["efficiency"] for r in e["requests"]] == [1.0, 1.0]
    assert e["overall"] == pytest.approx((80.0 - 42.5) / 37.5)


def test_requests_without_a_same_step_bypass_are_left_out() -> None:
    e = cache_efficiency([bypass(100.0, steps=20), hit(50.0, 10, steps=20), hit(1.0, 5, steps=30)])
    assert len(e["requests"]) == 1 and e["overall"] == 1.0


@pytest.mark.parametrize(
    ("samples", "reason"),
    [
        ([hit(50.0, 10)], "--compare-bypass"),
        ([bypass(100.0)], "--compare-bypass"),
        ([Sample("bypass", 20, 0, False, {"total_ms": 100.0}), hit(50.0, 10)], "unet_ms"),
        ([Sample("bypass", 20, 0, False, {"unet_ms": 100.0}), hit(50.0, 10)], "total_ms"),
        ([bypass(100.0, steps=10), hit(50.0, 10, steps=20)], "same step count"),
    ],
)
def test_unavailable_says_why(samples, reason) -> None:
    e = cache_efficiency(samples)
    assert set(e) == {"unavailable"} and reason in e["unavailable"]
    assert summary(e).startswith("cache efficiency: n/a (") and reason in summary(e)


def test_no_hits_leaves_overall_undefined_but_measures_misses() -> None:
    e = cache_efficiency([bypass(100.0), miss(104.0)])
    assert e["overall"] is None and e["per_hit"] is None and e["by_k"] == {}
    assert e["miss"]["share"] == pytest.approx(0.036)
    assert "overall=n/a" in summary(e) and "share of a miss=3.6%" in summary(e)


def test_summary_line() -> None:
    e = cache_efficiency([bypass(150.0), hit(100.0, 10), miss(153.6)])
    line = summary(e)
    assert "overall=" in line and "per-hit median=1.000" in line and "UNet step 5.00 ms" in line
    assert math.isfinite(e["overall"]) and "share of a miss=2.4%" in line


def test_the_overall_interval_covers_the_estimate_and_widens_with_noise() -> None:
    def run(spread: float) -> dict:
        samples = []
        for i in range(40):
            jitter = spread * (1 if i % 2 else -1)
            samples += [bypass(150.0 + jitter, index=i), hit(100.0 - jitter, k=10, index=i)]
        return cache_efficiency(samples)

    quiet, noisy = run(1.0), run(10.0)
    for e in (quiet, noisy):
        low, high = e["overall_ci95"]
        assert e["overall"] == pytest.approx(1.0) and low <= e["overall"] <= high
    assert noisy["overall_ci95"][1] - noisy["overall_ci95"][0] > 5 * (
        quiet["overall_ci95"][1] - quiet["overall_ci95"][0]
    )
    assert "95% CI" in summary(noisy)
    assert cache_efficiency([bypass(150.0), miss(152.0)])["overall_ci95"] is None  # nothing saved: no interval
