"""`nirvana-quality dataset|train|eval|calibrate`: the shapes model, its evaluation, the thresholds fitted on it.

The console script ``nirvana-quality`` (``nirvana_quality.cli:app``). Calibrating from records already written is the
product's ``nirvana calibrate --eval-json`` (:mod:`nirvana_cli.calibration.command`); ``calibrate`` here evaluates a
checkpoint first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nirvana.threads import set_thread_policy
from nirvana_cli.calibration.command import (
    EmbedderOption,
    JsonReportOption,
    MaxAccuracyDropOption,
    MaxLeakRateOption,
    MinCountOption,
    OutOption,
    calibrate_evaluation,
    make_budget,
)

__all__ = ["app"]

app = typer.Typer(
    help="The synthetic shapes model: dataset, training, cache-quality evaluation, calibration.",
    no_args_is_help=True,
)
console = Console(stderr=True)


@app.callback()
def _main() -> None:
    # Commands import torch lazily, so this still runs before OpenMP reads its wait policy.
    set_thread_policy()


CheckpointDir = Annotated[Path, typer.Option(help="Trained shapes checkpoint (diffusers folder with judge/).")]


def _check_checkpoint(path: Path) -> None:
    """Fail early, naming the path, when a folder is not a checkpoint with a judge."""
    if not path.is_dir():
        raise typer.BadParameter(f"checkpoint folder does not exist: {path}", param_hint="--checkpoint")
    if not (path / "model_index.json").is_file():
        raise typer.BadParameter(f"not a diffusers checkpoint (no model_index.json): {path}", param_hint="--checkpoint")
    if not (path / "judge" / "judge.json").is_file():
        raise typer.BadParameter(
            f"no judge in {path / 'judge'} (train with `nirvana-quality train`)", param_hint="--checkpoint"
        )


def _parse_ks(text: str | None, steps: int) -> tuple[int, ...]:
    from nirvana_quality.evaluate import default_ks

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


@app.command()
def dataset(
    out: Annotated[Path, typer.Option(help="Folder for images.npy, captions.jsonl and preview.png.")],
    count: Annotated[int, typer.Option(help="Number of images.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same dataset.")] = 0,
    preview: Annotated[int, typer.Option(help="Images in the preview grid.", min=1)] = 24,
) -> None:
    """Write a captioned shapes dataset and a preview grid PNG."""
    from nirvana_dev.shapes.scenes import make_dataset
    from nirvana_quality.plots import dataset_preview

    data = make_dataset(count, seed=seed)
    data.save(out)
    shown = min(preview, count)
    grid = dataset_preview(data.images[:shown], data.captions[:shown], out / "preview.png")
    console.print(f"{count} images written to {out}; preview: {grid}")


@app.command()
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
    prediction_type: Annotated[
        str | None,
        typer.Option(help="UNet target: epsilon or v_prediction (default: v_prediction on cpu, epsilon on cuda)."),
    ] = None,
) -> None:
    """Train the shapes latent diffusion model and its judge on this machine's CPU (or a GPU) within --minutes."""
    from nirvana_dev.shapes.train import TrainConfig, train_model

    if device != "cpu" and not device.startswith("cuda"):
        raise typer.BadParameter(f"--device={device!r}: expected cpu or cuda[:N]", param_hint="--device")
    gpu = device != "cpu"  # a GPU step costs about the same at 4x the batch: more samples in the same minutes
    # v-prediction weights the noisy steps that place a shape: the CPU's 27 minutes reach 0.97 with it, 0.62 without.
    prediction_type = prediction_type or ("epsilon" if gpu else "v_prediction")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise typer.BadParameter(
            f"--prediction-type={prediction_type!r}: expected epsilon or v_prediction", param_hint="--prediction-type"
        )
    config = TrainConfig(
        minutes=minutes,
        seed=seed,
        device=device,
        batch_size=batch_size or (128 if gpu else 32),
        vae_batch_size=vae_batch_size or (32 if gpu else 8),
        prediction_type=prediction_type,
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


@app.command("eval")
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
    from nirvana_quality.evaluate import DEFAULT_PAIRS, EvalSettings, run_eval
    from nirvana_quality.plots import accuracy_vs_k

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


@app.command()
def calibrate(
    checkpoint: CheckpointDir,
    out: OutOption,
    max_accuracy_drop: MaxAccuracyDropOption = 0.01,
    max_leak_rate: MaxLeakRateOption = 0.01,
    min_count: MinCountOption = 20,
    json_path: JsonReportOption = None,
    embedder: EmbedderOption = None,
) -> None:
    """Evaluate a checkpoint (default sizes), then fit and write its thresholds as `nirvana calibrate` does.

    The records are kept beside ``--out`` (``OUT.eval.json``): a re-fit with another budget or embedder needs only
    ``nirvana calibrate --eval-json`` on them, not another evaluation.
    """
    from nirvana_quality.evaluate import run_eval

    budget = make_budget(max_accuracy_drop, max_leak_rate, min_count)  # before a long evaluation, not after it
    _check_checkpoint(checkpoint)
    evaluation = run_eval(checkpoint, embedder_name=embedder or "minilm")
    kept = out.with_name(out.stem + ".eval.json")
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(evaluation, indent=1) + "\n")
    console.print(f"evaluation records: {kept} (re-fit with `nirvana calibrate --eval-json {kept}`)")
    calibrate_evaluation(evaluation, out, budget, embedder=embedder, json_path=json_path)


@app.command()
def latents(
    checkpoint: CheckpointDir,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    codec: Annotated[str, typer.Option(help="The latent codec against float16 (cache.latent_dtype).")] = "q6",
    pairs: Annotated[int, typer.Option(help="Prompt pairs of the workload.", min=1)] = 100,
    steps: Annotated[int, typer.Option(help="Denoising steps N.", min=2)] = 20,
    ks: Annotated[str | None, typer.Option(help="Comma-separated Ks (default: 2,4,...,16 scaled to N).")] = None,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
) -> None:
    """Bytes per cache entry and the images resumed from a codec's latents against float16's on the same pairs
    (grey-level differences; judge accuracy where the checkpoint has a judge)."""
    import tempfile

    from nirvana.cache.latent_codec import CODECS
    from nirvana_quality.latents import run_latents

    if codec not in CODECS:
        raise typer.BadParameter(f"--codec={codec!r}: choose one of {CODECS}", param_hint="--codec")
    _check_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_latents(checkpoint, codec, pairs, steps, _parse_ks(ks, steps), seed, Path(tmp))
    text = json.dumps(report, indent=1) + "\n"
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    console.print(text)
