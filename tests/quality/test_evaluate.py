"""Evaluation at toy scale: a random-weight tiny model, a briefly trained judge, real MiniLM similarities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from nirvana.checkpoint import Checkpoint, load_checkpoint
from nirvana.config import load_config
from nirvana.embed import Embedder, make_embedder
from nirvana_cli.calibration.command import calibrate_cmd
from nirvana_dev.shapes.judge import Judge, train_judge
from nirvana_dev.shapes.scenes import Scene
from nirvana_dev.tiny_model import make_tiny_model
from nirvana_quality.cli import app as quality_app
from nirvana_quality.evaluate import (
    SIMILARITY_BINS,
    EvalSettings,
    PairGenerator,
    default_ks,
    evaluate_pairs,
    run_eval,
    summarise,
)
from nirvana_quality.plots import accuracy_vs_k
from nirvana_quality.workload import Pair, make_pairs

SETTINGS = EvalSettings(steps=4, ks=(1, 2), batch_size=2)
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # so rich does not fold a long path inside its error box


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight checkpoint with a judge trained for a few steps in judge/ (what the CLI expects)."""
    path = make_tiny_model(tmp_path_factory.mktemp("shapes_model"), seed=0, scheduler="ddim")
    judge, _ = train_judge(seed=0, steps=2, progress=False, held_out=8)
    judge.save(path / "judge")
    return path


@pytest.fixture(scope="module")
def checkpoint(model_dir: Path) -> Checkpoint:
    return load_checkpoint(model_dir)


@pytest.fixture(scope="module")
def judge(model_dir: Path) -> Judge:
    return Judge.load(model_dir / "judge")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return make_embedder("minilm")


@pytest.fixture(scope="module")
def evaluation(model_dir: Path, judge: Judge, embedder: Embedder) -> dict:
    return run_eval(model_dir, pairs=4, seed=0, settings=SETTINGS, judge=judge, embedder=embedder, progress=False)


def _pair(cached: str, new: str, seed: int = 7) -> Pair:
    scene = Scene("red", "circle", "small", "top left", "white")
    return Pair(0, "paraphrase", "calibration", seed, cached, new, scene, scene)


def test_records_have_a_judged_image_per_k_and_the_report_its_figures(evaluation: dict) -> None:
    records, report = evaluation["records"], evaluation["report"]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for record in records:
        assert -1.0 <= record["similarity"] <= 1.0 + 1e-6
        assert set(record["uncached"]["correct"]) == set(record["uncached"]["pred"]) == set(Scene.__annotations__)
        assert set(record["cached"]) == {"1", "2"}
        for cached in record["cached"].values():
            assert -1.0 <= cached["ssim"] <= 1.0
            assert cached["psnr"] is None or cached["psnr"] > 0
            assert (cached["leak"] is None) == (record["relation"] != "near_miss")
    assert 0.0 <= report["uncached_accuracy"] <= 1.0
    assert [cell["k"] for cell in report["by_k"]] == [1, 2]
    for k in (1, 2):
        assert sum(c["n"] for c in report["by_k_and_bin"] if c["k"] == k) == 4
    json.dumps(evaluation, allow_nan=False)  # strict JSON: no NaN or Infinity


def test_resuming_an_identical_prompt_gives_the_uncached_image(checkpoint: Checkpoint) -> None:
    prompt = "a small red circle in the top left on a white background"
    images = PairGenerator(checkpoint, SETTINGS).generate([prompt], [prompt], [7])
    assert np.abs(images.cached[1].astype(int) - images.uncached.astype(int)).max() <= 1
    assert np.array_equal(images.cached_source, images.uncached)


def test_resuming_a_different_prompt_changes_the_image(
    checkpoint: Checkpoint, judge: Judge, embedder: Embedder
) -> None:
    pair = _pair("a small red circle in the top left on a white background", "a huge blue square, dark backdrop")
    record = evaluate_pairs(checkpoint, judge, embedder, [pair], SETTINGS)[0]
    assert record["similarity"] < 0.9
    assert record["cached"]["2"]["psnr"] is not None  # not identical to B uncached: A's latent was used


def test_a_batch_gives_the_images_of_one_by_one_generation(checkpoint: Checkpoint) -> None:
    pairs = make_pairs(3, seed=4)
    args = ([p.cached_prompt for p in pairs], [p.new_prompt for p in pairs], [p.seed for p in pairs])
    batched = PairGenerator(checkpoint, SETTINGS).generate(*args)
    single = [PairGenerator(checkpoint, SETTINGS).generate([a], [b], [s]) for a, b, s in zip(*args, strict=True)]
    for name in ("cached_source", "uncached"):
        one = np.concatenate([getattr(s, name) for s in single]).astype(int)
        assert np.abs(getattr(batched, name).astype(int) - one).max() <= 1
    one = np.concatenate([s.cached[2] for s in single]).astype(int)
    assert np.abs(batched.cached[2].astype(int) - one).max() <= 1


