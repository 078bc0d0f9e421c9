"""`nirvana bench steps`: the step-cost arithmetic and the acceptance summary, without a server."""

from __future__ import annotations

import pytest

from nirvana_dev.bench.steps import step_cost, summarise


def test_the_served_step_cost_is_the_median_latency_added_per_added_step() -> None:
    short = [100.0, 90.0, 300.0]  # one outlier: medians, not means
    long = [280.0, 270.0, 275.0, 1000.0]
    cost = step_cost(short, long, 4, 22)
    assert cost["median_ms_short"] == 100 and cost["median_ms_long"] == pytest.approx(277.5)
    assert cost["ms_per_step"] == pytest.approx((277.5 - 100) / 18)
    assert cost["requests_each"] == 3
    with pytest.raises(ValueError):
        step_cost(short, long, 22, 4)


def _level(in_flight: int, images_per_s: float, rows: float) -> dict:
    return {"in_flight": in_flight, "images_per_s": images_per_s, "rows_per_execution": rows}


def test_overhead_is_the_step_cost_beyond_the_unet_alone_and_the_checks_follow_issue_32() -> None:
    report = {
        "steps": 20,
        "levels": [1, 8],
        "unet_alone": {"median_ms_by_rows": {"2": 5.0, "16": 20.0}},
        "designs": {
            "scheduler": {
                "step_cost": {"ms_per_step": 5.4},
                "levels": [_level(1, 8.0, 2.0), _level(8, 17.0, 15.0)],
            },
            "per-step": {
                "step_cost": {"ms_per_step": 9.6},
                "levels": [_level(1, 5.0, 2.0), _level(8, 9.0, 6.4)],
            },
        },
    }
    summarise(report)
    assert report["designs"]["scheduler"]["overhead_ms_per_request_step"] == pytest.approx(0.4)
    assert report["designs"]["per-step"]["overhead_ms_per_request_step"] == pytest.approx(4.6)
    assert report["acceptance"] == {
        "overhead_ms_at_1_le_0_5": True,
        "rows_per_execution_at_8_ge_14": True,
        "images_per_s_8_vs_1_ge_2": True,
        "no_level_slower_than_per_step": True,
    }
    # 8 guidance pairs per 20 ms execution, 20 executions an image
    assert report["unet_alone_images_per_s_at_16_rows"] == pytest.approx(8 / (20 * 0.020))
    report["designs"]["scheduler"]["levels"][1] = _level(8, 8.5, 13.0)
    summarise(report)
    assert report["acceptance"]["rows_per_execution_at_8_ge_14"] is False
    assert report["acceptance"]["images_per_s_8_vs_1_ge_2"] is False
    assert report["acceptance"]["no_level_slower_than_per_step"] is False
