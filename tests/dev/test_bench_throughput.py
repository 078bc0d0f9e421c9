"""`nirvana bench throughput`'s reading of Triton's counters."""

from __future__ import annotations

import pytest

from nirvana_dev.bench.throughput import server_figures


def test_a_batched_execution_is_counted_once_though_triton_sums_it_per_request() -> None:
    # Two UNet executions of 50 ms, each merging 3 requests' guidance pairs (6 rows): Triton adds 50 ms per request.
    after = {
        ("nv_inference_exec_count", "unet"): 2,
        ("nv_inference_count", "unet"): 12,
        ("nv_inference_request_success", "unet"): 6,
        ("nv_inference_compute_infer_duration_us", "unet"): 6 * 50_000,
        ("nv_inference_request_duration_us", "unet"): 6 * 52_000,
        ("nv_inference_request_success", "nirvana"): 3,
        ("nv_inference_compute_infer_duration_us", "nirvana"): 3 * 110_000,
    }
    figures = server_figures({}, after, steps_run=6)
    assert figures["unet_executions"] == 2 and figures["unet_rows_per_execution"] == 6
    assert figures["unet_ms_per_execution"] == pytest.approx(50.0)
    assert figures["server_ms_per_request"] == pytest.approx(110.0)
    # what the orchestrators spent beside their sub-model requests: 3 × 110 − 6 × 52 ms over 6 steps
    assert figures["overhead_ms_per_step"] == pytest.approx((330 - 312) / 6)