def test_plot_is_written(evaluation: dict, tmp_path: Path) -> None:
    path = accuracy_vs_k(evaluation["report"], tmp_path / "plots" / "accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarise_counts_leaks_against_cached_values() -> None:
    scene = {"colour": "red", "shape": "circle", "size": "small", "position": "top left", "background": "white"}
    right = {"pred": scene, "correct": dict.fromkeys(scene, True)}
    leaked = {"pred": {**scene, "colour": "blue"}, "correct": {**dict.fromkeys(scene, True), "colour": False}}
    record = {"relation": "near_miss", "similarity": 0.97, "cached_source": right, "uncached": {**right, "leak": False}}
    record["cached"] = {"2": {**leaked, "leak": True, "ssim": 0.5, "psnr": 20.0}}
    report = summarise([record], EvalSettings(steps=4, ks=(2,)))
    cell = report["by_k"][0]
    assert cell["leak_rate_near_miss"] == 1.0 and cell["uncached_leak_rate_near_miss"] == 0.0
    assert cell["accuracy_drop"] == pytest.approx(0.2)
    assert report["by_k_and_bin"][0]["bin"] == [0.95, 1.0]


def test_settings_are_validated() -> None:
    assert default_ks(20) == (2, 4, 6, 8, 10, 12, 14, 16)
    assert default_ks(50) == (5, 10, 15, 20, 25, 30, 35, 40)
    with pytest.raises(ValueError, match=r"ks=\[0, 2\]"):
        EvalSettings(steps=4, ks=(0, 2))
    with pytest.raises(ValueError, match="guidance must be > 1"):
        EvalSettings(guidance=1.0)


def test_cli_eval_writes_json_and_plot(model_dir: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ["eval", "--checkpoint", str(model_dir), "--json", str(out), "--plot", str(plot)]
    result = CliRunner().invoke(quality_app, [*args, "--pairs", "2", "--steps", "4", "--ks", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["report"]["settings"]["ks"] == [2] and len(data["records"]) == 2
    assert plot.stat().st_size > 0
    # ... and the chain's last link: calibrate from that file, write a config the server reads.
    app = typer.Typer()
    app.command("calibrate")(calibrate_cmd)
    config = tmp_path / "thresholds.json"
    result = CliRunner().invoke(app, ["--eval-json", str(out), "--out", str(config), "--min-count", "1"])
    assert result.exit_code == 0, result.output
    assert load_config({"checkpoint": str(model_dir)}, path=config).cache.selection.reference_steps == 4
    # The same records fitted for the checkpoint's own text encoder: the server is told to embed with it.
    report = tmp_path / "clip.json"
    args = ["--eval-json", str(out), "--out", str(config), "--min-count", "1", "--embedder", "clip"]
    result = CliRunner().invoke(app, [*args, "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert load_config({"checkpoint": str(model_dir)}, path=config).embedder == "clip"
    assert json.loads(report.read_text())["embedder"] == "clip"


def test_cli_eval_bins_by_the_named_embedder(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(model_dir), "--json", str(out), "--pairs", "2", "--steps", "4", "--ks", "2"]
    result = CliRunner().invoke(quality_app, [*args, "--embedder", "clip"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["report"]
    assert report["settings"]["embedder"] == "clip" and report["similarity_bins"] == list(SIMILARITY_BINS["clip"])
    clip = make_embedder("clip", load_checkpoint(model_dir))
    record = json.loads(out.read_text())["records"][0]
    vectors = clip.embed([record["cached_prompt"], record["new_prompt"]])
    assert record["similarity"] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)
    result = CliRunner().invoke(quality_app, [*args, "--embedder", "bert"], env=WIDE)
    assert result.exit_code == 2 and "--embedder='bert'" in result.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "checkpoint folder does not exist"),
        (lambda tmp: tmp, "no model_index.json"),
    ],
)
def test_cli_eval_names_a_bad_checkpoint(tmp_path: Path, make, message: str) -> None:
    bad = make(tmp_path)
    args = ["eval", "--checkpoint", str(bad), "--json", str(tmp_path / "x.json")]
    result = CliRunner().invoke(quality_app, args, env=WIDE)
    assert result.exit_code == 2
    assert message in result.output and str(bad) in result.output


def test_cli_eval_rejects_a_k_outside_the_schedule(model_dir: Path, tmp_path: Path) -> None:
    args = ["eval", "--checkpoint", str(model_dir), "--json", str(tmp_path / "x.json"), "--steps", "4", "--ks", "4"]
    result = CliRunner().invoke(quality_app, args, env=WIDE)
    assert result.exit_code == 2 and "--ks='4'" in result.output


def test_cli_calibrate_evaluates_the_checkpoint_and_keeps_its_records(
    model_dir: Path, evaluation: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(  # the default sizes take minutes; the module's 4-pair evaluation stands in for them
        "nirvana_quality.evaluate.run_eval", lambda checkpoint, **kwargs: calls.append(checkpoint) or evaluation
    )
    config = tmp_path / "thresholds.toml"
    args = ["calibrate", "--checkpoint", str(model_dir), "--out", str(config), "--min-count", "1"]
    result = CliRunner().invoke(quality_app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert calls == [model_dir]
    assert json.loads((tmp_path / "thresholds.eval.json").read_text()) == evaluation
    assert load_config({"checkpoint": str(model_dir)}, path=config).cache.selection.reference_steps == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{tmp}/no-model"], "checkpoint folder does not exist: {tmp}/no-model"),
        ([], "Missing option '--checkpoint'"),
        (["--checkpoint", "{tmp}", "--max-leak-rate", "2"], "budget fractions must be in [0, 1]"),
    ],
)
def test_cli_calibrate_names_the_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    args = ["calibrate", *(a.format(tmp=tmp_path) for a in args), "--out", str(tmp_path / "t.toml")]
    result = CliRunner().invoke(quality_app, args, env=WIDE)
    assert result.exit_code == 2
    assert message.format(tmp=tmp_path) in result.output
