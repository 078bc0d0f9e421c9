"""`nirvana calibrate --checkpoint --workload` end to end on the tiny checkpoint: config the server loads, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nirvana.calibration.fidelity import ScorerError, make_scorer
from nirvana.config import load_config
from test_calibrate import WIDE, _cli

PROMPTS = [
    "a red circle on a white background",
    "a photo of a mountain lake at dawn",
    "a red circle on a white background, small",
    "a cat sleeping on a sofa",
    "a red circle on a plain white background",
    "a photo of a mountain lake at sunrise",
    "a cat sleeping on a couch",
    "an oil painting of a ship in a storm",
]


def test_cli_calibrates_a_checkpoint_on_a_workload(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    workload = tmp_path / "prompts.txt"
    workload.write_text("\n".join(PROMPTS) + "\n")
    out, report_dir = tmp_path / "thresholds.toml", tmp_path / "report"
    args = ["calibrate", "--checkpoint", str(tiny_checkpoint_dir), "--workload", str(workload), "--out", str(out)]
    args += ["--report-dir", str(report_dir), "--steps", "6", "--ks", "2,4", "--pairs", "6", "--min-count", "2"]
    args += ["--embedder", "minilm"]
    result = CliRunner().invoke(_cli(), args, env=WIDE)
    assert result.exit_code == 0, result.output
    config = load_config({"checkpoint": "unused"}, path=out)
    assert config.embedder == "minilm" and config.cache.selection.reference_steps == 6
    report = json.loads((report_dir / "report.json").read_text())
    assert report["pairs"] == 6 and report["settings"]["scorer"] == "ssim"
    assert all(
        set(r["scores"]) == {"2", "4"} and all(-1 <= s <= 1 for s in r["scores"].values()) for r in report["records"]
    )
    assert [list(t) for t in config.cache.selection.thresholds] == report["thresholds"]
    assert (report_dir / "summary.md").read_text().startswith("# Calibration of")
    grids = sorted(report_dir.glob("band_*.png"))
    assert grids and all(band.get("grid") for band in report["band_table"])
    assert "report:" in result.output


def test_cli_names_a_missing_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["calibrate", "--out", str(tmp_path / "t.toml")], env=WIDE)
    assert result.exit_code == 2 and "give either --eval-json FILE, or --checkpoint DIR and --workload FILE" in (
        result.output
    )


def test_an_unknown_scorer_names_the_choices_and_the_judge_needs_its_folder(tmp_path: Path) -> None:
    with pytest.raises(
        ScorerError, match=r"scorer 'lpips' is not available; choose one of \['judge', 'psnr', 'ssim'\]"
    ):
        make_scorer("lpips", tmp_path)
    with pytest.raises(ScorerError, match=r"scorer 'judge' needs a shapes checkpoint with a judge: .*judge"):
        make_scorer("judge", tmp_path)


def test_cli_calibrates_with_the_shapes_judge_through_the_same_code(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    from nirvana_dev.shapes.judge import train_judge

    model = Path(shutil.copytree(tiny_checkpoint_dir, tmp_path / "shapes-model"))
    train_judge(seed=0, steps=2, progress=False, held_out=8)[0].save(model / "judge")
    workload = tmp_path / "prompts.txt"
    workload.write_text("\n".join(PROMPTS) + "\n")
    out, report_dir = tmp_path / "thresholds.toml", tmp_path / "report"
    args = ["calibrate", "--checkpoint", str(model), "--workload", str(workload), "--out", str(out), "--scorer"]
    args += ["judge", "--report-dir", str(report_dir), "--steps", "6", "--ks", "2,4", "--pairs", "6"]
    args += ["--min-count", "2", "--embedder", "minilm"]
    result = CliRunner().invoke(_cli(), args, env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["scorer"] == "judge" and report["settings"]["min_score"] == 0.99
    scores = [s for r in report["records"] for s in r["scores"].values()]
    # shares of four attributes read alike: multiples of 1/4
    assert len(scores) == 12 and all(s in (0.0, 0.25, 0.5, 0.75, 1.0) for s in scores)
