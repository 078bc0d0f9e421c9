"""`nirvana calibrate`: fit similarity -> K thresholds and write them as server config.

Two sources: ``--checkpoint DIR --workload FILE`` generates and scores the workload's own pairs
(:mod:`nirvana_cli.calibration.workload`, any checkpoint); ``--eval-json FILE`` fits the shapes model's judged records.
Registered in ``nirvana_cli.main`` as ``app.command("calibrate")(calibrate_cmd)``. The records come from
``nirvana-quality eval --json`` (the research package ``nirvana_quality``, which also offers ``nirvana-quality
calibrate --checkpoint DIR`` to evaluate and calibrate in one go through :func:`calibrate_evaluation`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from nirvana.calibration.table import Budget
    from nirvana.embed import Embedder

__all__ = [
    "EmbedderOption",
    "JsonReportOption",
    "MaxAccuracyDropOption",
    "MaxLeakRateOption",
    "MinCountOption",
    "OutOption",
    "calibrate_cmd",
    "calibrate_evaluation",
    "make_budget",
]

console = Console(stderr=True)

# Options shared with `nirvana-quality calibrate`, so both commands read the same flags the same way.
OutOption = Annotated[Path, typer.Option(help="Config file to write (.toml, else JSON) for `nirvana serve --config`.")]
MaxAccuracyDropOption = Annotated[float, typer.Option(help="Budget: accuracy drop vs uncached (fraction).")]
MaxLeakRateOption = Annotated[float, typer.Option(help="Budget: cache-attributable near-miss leak rate.")]
MinCountOption = Annotated[int, typer.Option(help="Pairs a band needs before it can be admitted.", min=1)]
JsonReportOption = Annotated[Path | None, typer.Option("--json", help="Also write the calibration report here.")]
EmbedderOption = Annotated[
    str | None,
    typer.Option(
        help="Similarity to fit for: minilm, or clip (the checkpoint's own text encoder). "
        "Default: the one the evaluation used; another re-scores its pairs (the images stay valid)."
    ),
]


def make_budget(max_accuracy_drop: float, max_leak_rate: float, min_count: int) -> Budget:
    """The quality budget, or a usage error naming the bad value (callers check it before any long work)."""
    from nirvana.calibration.table import Budget

    try:
        return Budget(max_accuracy_drop=max_accuracy_drop, max_leak_rate=max_leak_rate, min_count=min_count)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _load_evaluation(path: Path) -> dict:
    if not path.is_file():
        raise typer.BadParameter(f"evaluation file does not exist: {path}", param_hint="--eval-json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"{path} is not valid JSON: {err}", param_hint="--eval-json") from None
    if not isinstance(data, dict) or "records" not in data or "report" not in data:
        raise typer.BadParameter(
            f"{path} is not a `nirvana-quality eval --json` file (no records/report)", param_hint="--eval-json"
        )
    return data


def calibrate_cmd(
    out: OutOption,
    eval_json: Annotated[Path | None, typer.Option(help="Records from `nirvana-quality eval --json`.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint to calibrate on a workload.")] = None,
    workload: Annotated[Path | None, typer.Option(help="Prompts (txt/csv/tsv/jsonl/parquet), in replay order.")] = None,
    scorer: Annotated[
        str, typer.Option(help="Fidelity of cached vs uncached B: ssim, psnr, or judge (a shapes checkpoint's judge/).")
    ] = "ssim",
    steps: Annotated[int, typer.Option(help="Denoising steps N of the calibration (and reference_steps).")] = 20,
    pairs: Annotated[int, typer.Option(help="Pairs to generate, balanced over similarity bands.", min=1)] = 64,
    ks: Annotated[str | None, typer.Option(help="Candidate Ks, comma-separated (default: scaled to --steps).")] = None,
    min_score: Annotated[
        float | None, typer.Option(help="Budget: mean score at its 95% lower bound (default ssim 0.9, psnr 25).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the workload's first prompts.", min=2)] = None,
    report_dir: Annotated[Path | None, typer.Option(help="Report folder (default: beside --out).")] = None,
    max_accuracy_drop: MaxAccuracyDropOption = 0.01,
    max_leak_rate: MaxLeakRateOption = 0.01,
    min_count: Annotated[
        int | None, typer.Option(help="Pairs a band needs before it can be admitted (default 20; workload 10).", min=1)
    ] = None,
    json_path: JsonReportOption = None,
    embedder: EmbedderOption = None,
) -> None:
    """Fit similarity -> K thresholds within the quality budget (at its 95% bound) and write them as server config."""
    if (eval_json is None) == (checkpoint is None and workload is None):
        raise typer.BadParameter("give either --eval-json FILE, or --checkpoint DIR and --workload FILE")
    if eval_json is not None:
        budget = make_budget(max_accuracy_drop, max_leak_rate, min_count or 20)
        calibrate_evaluation(_load_evaluation(eval_json), out, budget, embedder=embedder, json_path=json_path)
        return
    if checkpoint is None or workload is None:
        raise typer.BadParameter("--checkpoint and --workload go together")
    from nirvana_cli.calibration.workload import WorkloadRun, calibrate_workload

    run = WorkloadRun(
        checkpoint=checkpoint,
        workload=workload,
        out=out,
        report_dir=report_dir or out.with_name(out.stem + ".report"),
        scorer=scorer,
        steps=steps,
        pairs=pairs,
        ks=_parse_ks(ks),
        min_score=min_score,
        min_count=min_count or 10,
        embedder=embedder,
        limit=limit,
    )
    calibrate_workload(run)


def _parse_ks(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"not a comma-separated list of ints: {text!r}", param_hint="--ks") from None


def calibrate_evaluation(
    evaluation: dict, out: Path, budget: Budget, *, embedder: str | None = None, json_path: Path | None = None
) -> dict:
    """Calibrate ``evaluation`` for ``embedder`` (default: the one it used), write ``out``, print and return the
    report (also written to ``json_path`` when given); bad records or embedder are usage errors."""
    from nirvana.calibration.table import CalibrationError, calibrate

    try:
        evaluation, chosen = _embedder_for(evaluation, embedder)
        report = calibrate(evaluation, out, chosen, budget)
    except (CalibrationError, ValueError, KeyError) as err:
        raise typer.BadParameter(f"cannot calibrate: {err}") from None
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    _print_calibration(report)
    return report


def _embedder_for(evaluation: dict, name: str | None) -> tuple[dict, Embedder]:
    """The embedder to calibrate for, and the evaluation with its pairs' similarity by that embedder."""
    from nirvana.calibration.table import rescore
    from nirvana.checkpoint import load_checkpoint
    from nirvana.embed import EmbedderError, make_embedder

    settings = evaluation["report"]["settings"]
    used = settings.get("embedder", "minilm")
    name = name or used
    checkpoint = None
    if name == "clip":
        path = settings.get("checkpoint")
        if not path or not (Path(path) / "text_encoder").is_dir():
            raise typer.BadParameter(
                f"embedder 'clip' needs the evaluated checkpoint's text encoder; the evaluation's checkpoint={path!r}"
                " has none",
                param_hint="--embedder",
            )
        checkpoint = load_checkpoint(path)
    try:
        chosen = make_embedder(name, checkpoint)
    except EmbedderError as err:
        raise typer.BadParameter(str(err), param_hint="--embedder") from None
    return (evaluation if name == used else rescore(evaluation, chosen)), chosen


