"""`nirvana-quality latents`: a codec's bytes per entry and its resumed images against float16's, on the same pairs."""

from __future__ import annotations

from nirvana_quality.latents import run_latents


def test_q6_entries_are_smaller_and_resumed_images_are_compared_with_float16s(tiny_checkpoint_dir, tmp_path) -> None:
    q6 = run_latents(tiny_checkpoint_dir, "q6", pairs=4, steps=8, ks=(2, 5), seed=0, work_dir=tmp_path / "q6")
    f32 = run_latents(tiny_checkpoint_dir, "float32", pairs=4, steps=8, ks=(2, 5), seed=0, work_dir=tmp_path / "f32")
    assert q6["entry_bytes"]["q6"] < q6["entry_bytes"]["float16"] < f32["entry_bytes"]["float32"]
    # float16's own rounding barely moves a pixel; 6 bits move some, and the report says by how much
    assert f32["max_grey_diff"] <= 2 and q6["max_grey_diff"] > f32["max_grey_diff"]
    assert set(q6["per_k"]) == {"2", "5"} and q6["pairs"] == 4 and "judge_accuracy" not in q6  # no judge here
