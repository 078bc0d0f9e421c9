"""The `nirvana` command line, run as a user runs it (typer's runner, same process)."""

import json

import pytest
from typer.testing import CliRunner

from nirvana_cli.main import app

runner = CliRunner()


def test_generate_shows_miss_then_paraphrase_hit(tiny_checkpoint_dir, tmp_path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "a red fox in the snow, photograph",
            "photo of a red fox in snow",
            "--checkpoint",
            str(tiny_checkpoint_dir),
            "--out-dir",
            str(tmp_path / "img"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--steps",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "miss (empty)" in result.output and "HIT K=" in result.output
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["000.png", "001.png"]


def test_bad_request_is_a_clear_cli_error(tiny_checkpoint_dir, tmp_path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "x",
            "--checkpoint",
            str(tiny_checkpoint_dir),
            "--steps",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "NUM_INFERENCE_STEPS=0" in result.output


def test_bench_replay_reports_hits_and_saved_steps(tiny_checkpoint_dir, tmp_path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("a red fox in the snow\nphoto of a red fox in snow\na bowl of ramen\na red fox in the snow\n")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "replay",
            str(workload),
            "--checkpoint",
            str(tiny_checkpoint_dir),
            "--steps",
            "10",
            "--json",
            str(out),
            "--work-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["requests"] == 4 and report["hit_rate"] == 0.5
    assert report["steps_saved_fraction"] == sum(int(k) * n for k, n in report["k_histogram"].items()) / 40
    assert report["unet_steps_run"] == 40 - round(report["steps_saved_fraction"] * 40)


def test_bench_overhead_small(tmp_path) -> None:
    out = tmp_path / "o.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "overhead",
            "--entries",
            "300",
            "--queries",
            "30",
            "--latent-shape",
            "4,16,16",
            "--admissions",
            "40",
            "--json",
            str(out),
            "--work-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    figures = report["entries"]["300"]
    assert report["dim"] == 768 and figures["recall_at_1"] == 1.0 and figures["hit_rate"] == 1.0
    for stage in ("search_ms", "select_ms", "latent_load_ms", "cache_path_ms"):
        assert 0 < figures[stage]["p50"] <= figures[stage]["p99"]
    restart = figures["restart"]  # a fresh process opened the cache the bench filled and admitted into it
    assert restart["entries_at_open"] == 300 and restart["recall_at_1_cos085"] == 1.0
    assert restart["below_capacity"]["admissions"] == 40 and restart["below_capacity"]["per_s"] > 0
    at_capacity = restart["at_capacity"]
    assert at_capacity["capacity"] == 340 and at_capacity["entries_after"] <= 340 and at_capacity["evictions"] >= 40
    assert restart["cache_owner_rss_mib"] > 0 and figures["disk_bytes_per_entry"]["latents"] > 0


@pytest.mark.integration
def test_demo_runs_the_served_path(tiny_checkpoint_dir, tmp_path) -> None:
    result = runner.invoke(
        app, ["demo", "--work-dir", str(tmp_path), "--checkpoint", str(tiny_checkpoint_dir), "--steps", "6"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("HIT") == 2 and "nirvana_cache_hits_total 2" in result.output
    images = tmp_path / "images"
    assert sorted(p.name for p in images.glob("*.png")) == [
        "000.png", "001.hit.png", "001.png", "002.png", "003.hit.png", "003.png"
    ]  # fmt: skip
    # Each hit is saved beside the same request computed in full (cache bypassed): twice as wide.
    from PIL import Image

    assert Image.open(images / "001.hit.png").size == (2 * Image.open(images / "001.png").size[0], 64)
    # The contact sheet: a row per prompt (uncached beside served), named in the output.
    from nirvana_dev.demo_sheet import CELL, HEADER, MARGIN

    assert "contact sheet" in result.output
    assert Image.open(tmp_path / "sheet.png").size[1] == HEADER + 4 * (CELL + MARGIN) + MARGIN


def test_demo_refuses_an_unknown_model(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "--work-dir", str(tmp_path), "--model", "sdxl"])
    assert result.exit_code != 0 and "--model='sdxl': expected shapes or tiny" in result.output


def test_the_demo_reuses_a_trained_shapes_model_and_serves_it_with_the_calibrated_table(tmp_path) -> None:
    from nirvana.config import load_config
    from nirvana_dev.demo import shapes_demo_config, shapes_demo_model

    kept = tmp_path / "cache" / "nirvana" / "shapes-demo-model"
    (kept / "judge").mkdir(parents=True)
    (kept / "model_index.json").write_text("{}")
    said: list[str] = []
    assert shapes_demo_model(tmp_path / "cache" / "nirvana", minutes=8, say=said.append) == kept
    assert said == [f"using the shapes model trained earlier in {kept}"]  # nothing trained
    config = load_config({"checkpoint": "."}, shapes_demo_config(tmp_path))
    assert config.embedder == "clip" and config.cache.selection.selector().k_opt(0.995, 20) == 16
    assert config.cache.selection.selector().k_opt(0.98, 20) == 0