def _print_calibration(report: dict) -> None:
    held = report["heldout"]
    table = ", ".join(f"s > {s:.4f} -> K={k}" for s, k in report["thresholds"])
    console.print(f"thresholds ({report['embedder']}, N={report['steps']}): {table}")
    if report["caching_disabled"]:
        console.print("no band met the budget: the table written never resumes from another prompt")
    reasons: dict[str, list[int]] = {}
    for band in report["rejected"]:
        reasons.setdefault(band["reason"], []).append(band["k"])
    for reason, ks in reasons.items():
        console.print(f"rejected K={','.join(map(str, ks))}: {reason}")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"held-out: accuracy {held['accuracy']:.3f} vs uncached {held['uncached_accuracy']:.3f} "
        f"(drop {held['accuracy_drop']:+.4f}, 95% bound {held['accuracy_drop_upper95'] or 0:+.4f}), cache leak rate "
        f"{held['leak_rate_near_miss']:.3f} of near misses, {held['leaks']} of {held['hits']} hits (95% bound "
        f"{held['leak_rate_per_hit_upper95'] or 0:.4f}), "
        f"steps saved on paraphrases {held['paraphrase_steps_saved']:.3f} "
        f"(hit rate {held['paraphrase_hit_rate']:.2f})"
    )
    other = held.get("all_hits_on_other_scene")
    console.print(
        f"held-out, every B against all cached prompts: steps saved {held['all_steps_saved']:.3f} "
        f"(hit rate {held['all_hit_rate']:.2f})" + ("" if other is None else f", {other} hits on another scene")
    )
    typer.echo(json.dumps({k: report[k] for k in ("config", "thresholds", "heldout")}, indent=2))
    console.print(f"config written: {report['config']} (nirvana serve --config {report['config']})")
