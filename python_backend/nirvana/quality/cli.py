"""`nirvana quality dataset|train|eval` and `nirvana calibrate`: the shapes model, its evaluation, the thresholds.

Registered in ``nirvana.cli`` as ``app.add_typer(quality_app, name="quality")`` and
``app.command("calibrate")(calibrate_cmd)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

# Before torch is imported: spinning OpenMP threads make co-located processes 50x slower (PLATFORM.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer
from rich.console import Console

if TYPE_CHECKING:
    from nirvana.embed import Embedder

__all__ = ["calibrate_cmd", "quality_app"]

quality_app = typer.Typer(
    help="The synthetic shapes model: dataset, training, cache-quality evaluation.", no_args_is_help=True
)
console = Console(stderr=True)

CheckpointDir = Annotated[Path, typer.Option(help="Trained shapes checkpoint (diffusers folder with judge/).")]


def _check_checkpoint(path: Path) -> None:
    """Fail early, naming the path, when a folder is not a checkpoint with a judge."""
    if not path.is_dir():
        raise typer.BadParameter(f"checkpoint folder does not exist: {path}", param_hint="--checkpoint")
    if not (path / "model_index.json").is_file():
        raise typer.BadParameter(f"not a diffusers checkpoint (no model_index.json): {path}", param_hint="--checkpoint")
    if not (path / "judge" / "judge.json").is_file():
        raise typer.BadParameter(
            f"no judge in {path / 'judge'} (train with `nirvana quality train`)", param_hint="--checkpoint"
        )


def _parse_ks(text: str | None, steps: int) -> tuple[int, ...]:
    from nirvana.quality.evaluate import default_ks

    if text is None:
        return default_ks(steps)
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise typer.BadParameter(f"--ks={text!r}: expected comma-separated integers, e.g. 2,4,8") from None
    bad = [k for k in ks if not 0 < k < steps]
    if not ks or bad:
        raise typer.BadParameter(f"--ks={text!r}: each K must be in [1, {steps - 1}] for --steps {steps}")
    return ks


@quality_app.command()
def dataset(
    out: Annotated[Path, typer.Option(help="Folder for images.npy, captions.jsonl and preview.png.")],
    count: Annotated[int, typer.Option(help="Number of images.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same dataset.")] = 0,
    preview: Annotated[int, typer.Option(help="Images in the preview grid.", min=1)] = 24,
) -> None:
    """Write a captioned shapes dataset and a preview grid PNG."""
    from nirvana.quality.plots import dataset_preview
    from nirvana.quality.shapes import make_dataset

    data = make_dataset(count, seed=seed)
    data.save(out)
    shown = min(preview, count)
    grid = dataset_preview(data.images[:shown], data.captions[:shown], out / "preview.png")
    console.print(f"{count} images written to {out}; preview: {grid}")


@quality_app.command()
def train(
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint, its judge/ and training/ state.")],
    minutes: Annotated[
        float, typer.Option(help="Training budget, judge included (data and saving add ≈ 3 min).", min=0.1)
    ] = 26.0,
    seed: Annotated[int, typer.Option(help="Seed of data and weights.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/training/state.pt when present.")] = True,
    device: Annotated[str, typer.Option(help="torch device to train on: cpu, or cuda where there is a GPU.")] = "cpu",
    batch_size: Annotated[int | None, typer.Option(help="UNet batch (default: 32 on cpu, 128 on cuda).", min=1)] = None,
    vae_batch_size: Annotated[
        int | None, typer.Option(help="VAE batch (default: 8 on cpu, 32 on cuda).", min=1)
    ] = None,
) -> None:
    """Train the shapes latent diffusion model and its judge on this machine's CPU (or a GPU) within --minutes."""
    from nirvana.quality.train import TrainConfig, train_model

    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"--device={device!r}: expected cpu or cuda[:N]", param_hint="--device")
    gpu = device != "cpu"  # a GPU step costs about the same at 4x the batch: more samples in the same minutes
    config = TrainConfig(
        minutes=minutes,
        seed=seed,
        device=device,
        batch_size=batch_size or (128 if gpu else 32),
        vae_batch_size=vae_batch_size or (32 if gpu else 8),
    )
    report = train_model(out, config, resume=resume)
    typer.echo(json.dumps(report, indent=2, default=str))
    console.print(f"checkpoint written to {out} (serve it with `nirvana serve --checkpoint {out}`)")


def _print_eval_summary(report: dict) -> None:
    console.print(
        f"uncached accuracy {report['uncached_accuracy']:.3f} (exact match {report['uncached_exact_match']:.3f}) "
        f"over {report['settings']['pairs']} pairs, {report['seconds']} s"
    )
    for cell in report["by_k"]:
        console.print(
            f"K={cell['k']:>2}: accuracy {cell['accuracy']:.3f} (drop {cell['accuracy_drop']:+.3f}), "
            f"SSIM {cell['ssim']:.3f}, near-miss leak {cell['leak_rate_near_miss'] or 0:.3f}"
        )


