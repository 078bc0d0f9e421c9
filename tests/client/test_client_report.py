"""report.json figures from known records; report.md and the PNG plots are written."""

from __future__ import annotations

import json

import pytest

from nirvana_client.load import Timing
from nirvana_client.plots import write_plots
from nirvana_client.replay import Record, ReplayOptions, ReplayRun
from nirvana_client.report import build_report, latency_stats, to_markdown

STEPS = 20


def record(i: int, mode: str, latency: float, hit: bool = False, k: int = 0, ok: bool = True) -> Record:
    timings = {"text_encode_ms": 2.0, "unet_ms": 5.0 * (STEPS - k), "decode_ms": 3.0, "total_ms": 10.0}
    if mode == "cached":
        timings |= {"embed_ms": 1.0, "search_ms": 0.5, "select_ms": 0.1}
        timings |= {"latent_load_ms": 0.4} if hit else {"admit_ms": 2.0}
    return Record(
        index=i,
        mode=mode,
        block=0,
        prompt=f"p{i}",
        seed=i,
        steps=STEPS,
        sent_s=float(i),
        latency_ms=latency,
        ok=ok,
        error=None if ok else "boom",
        cache_hit=hit,
        skipped_steps=k,
        similarity=0.9 if hit else 0.1,
        server_timings_ms=timings if ok else {},
    )


@pytest.fixture
def run() -> ReplayRun:
    cached = [
        record(0, "cached", 100.0),
        record(1, "cached", 60.0, hit=True, k=10),
        record(2, "cached", 80.0, hit=True, k=5),
        record(3, "cached", 50.0, hit=True, k=10),
        record(4, "cached", 0.0, ok=False),
    ]
    bypass = [record(i, "bypass", 100.0 + i) for i in range(5)]
    return ReplayRun(cached + bypass, {"cached": 2.0, "bypass": 4.0}, 6.5, {"cached": 0, "bypass": 0}, "now")


def test_report_figures(run) -> None:
    options = ReplayOptions(url="x:1", steps=STEPS, timing=Timing("closed"), compare_bypass=True)
    report = build_report(run, options, "w.txt")
    assert report["requests"] == 5 and report["errors"] == 1
    assert report["by_mode"]["cached"] == {"requests": 5, "ok": 4, "errors": 1, "not_sent": 0}
    assert report["hits"] == 3 and report["hit_rate"] == 0.75
    assert report["skipped_steps"] == 25 and report["total_steps"] == 4 * STEPS
    assert report["steps_saved_fraction"] == 25 / 80
    assert report["k_histogram"] == {"5": 1, "10": 2}
    assert report["latency_ms"]["cached"]["mean"] == 72.5 and report["latency_ms"]["bypass"]["mean"] == 102.0
    assert report["latency_ms"]["cached"]["p50"] == 70.0
    assert report["throughput_rps"] == {"cached": 2.0, "bypass": 1.25}
    assert report["speedup_mean_latency"] == pytest.approx(102.0 / 72.5)
    assert report["latency_ratio_cached_over_bypass"]["mean"] == pytest.approx(72.5 / 102.0)
    stages = report["server_stage_ms"]
    assert stages["cached"]["latent_load_ms"] == pytest.approx({"mean": 0.4, "p50": 0.4, "p99": 0.4, "count": 3})
    assert "embed_ms" not in stages["bypass"]
    overhead = report["overhead"]
    assert overhead["cache_path_ms_mean"] == pytest.approx((1.6 * 4 + 0.4 * 3) / 4)
    assert overhead["unet_step_ms_mean"] == pytest.approx(5.0) and overhead["admit_ms_mean"] == 2.0
    efficiency = report["cache_efficiency"]  # every total_ms is 10: no server time saved
    assert efficiency["unet_step_ms"] == 5.0 and efficiency["unet_saved_ms_mean"] == pytest.approx(25 * 5.0 / 4)
    assert efficiency["overall"] == 0.0 and efficiency["by_k"] == {"5": 0.0, "10": 0.0}
    assert len(efficiency["requests"]) == 4 and efficiency["per_hit"]["count"] == 3
    # the one miss: embed 1 + search 0.5 + select 0.1 + admit 2 of a 10 ms bypass request
    assert efficiency["miss"]["cache_ms_mean"] == pytest.approx(3.6) and efficiency["miss"]["share"] == pytest.approx(
        0.36
    )
    json.dumps(report)  # serialisable as it stands
    for key in ("requests", "errors", "hit_rate", "steps_saved_fraction", "k_histogram", "latency_ms"):
        assert key in report
    assert set(report["latency_ms"]["cached"]) == {"p50", "p95", "p99", "mean"}


