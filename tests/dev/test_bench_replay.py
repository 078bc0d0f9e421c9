"""`nirvana bench replay` in-process: the bypass comparison leaves the cache figures alone and adds efficiency."""

from __future__ import annotations

import math

from nirvana_dev.bench.replay import run_replay

PROMPTS = ["a red fox in the snow", "photo of a red fox in snow", "a bowl of ramen", "a red fox in the snow"]


def test_bypass_comparison_reports_efficiency_and_keeps_the_cache_figures(tiny_checkpoint_dir, tmp_path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("\n".join(PROMPTS) + "\n")
    options = {"checkpoint": tiny_checkpoint_dir, "steps": 10, "work_dir": tmp_path}
    compared = run_replay(workload, block_size=3, **options)
    alone = run_replay(workload, compare_bypass=False, **options)

    for key in ("requests", "hit_rate", "k_histogram", "steps_saved_fraction", "unet_steps_run", "miss_reasons"):
        assert compared[key] == alone[key]  # bypass requests neither read nor write the cache
    assert compared["hit_rate"] == 0.5 and compared["compare_bypass"] is True
    e = compared["cache_efficiency"]
    assert len(compared["per_request_efficiency"]) == 4 and e["per_hit"]["count"] == 2
    assert e["unet_step_ms"] > 0 and compared["bypass_latency_ms"]["mean"] > 0
    for value in (e["overall"], e["per_hit"]["p50"], e["miss"]["share"], e["miss"]["cache_ms_mean"]):
        assert math.isfinite(value)
    assert set(e["by_k"]) == set(map(str, compared["k_histogram"]))
    assert e["miss"]["cache_ms_by_phase"]["admit_ms"] > 0 and e["miss"]["phases_not_reported"] == []
    assert "unavailable" in alone["cache_efficiency"] and alone["per_request_efficiency"] == []
    assert alone["bypass_latency_ms"] is None