@quality_app.command("eval")
def eval_cmd(
    checkpoint: CheckpointDir,
    json_path: Annotated[Path, typer.Option("--json", help="Write the report and per-pair records here.")],
    plot: Annotated[Path | None, typer.Option(help="PNG of accuracy and leak rate vs K per similarity bin.")] = None,
    pairs: Annotated[int | None, typer.Option(help="Prompt pairs (default: 320, 9-12 min on 2 cores).")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps N.", min=2)] = 20,
    ks: Annotated[str | None, typer.Option(help="Comma-separated Ks (default: 2,4,...,16 scaled to N).")] = None,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Pairs generated together.", min=1)] = 16,
    embedder: Annotated[
        str, typer.Option(help="Similarity the bins use: minilm, or clip (the checkpoint's own text encoder).")
    ] = "minilm",
) -> None:
    """Generate prompt pairs uncached and cached at each K, judge them, write the JSON report (and plot)."""
    from nirvana.embed import EMBEDDERS
    from nirvana.quality.evaluate import DEFAULT_PAIRS, EvalSettings, run_eval
    from nirvana.quality.plots import accuracy_vs_k

    _check_checkpoint(checkpoint)
    if embedder not in EMBEDDERS:
        raise typer.BadParameter(f"--embedder={embedder!r}: choose one of {sorted(EMBEDDERS)}", param_hint="--embedder")
    if pairs is not None and pairs < 2:
        raise typer.BadParameter(f"--pairs={pairs}: need at least 2 (one per split)")
    settings = EvalSettings(steps=steps, ks=_parse_ks(ks, steps), batch_size=batch_size)
    pairs = pairs or DEFAULT_PAIRS
    console.print(f"evaluating {pairs} pairs at N={steps}, K in {list(settings.ks)}, batches of {batch_size}")
    result = run_eval(checkpoint, pairs=pairs, seed=seed, settings=settings, embedder_name=embedder)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    _print_eval_summary(result["report"])
    if plot:
        console.print(f"plot: {accuracy_vs_k(result['report'], plot)}")
    console.print(f"records and report: {json_path}")


def _load_eval(path: Path) -> dict:
    if not path.is_file():
        raise typer.BadParameter(f"evaluation file does not exist: {path}", param_hint="--eval-json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"{path} is not valid JSON: {err}", param_hint="--eval-json") from None
    if not isinstance(data, dict) or "records" not in data or "report" not in data:
        raise typer.BadParameter(
            f"{path} is not a `nirvana quality eval --json` file (no records/report)", param_hint="--eval-json"
        )
    return data


def calibrate_cmd(
    out: Annotated[Path, typer.Option(help="Config file to write (.toml, else JSON) for `nirvana serve --config`.")],
    eval_json: Annotated[Path | None, typer.Option(help="Records from `nirvana quality eval --json`.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Or: evaluate this checkpoint first (default sizes; records kept beside --out).")
    ] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="Budget: accuracy drop vs uncached (fraction).")] = 0.01,
    max_leak_rate: Annotated[float, typer.Option(help="Budget: cache-attributable near-miss leak rate.")] = 0.01,
    min_count: Annotated[int, typer.Option(help="Pairs a band needs before it can be admitted.", min=1)] = 20,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the calibration report here.")] = None,
    embedder: Annotated[
        str | None,
        typer.Option(
            help="Similarity to fit for: minilm, or clip (the checkpoint's own text encoder). "
            "Default: the one the evaluation used; another re-scores its pairs (the images stay valid)."
        ),
    ] = None,
) -> None:
    """Fit similarity -> K thresholds within the quality budget, write them as server config, check on held-out."""
    from nirvana.quality.calibrate import Budget, CalibrationError, calibrate

    if (eval_json is None) == (checkpoint is None):
        raise typer.BadParameter("pass exactly one of --eval-json FILE or --checkpoint DIR")
    try:  # before a long evaluation, not after it
        budget = Budget(max_accuracy_drop=max_accuracy_drop, max_leak_rate=max_leak_rate, min_count=min_count)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if eval_json is not None:
        evaluation = _load_eval(eval_json)
    else:
        from nirvana.quality.evaluate import run_eval

        _check_checkpoint(checkpoint)
        evaluation = run_eval(checkpoint, embedder_name=embedder or "minilm")
        kept = out.with_name(out.stem + ".eval.json")  # so a re-fit with another budget need not regenerate
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(evaluation, indent=1) + "\n")
        console.print(f"evaluation records: {kept} (re-fit with --eval-json {kept})")
    try:
        evaluation, chosen = _embedder_for(evaluation, embedder)
        report = calibrate(evaluation, out, chosen, budget)
    except (CalibrationError, ValueError, KeyError) as err:
        raise typer.BadParameter(f"cannot calibrate: {err}") from None
    text = json.dumps(report, indent=2)
    if json_path:
        json_path.write_text(text + "\n")
    _print_calibration(report)


def _embedder_for(evaluation: dict, name: str | None) -> tuple[dict, Embedder]:
    """The embedder to calibrate for, and the evaluation with its pairs' similarity by that embedder."""
    from nirvana.checkpoint import load_checkpoint
    from nirvana.embed import EmbedderError, make_embedder
    from nirvana.quality.calibrate import rescore

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
        f"(drop {held['accuracy_drop']:+.4f}), cache leak rate {held['leak_rate_near_miss']:.3f}, "
        f"steps saved on paraphrases {held['paraphrase_steps_saved']:.3f} "
        f"(hit rate {held['paraphrase_hit_rate']:.2f})"
    )
    typer.echo(json.dumps({k: report[k] for k in ("config", "thresholds", "heldout")}, indent=2))
    console.print(f"config written: {report['config']} (nirvana serve --config {report['config']})")
