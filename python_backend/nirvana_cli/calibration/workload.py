"""`nirvana calibrate --checkpoint DIR --workload FILE`: calibrate any checkpoint on its own generations.

Stages: (1) read the workload and pair each prompt with its nearest earlier prompt under the serving embedder,
balanced over similarity bands; (2) generate each pair's B uncached and resumed from A's latent at every candidate K
with the engine's denoise code (``nirvana.calibration.generate``); (3) score cached vs uncached B (``--scorer``);
(4) fit the thresholds at the 95% lower bound of the mean score and write the config the server loads; (5) write
the report (``--report-dir``): report.json, summary.md, a PNG grid per band.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["WorkloadRun", "calibrate_workload"]

console = Console(stderr=True)


@dataclass(frozen=True)
class WorkloadRun:
    """What `nirvana calibrate --workload` was asked for (parsed once from the options)."""

    checkpoint: Path
    workload: Path
    out: Path
    report_dir: Path
    scorer: str = "ssim"
    steps: int = 20
    pairs: int = 64
    ks: tuple[int, ...] | None = None  # None: the default Ks scaled to `steps`
    min_score: float | None = None  # None: the scorer's default
    min_count: int = 10
    embedder: str | None = None  # None: the checkpoint's configured embedder ("auto")
    limit: int | None = None  # first prompts of the workload
    batch_size: int = 8
    seed: int = 0  # pair sampling


def _prepare(run: WorkloadRun) -> tuple:
    """Everything that can fail fast, before any generation: scorer, settings, checkpoint, embedder, pairs."""
    from nirvana.calibration.fidelity import ScorerError, make_scorer
    from nirvana.calibration.generate import PairSettings, default_ks
    from nirvana.calibration.pairs import sample_pairs
    from nirvana.checkpoint import load_checkpoint
    from nirvana.embed import EmbedderError, make_embedder
    from nirvana_dev.calibration import load_prompts

    if not (run.checkpoint / "model_index.json").is_file():
        raise typer.BadParameter(f"not a diffusers checkpoint: {run.checkpoint}", param_hint="--checkpoint")
    try:
        scorer = make_scorer(run.scorer, run.checkpoint)
    except ScorerError as err:
        raise typer.BadParameter(str(err), param_hint="--scorer") from None
    try:
        settings = PairSettings(steps=run.steps, ks=run.ks or default_ks(run.steps), batch_size=run.batch_size)
        prompts, seeds = load_prompts(run.workload, run.limit)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    checkpoint = load_checkpoint(run.checkpoint)
    try:
        embedder = make_embedder(run.embedder or "auto", checkpoint)
    except EmbedderError as err:
        raise typer.BadParameter(str(err), param_hint="--embedder") from None
    try:
        pairs = sample_pairs(prompts, seeds, embedder, run.pairs, seed=run.seed)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--workload") from None
    return scorer, settings, checkpoint, embedder, pairs


def calibrate_workload(run: WorkloadRun) -> dict:
    """Run the stages in the module docstring; print the table and return the report."""
    from tqdm.auto import tqdm

    from nirvana.calibration.fit import FidelityBudget, band_table, fit_fidelity
    from nirvana.calibration.pairs import band_edges
    from nirvana.calibration.table import write_config
    from nirvana.calibration.workload import score_pairs
    from nirvana.k_choice import KSelector
    from nirvana_cli.calibration.report import write_report

    scorer, settings, checkpoint, embedder, pairs = _prepare(run)
    budget = FidelityBudget(
        min_score=scorer.default_min if run.min_score is None else run.min_score, min_count=run.min_count
    )
    started = time.perf_counter()
    with tqdm(total=len(pairs), desc="calibrate", unit="pair") as bar:
        records, examples = score_pairs(checkpoint, pairs, settings, scorer, progress=bar.update)
    ks = list(settings.ks)
    fit = fit_fidelity(records, ks, budget)
    thresholds = fit["thresholds"] or [(1.0, min(ks))]  # never resumes from another prompt (calibration.table)
    selector = KSelector(thresholds=tuple(thresholds), reference_steps=settings.steps) if fit["thresholds"] else None
    path = write_config(run.out, thresholds, settings.steps, embedder.name)
    report = {
        "config": str(path),
        "embedder": embedder.name,
        "pairs": len(records),
        "settings": {
            "checkpoint": str(run.checkpoint),
            "workload": str(run.workload),
            "scorer": scorer.name,
            "steps": settings.steps,
            "ks": ks,
            "min_score": budget.min_score,
            "min_count": budget.min_count,
            "guidance": settings.guidance,
            "limit": run.limit,
        },
        "thresholds": [list(t) for t in thresholds],
        "caching_disabled": not fit["thresholds"],
        "bands": fit["bands"],
        "rejected": fit["rejected"],
        "band_table": band_table(records, ks, band_edges(embedder.name), budget, selector, settings.steps),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(run.report_dir, report, examples, records)
    _print(report, scorer.unit, run.report_dir)
    return report


def _print(report: dict, unit: str, report_dir: Path) -> None:
    s = report["settings"]
    # One short cell per K keeps the table within a terminal; bounds and pairs needed are in summary.md.
    table = Table(
        title=f"{s['scorer']} of B cached vs B uncached: band mean per K",
        caption="ok: its 95% lower bound meets the budget; n=…: pairs the band needs; ✗: below at any size",
    )
    for column in ("band", "n", "served K", *(f"K={k}" for k in s["ks"])):
        table.add_column(column, justify="right")
    for band in report["band_table"]:
        cells = []
        for k in s["ks"]:
            c = band["by_k"][str(k)]
            tail = "ok" if c["within"] else (f"n={c['pairs_needed']}" if c["pairs_needed"] else "✗")
            cells.append(f"{c['mean']:.3f}{unit} {tail}")
        lo, hi = band["edges"]
        table.add_row(f"[{lo}, {hi})", str(band["n"]), str(band["served_k"]), *cells)
    console.print(table)
    written = ", ".join(f"s > {t:.4f} -> K={k}" for t, k in report["thresholds"])
    console.print(f"thresholds ({report['embedder']}, N={s['steps']}, min {s['scorer']} {s['min_score']}): {written}")
    if report["caching_disabled"]:
        console.print("no band met the budget: the table written never resumes from another prompt")
    for r in report["rejected"]:
        need = f"needs about {r['pairs_needed']} pairs" if r.get("pairs_needed") else "more pairs would not help"
        console.print(f"rejected K={r['k']}: {r['reason']} ({need})")
    console.print(f"{report['pairs']} pairs in {report['seconds']} s; report: {report_dir}/summary.md")
    console.print(f"config written: {report['config']} (nirvana serve --config {report['config']})")