def test_report_without_bypass_has_empty_ratios(run) -> None:
    cached_only = ReplayRun([r for r in run.records if r.mode == "cached"], {"cached": 2.0}, 2.0, {"cached": 0}, "")
    report = build_report(cached_only, ReplayOptions(url="x:1", steps=STEPS), "w.txt")
    assert report["latency_ms"]["bypass"] is None and report["throughput_rps"]["bypass"] is None
    assert report["speedup_mean_latency"] is None
    assert "| latency mean (ms) | 72.5 | – | – |" in to_markdown(report)
    assert "unavailable" in report["cache_efficiency"]
    assert "Not computed: needs both cached and bypass requests" in to_markdown(report)


def test_markdown_reads_as_a_table(run) -> None:
    report = build_report(run, ReplayOptions(url="x:1", steps=STEPS, compare_bypass=True), "w.txt")
    text = to_markdown(report, ["latency_cdf.png"])
    assert "**Hit rate 75.0%** (3 of 4)" in text and "steps saved 31.2%" in text
    assert "| latency mean (ms) | 72.5 | 102.0 | 0.711 |" in text
    assert "| 10 | 2 | 50.0% | 0.000 |" in text and "## Cache efficiency" in text
    assert "| **overall** (all cached requests, hits and misses) | **0.000** (95% CI " in text
    assert "| **cache path's share of a miss** (1 misses) | **36.0%**" in text
    assert "![latency_cdf.png](latency_cdf.png)" in text and "![latency_cdf.png](latency_cdf.png)" in text
    assert "**1 errors**" in text and "`boom`" in text


def test_latency_stats_empty_is_none() -> None:
    assert latency_stats([]) is None
    assert latency_stats([1.0, 3.0]) == {"p50": 2.0, "p95": pytest.approx(2.9), "p99": pytest.approx(2.98), "mean": 2.0}


def test_plots_are_non_empty_pngs(run, tmp_path) -> None:
    paths = write_plots(run.records, tmp_path)
    assert {p.name for p in paths} == {"latency_cdf.png", "k_histogram.png", "warmup.png", "stages.png"}
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_plots_survive_a_run_without_responses(tmp_path) -> None:
    failed = [record(0, "cached", 0.0, ok=False)]
    assert all(p.stat().st_size > 0 for p in write_plots(failed, tmp_path))


def test_prediction_error_is_taken_over_the_requests_that_reported_one() -> None:
    from nirvana_client.report import prediction_error, prediction_summary

    records = [record(i, "cached", 10.0, hit=i % 2 == 0, k=8 if i % 2 == 0 else 0) for i in range(4)]
    for r, predicted in zip(records, (11.0, 8.0, 10.0), strict=False):  # the last one reported none
        r.server_timings_ms["predicted_total_ms"] = predicted
    errors = prediction_error(records)
    assert errors["all"]["count"] == 3 and errors["hits"]["count"] == 2 and errors["misses"]["count"] == 1
    assert errors["misses"]["median"] == pytest.approx(0.2) and errors["misses"]["median_signed"] == pytest.approx(-0.2)
    assert errors["hits"]["median"] == pytest.approx(0.05)  # |+10%| and 0
    line = prediction_summary({"prediction_error": {"cached": errors}})
    assert "median 10.0%" in line and "over 3" in line
