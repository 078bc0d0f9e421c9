"""Calibration on hand-built records whose right answer is known, and the file the server reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nirvana.calibration.table import (
    Budget,
    apply_thresholds,
    calibrate,
    fit_thresholds,
    rescore,
    steps_saved,
    write_config,
)
from nirvana.config import load_config
from nirvana.embed import Embedder, make_embedder
from nirvana.k_choice import KSelector
from nirvana_cli.calibration.command import calibrate_cmd
from nirvana_dev.launch import ServeOptions, engine_config

SCENE = {"colour": "red", "shape": "circle", "size": "small", "position": "top left", "background": "white"}
KS = (4, 8, 16)
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}
GOOD = {16: 0.9, 8: 0.6, 4: 0.3}  # K -> similarity above which cached images are perfect
# Bands of these toy records hold 2-15 near misses: with no leak their one-sided 95% Wilson bounds are 0.15-0.58, so
# tests of the fitting rule (not of the evidence it needs) allow a leak rate of 0.6 at the upper bound.
LENIENT = Budget(min_count=5, max_leak_rate=0.6)


def _judged(correct: int, leak: bool | None) -> dict:
    """A judged image with ``correct`` of the 5 attributes right."""
    flags = {name: i < correct for i, name in enumerate(SCENE)}
    return {"pred": SCENE, "correct": flags, "leak": leak, "ssim": 1.0, "psnr": None}


def _record(i: int, similarity: float, good_above: dict[int, float], *, leak_ks: tuple[int, ...] = ()) -> dict:
    """Pair ``i`` (even: paraphrase, odd: near miss): perfect uncached, and perfect at K while similarity exceeds
    ``good_above[K]``; below it every attribute is wrong (K in ``leak_ks``: right, but near misses leak)."""
    relation = "paraphrase" if i % 2 == 0 else "near_miss"
    near = relation == "near_miss"
    cached = {}
    for k in KS:
        good = similarity > good_above[k]
        if k in leak_ks:
            cached[str(k)] = _judged(5, near and not good if near else None)
        else:
            cached[str(k)] = _judged(5 if good else 0, False if near else None)
    record = {
        "index": i,
        "relation": relation,
        "split": "calibration",
        "similarity": similarity,
        "cached_prompt": f"prompt {i}",
        "new_prompt": f"prompt {i} again",
        "uncached": _judged(5, False if near else None),
        "cached": cached,
    }
    return record


def _records(good_above: dict[int, float], **kwargs) -> list[dict]:
    # Similarities 0.995, 0.985, ..., 0.005: never on a boundary at x.x0.
    return [_record(i, round(0.995 - 0.01 * i, 3), good_above, **kwargs) for i in range(100)]


def test_fit_finds_the_known_thresholds() -> None:
    fit = fit_thresholds(_records(GOOD), KS, LENIENT)
    assert fit["thresholds"] == [(0.904, 16), (0.604, 8), (0.304, 4)]
    assert [band["n"] for band in fit["bands"]] == [10, 30, 30]
    assert all(band["accuracy_drop"] == 0 and band["leak_rate"] == 0 for band in fit["bands"])
    assert fit["bands"][0]["stopped_by"]["accuracy_drop"] > 0.01
    KSelector(thresholds=tuple(fit["thresholds"]), reference_steps=20)  # a table the server accepts


def test_a_k_whose_near_misses_leak_is_rejected() -> None:
    records = _records({**GOOD, 16: 1.0}, leak_ks=(16,))  # K=16 leaks on every near miss
    fit = fit_thresholds(records, KS, LENIENT)
    assert fit["thresholds"] == [(0.604, 8), (0.304, 4)]
    assert fit["rejected"][0]["k"] == 16 and fit["rejected"][0]["reason"] == "over budget"
    assert fit["rejected"][0]["leak_rate"] > 0.01 and fit["rejected"][0]["accuracy_drop"] == 0


def test_a_k_over_the_accuracy_budget_is_rejected() -> None:
    records = _records({**GOOD, 16: 1.0})
    for record in records:  # K=16 gets one attribute wrong on every pair: a 20-point drop
        record["cached"]["16"] = _judged(4, False if record["relation"] == "near_miss" else None)
    fit = fit_thresholds(records, KS, LENIENT)
    assert [k for _, k in fit["thresholds"]] == [8, 4]
    assert fit["rejected"][0]["accuracy_drop"] == pytest.approx(0.2)


def test_a_band_smaller_than_min_count_is_not_admitted() -> None:
    # Only 10 pairs are good at K=16: with min_count=15 the first checkable band already holds bad pairs.
    fit = fit_thresholds(_records(GOOD), KS, Budget(min_count=15, max_leak_rate=0.6))
    assert fit["thresholds"] == [(0.604, 8), (0.304, 4)]
    assert fit["rejected"][0]["k"] == 16


def test_confusions_the_uncached_model_makes_too_are_not_cache_leaks() -> None:
    records = _records({**GOOD, 16: 1.0}, leak_ks=(16,))
    for record in records:
        if record["relation"] == "near_miss":
            record["uncached"]["leak"] = True  # the model draws A's value even without the cache
    fit = fit_thresholds(records, KS, LENIENT)
    assert fit["thresholds"][0][1] == 16 and fit["bands"][0]["raw_leak_rate"] > 0
    assert fit["bands"][0]["leak_rate"] == 0


def test_apply_thresholds_serves_each_pair_at_its_k() -> None:
    records = _records(GOOD)
    none = apply_thresholds(records, None, KS, 20)
    assert none["accuracy_drop"] == 0 and none["steps_saved_own_pair"] == 0
    too_greedy = KSelector(thresholds=((0.0, 16),), reference_steps=20)  # K=16 for every pair above 0
    served = apply_thresholds(records, too_greedy, KS, 20)
    assert served["accuracy"] == pytest.approx(0.1)  # only the 10 pairs above 0.9 are right at K=16
    assert served["steps_saved_own_pair"] == pytest.approx(16 / 20)
    assert served["hits"] == sum(r["similarity"] > 0 for r in records)
    assert served["accuracy_drop_upper95"] >= served["accuracy_drop"] > 0
    # the per-hit bound shrinks with hits: no leak among n hits is bounded by z²/(n + z²)
    assert served["leak_rate_per_hit_upper95"] >= served["leaks"] / served["hits"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return make_embedder("minilm")


def test_steps_saved_counts_hits_on_the_nearest_cached_prompt(embedder: Embedder) -> None:
    prompt = "a small red circle in the top left on a white background"
    records = [
        {"relation": "paraphrase", "cached_prompt": prompt, "new_prompt": prompt},
        {"relation": "paraphrase", "cached_prompt": "a big blue square", "new_prompt": "a huge green triangle, dark"},
    ]
    selector = KSelector(thresholds=((0.99, 16),), reference_steps=20)
    saved = steps_saved(records, selector, KS, 20, embedder)
    assert saved["paraphrase_steps_saved"] == pytest.approx(16 / 40)
    assert saved["paraphrase_hit_rate"] == 0.5 and saved["cached_prompts"] == 2
    assert saved["all_hits_on_other_scene"] is None  # these records name no scenes


def test_steps_saved_counts_nearest_hits_on_another_scene(embedder: Embedder) -> None:
    red = "a small red circle in the top left on a white background"
    blue = {**SCENE, "colour": "blue"}
    records = [  # B's nearest cached prompt is pair 0's A both times: pair 1's B is a blue circle
        {"relation": "paraphrase", "cached_prompt": red, "new_prompt": red, "cached_scene": SCENE, "new_scene": SCENE},
        {"relation": "near_miss", "cached_prompt": "a huge green triangle, dark", "new_prompt": red,
         "cached_scene": {**SCENE, "colour": "green"}, "new_scene": blue},
    ]  # fmt: skip
    selector = KSelector(thresholds=((0.99, 16),), reference_steps=20)
    saved = steps_saved(records, selector, KS, 20, embedder)
    assert saved["all_hit_rate"] == 1.0 and saved["all_hits_on_other_scene"] == 1


def _evaluation() -> dict:
    records = _records(GOOD)
    for i, record in enumerate(records):
        record["split"] = "calibration" if (i // 2) % 2 == 0 else "heldout"  # both relations in both splits
    return {"report": {"settings": {"steps": 20, "ks": list(KS), "embedder": "minilm"}}, "records": records}


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_calibrate_writes_a_config_the_server_loads(embedder: Embedder, tmp_path: Path, suffix: str) -> None:
    report = calibrate(_evaluation(), tmp_path / f"thresholds{suffix}", embedder, LENIENT)
    # Calibration pairs are records 0, 1, 4, 5, ...: lowest admitted similarities 0.905, 0.625 and 0.305.
    assert report["thresholds"] == [[0.904, 16], [0.624, 8], [0.304, 4]]
    config = load_config({"checkpoint": "unused"}, path=report["config"])
    served = engine_config(ServeOptions(cache_dir=tmp_path, config_file=Path(report["config"])), tmp_path)
    assert served.cache.selection == config.cache.selection  # what `nirvana serve --config FILE` builds
    assert config.embedder == "minilm"
    assert config.cache.selection.reference_steps == 20
    assert [list(pair) for pair in config.cache.selection.thresholds] == report["thresholds"]
    held = report["heldout"]
    assert held["accuracy_drop"] <= 0.01 and held["leak_rate_near_miss"] == 0
    assert held["pairs"] == 50 and 0 < held["steps_saved_own_pair"] < 16 / 20


def test_no_admissible_band_writes_a_table_that_never_hits(embedder: Embedder, tmp_path: Path) -> None:
    evaluation = _evaluation()
    report = calibrate(evaluation, tmp_path / "t.toml", embedder, Budget(min_count=1000))
    assert report["caching_disabled"] and report["thresholds"] == [[1.0, 4]]
    assert report["heldout"]["steps_saved_own_pair"] == 0
    assert load_config({"checkpoint": "unused"}, path=tmp_path / "t.toml").cache.selection.thresholds == ((1.0, 4),)


def test_rescore_gives_each_pair_the_named_embedders_cosine(embedder: Embedder) -> None:
    evaluation = _evaluation()
    evaluation["report"]["settings"]["embedder"] = "other"
    prompt = "a small red circle in the top left on a white background"
    evaluation["records"][0].update(cached_prompt=prompt, new_prompt=prompt)
    evaluation["records"][1].update(cached_prompt=prompt, new_prompt="a huge green triangle at the bottom, dark")
    rescored = rescore(evaluation, embedder)
    first, second = rescored["records"][:2]
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5) and second["similarity"] < 0.9
    assert rescored["report"]["settings"]["embedder"] == "minilm"
    assert first["cached"] == evaluation["records"][0]["cached"]  # the judged images are kept
    assert evaluation["records"][1]["similarity"] == pytest.approx(0.985)  # the input is left as it was


def test_write_config_refuses_a_table_the_server_would_reject(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="strictly below"):
        write_config(tmp_path / "bad.toml", [(0.9, 4), (0.8, 8)], 20, "minilm")
    assert not (tmp_path / "bad.toml").exists()


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("calibrate")(calibrate_cmd)
    app.command("unused")(lambda: None)  # two commands, so "calibrate" is a sub-command as in `nirvana calibrate`
    return app


def test_cli_calibrate_from_eval_json(tmp_path: Path) -> None:
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(_evaluation()))
    out = tmp_path / "thresholds.toml"
    args = ["calibrate", "--eval-json", str(eval_json), "--out", str(out), "--min-count", "5"]
    args += ["--max-leak-rate", "0.6"]
    result = CliRunner().invoke(_cli(), args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert load_config({"checkpoint": "unused"}, path=out).cache.selection.thresholds[0] == (0.904, 16)
    assert "steps saved on paraphrases" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval-json", "{tmp}/missing.json"], "evaluation file does not exist: {tmp}/missing.json"),
        (["--eval-json", "{tmp}/eval.json"], "{tmp}/eval.json is not valid JSON"),
        ([], "give either --eval-json FILE, or --checkpoint DIR and --workload FILE"),
        (["--eval-json", "{tmp}/missing.json", "--max-leak-rate", "2"], "budget fractions must be in [0, 1]"),
    ],
)
def test_cli_calibrate_names_the_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "eval.json").write_text("{not json")
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(_cli(), ["calibrate", *args, "--out", str(tmp_path / "t.toml")], env=WIDE)
    assert result.exit_code == 2
    assert message.format(tmp=tmp_path) in result.output


@pytest.mark.parametrize(
    ("embedder_name", "message"),
    [("bert", "embedder='bert' is unknown"), ("clip", "embedder 'clip' needs the evaluated checkpoint's text encoder")],
)
def test_cli_calibrate_names_a_bad_embedder(tmp_path: Path, embedder_name: str, message: str) -> None:
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(_evaluation()))  # its settings name no checkpoint
    args = ["calibrate", "--eval-json", str(eval_json), "--out", str(tmp_path / "t.toml"), "--embedder", embedder_name]
    result = CliRunner().invoke(_cli(), args, env=WIDE)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "t.toml").exists()


def test_warnings_say_when_the_evidence_is_thin(embedder: Embedder, tmp_path: Path) -> None:
    evaluation = _evaluation()
    report = calibrate(evaluation, tmp_path / "t.toml", embedder, LENIENT)
    assert not any("uncached accuracy" in w for w in report["warnings"])
    for record in evaluation["records"]:
        record["uncached"]["correct"]["colour"] = record["uncached"]["correct"]["shape"] = False
    report = calibrate(evaluation, tmp_path / "t.toml", embedder, LENIENT)
    assert any(w.startswith("uncached accuracy is only 0.600") for w in report["warnings"])


def test_a_band_without_enough_near_misses_is_not_admitted_at_the_default_budget(
    embedder: Embedder, tmp_path: Path
) -> None:
    # Every band is perfect, but 50 near misses with no leak bound the leak rate at 5.1%, above the 1% budget.
    report = calibrate(_evaluation(), tmp_path / "t.toml", embedder, Budget(min_count=5))
    assert report["caching_disabled"]
    first = report["rejected"][0]
    assert first["k"] == 16 and first["leak_rate"] == 0 and first["leak_rate_upper95"] > 0.01
    assert first["pairs_needed"]["near_misses"] == 268  # z^2 (1 - b) / b for b = 1%
    assert any(w.startswith("K=16: rejected on too little evidence") for w in report["warnings"])
