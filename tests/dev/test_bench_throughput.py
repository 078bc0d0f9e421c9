"""`nirvana bench throughput`'s reading of Triton's counters and the step scheduler's."""

from __future__ import annotations

import pytest

from nirvana_dev.bench.throughput import SCHEDULER, parse_metrics, scheduler_figures, server_figures


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
    assert figures["design"] == "per-step" and "scheduler" not in figures
    assert figures["unet_executions"] == 2 and figures["unet_rows_per_execution"] == 6
    assert figures["rows_per_execution"] == 6
    assert figures["unet_ms_per_execution"] == pytest.approx(50.0)
    assert figures["server_ms_per_request"] == pytest.approx(110.0)
    # what the orchestrators spent beside their sub-model requests: 3 × 110 − 6 × 52 ms over 6 steps
    assert figures["orchestration_ms_per_step"] == pytest.approx((330 - 312) / 6)
    # everything but UNet execution: the 2 ms each request-step queued for the `unet` counts too
    assert figures["overhead_ms_per_step"] == pytest.approx((330 - 300) / 6)


METRICS_BEFORE = """\
# HELP nirvana_scheduler_rows_total UNet rows run by the step scheduler
# TYPE nirvana_scheduler_rows_total counter
nirvana_scheduler_rows_total 40
nirvana_scheduler_iterations_total 20
nirvana_scheduler_unet_executions_total 20
nirvana_scheduler_iteration_ms_total 100
nirvana_scheduler_join_wait_ms_total 4
nirvana_scheduler_active_requests 0
nv_inference_request_success{model="nirvana",version="1"} 1
nv_inference_compute_infer_duration_us{model="nirvana",version="1"} 150000
nv_inference_request_duration_us{model="text_encoder",version="1"} 2000
nv_inference_request_duration_us{model="vae_decoder",version="1"} 8000
nv_inference_request_duration_us{model="step_scheduler",version="1"} 120000
"""
# then 4 requests of 20 steps, in 20 iterations of 8 rows (4 guidance pairs) at 20 ms each
METRICS_AFTER = """\
nirvana_scheduler_rows_total{} 200
nirvana_scheduler_iterations_total{} 40
nirvana_scheduler_unet_executions_total{} 40
nirvana_scheduler_iteration_ms_total{} 500
nirvana_scheduler_join_wait_ms_total{} 44
nirvana_scheduler_active_requests{} 0
nv_inference_request_success{model="nirvana",version="1"} 5
nv_inference_compute_infer_duration_us{model="nirvana",version="1"} 2070000
nv_inference_request_duration_us{model="text_encoder",version="1"} 10000
nv_inference_request_duration_us{model="vae_decoder",version="1"} 40000
nv_inference_request_duration_us{model="step_scheduler",version="1"} 1840000
"""


def test_the_scheduler_counters_give_rows_per_execution_and_the_overhead_beside_its_iterations() -> None:
    before, after = parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER)
    assert after[("nirvana_scheduler_rows_total", SCHEDULER)] == 200  # with or without an empty label set
    assert before[("nv_inference_request_duration_us", "step_scheduler")] == 120_000
    figures = server_figures(before, after, steps_run=80)
    scheduler = figures["scheduler"]
    assert figures["design"] == "scheduler" and scheduler["iterations"] == 20 and scheduler["unet_executions"] == 20
    assert figures["rows_per_execution"] == 8 and figures["unet_rows_per_execution"] is None  # no `unet` model call
    assert scheduler["ms_per_iteration"] == pytest.approx(20.0)
    assert scheduler["join_wait_ms_per_step"] == pytest.approx(40 / 80)
    # 4 requests × 480 ms in `nirvana`, minus encode and decode (8 + 32 ms), minus 80 request-steps × 20 ms of UNet
    assert figures["overhead_ms_per_step"] == pytest.approx((1920 - 40 - 80 * 20) / 80)
    # the decoupled scheduler's request duration ends when its `execute` returns, not with the loop: not subtractable
    assert figures["orchestration_ms_per_step"] is None


def test_without_a_step_scheduler_there_are_no_scheduler_figures() -> None:
    assert scheduler_figures({}, {("nv_inference_count", "unet"): 4}, steps_run=2) is None
