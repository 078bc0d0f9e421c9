"""`nirvana` command line: build a tiny model, generate in-process, benchmark the cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

# Before torch is imported: spinning OpenMP threads make co-located processes 50x slower (PLATFORM.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer
from rich.console import Console

from nirvana.quality.cli import calibrate_cmd, quality_app

app = typer.Typer(help="NIRVANA approximate caching for Stable Diffusion, served by Triton.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures (and write JSON).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(quality_app, name="quality")
app.command("calibrate")(calibrate_cmd)
console = Console(stderr=True)

CacheDir = Annotated[Path, typer.Option(help="Cache directory: milvus-lite file and latent store.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="JSON or TOML EngineConfig file.", exists=True)]


def _setup_logging(verbose: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _emit(report: dict, json_path: Path | None) -> None:
    """Print a benchmark's figures and, when asked, write them as JSON."""
    text = json.dumps(report, indent=2)
    typer.echo(text)
    if json_path:
        json_path.write_text(text + "\n")


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers-format checkpoint into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    scheduler: Annotated[
        str, typer.Option(help="Scheduler saved with the model: ddim, euler, euler_a, dpmpp.")
    ] = "ddim",
) -> None:
    """Write a small random-weight Stable Diffusion checkpoint (diffusers layout, local tokenizer, no download)."""
    from nirvana.checkpoint import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed, scheduler=scheduler)
    console.print(f"tiny checkpoint written to {path}")


def _engine_config(checkpoint: Path, cache_dir: Path, config: Path | None, **overrides) -> object:
    from nirvana.config import ConfigError, load_config

    data = {"checkpoint": str(checkpoint), "cache": {"dir": str(cache_dir)}}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return load_config(data, config)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts, generated in order.")],
    checkpoint: Annotated[Path, typer.Option(help="diffusers-format checkpoint folder.", exists=True)],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Where PNGs are written.")] = Path("out"),
    cache_dir: CacheDir = Path(".nirvana-cache"),
    config: ConfigFile = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str = "",
    cache_mode: Annotated[str, typer.Option(help="auto | bypass | refresh")] = "auto",
    tenant: str = "default",
    scheduler: Annotated[str | None, typer.Option(help="auto, ddim, euler, euler_a, dpmpp")] = None,
    verbose: bool = False,
) -> None:
    """Generate images in-process (no server) and show what the cache did for each prompt."""
    from PIL import Image

    from nirvana.pipeline import Pipeline, RequestError

    _setup_logging(verbose)
    pipe = Pipeline(_engine_config(checkpoint, cache_dir, config, scheduler=scheduler))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for i, prompt in enumerate(prompts):
            try:
                res = pipe.generate(
                    prompt,
                    negative_prompt=negative_prompt,
                    seed=seed,
                    steps=steps,
                    guidance=guidance,
                    cache_mode=cache_mode,
                    tenant=tenant,
                )
            except RequestError as err:
                raise typer.BadParameter(str(err)) from None
            path = out_dir / f"{i:03d}.png"
            Image.fromarray(res.image).save(path)
            hit = f"HIT K={res.skipped_steps} from {res.matched_prompt!r}" if res.cache_hit else f"miss ({res.reason})"
            sim = "-" if res.similarity != res.similarity else f"{res.similarity:.3f}"  # NaN: no search ran
            console.print(f"{path}  similarity={sim}  {hit}  {res.timings_ms['total_ms']:.0f} ms")
    finally:
        pipe.close()


DEMO_PROMPTS = [
    "a red fox in the snow, photograph",
    "photo of a red fox in snow",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red fox in the snow, photograph",
]
# For a shapes model (`nirvana quality train`): a miss, a paraphrase, a one-attribute near miss, an unrelated scene.
SHAPES_DEMO_PROMPTS = [
    "a small red circle in the top left on a white background",
    "top-left corner: a little crimson disc, pale backdrop",
    "a small blue circle in the top left on a white background",
    "a large yellow square in the centre on a black background",
]


@app.command()
def demo(
    work_dir: Annotated[
        Path, typer.Option(help="Holds the tiny model, the cache, the repository and the images.")
    ] = Path("demo"),
    checkpoint: Annotated[Path | None, typer.Option(help="Use this checkpoint instead of a tiny one.")] = None,
    steps: int = 20,
    in_process: Annotated[bool, typer.Option(help="Run the pipeline in this process instead of in Triton.")] = False,
    config: ConfigFile = None,
) -> None:
    """Start tritonserver on a tiny model, send a few prompts over gRPC and HTTP, show misses and cache hits, stop.

    With a shapes model (`nirvana quality train`) it sends shape prompts and saves each hit beside the uncached
    image of the same seed, so you can see what the cache did to the picture.
    """
    from nirvana.checkpoint import make_tiny_model

    _setup_logging(verbose=False)
    if checkpoint is None:
        checkpoint = work_dir / "tiny-model"
        if not (checkpoint / "model_index.json").exists():
            console.print(f"making a tiny random-weight model in {checkpoint}")
            make_tiny_model(checkpoint)
    prompts = SHAPES_DEMO_PROMPTS if (checkpoint / "judge").is_dir() else DEMO_PROMPTS
    if in_process:
        generate(
            prompts,
            checkpoint=checkpoint,
            out_dir=work_dir / "images",
            cache_dir=work_dir / "cache",
            config=config,
            seed=0,
            steps=steps,
            guidance=None,
            negative_prompt="",
            cache_mode="auto",
            tenant="default",
            scheduler=None,
            verbose=False,
        )
        return
    _demo_served(work_dir, checkpoint, steps, prompts, config)


def _demo_served(work_dir: Path, checkpoint: Path, steps: int, prompts: list[str], config: Path | None) -> None:
    import numpy as np
    from PIL import Image

    from nirvana.serving.launch import ServeOptions, make_server, prepare
    from nirvana.serving.tritonserver import ServerPorts, free_ports
    from nirvana_client import GenerateOptions, NirvanaClient

    options = ServeOptions(
        cache_dir=work_dir / "serve", checkpoint=checkpoint, ports=ServerPorts(*free_ports(3)), config_file=config
    )
    console.print("exporting the sub-models to ONNX and writing the Triton model repository ...")
    repo, _ = prepare(options)
    server = make_server(options, repo)
    console.print(f"starting tritonserver (log: {server.log_path}) ...")
    (work_dir / "images").mkdir(parents=True, exist_ok=True)
    with server:
        for i, prompt in enumerate(prompts):
            protocol = "http" if i % 2 else "grpc"
            client = NirvanaClient(server.urls.http if protocol == "http" else server.urls.grpc, protocol)
            res = client.generate(prompt, GenerateOptions(seed=i, steps=steps))
            path = work_dir / "images" / f"{i:03d}.png"
            Image.fromarray(res.image).save(path)
            if res.cache_hit:  # left: served from the cache; right: the same request computed in full
                full = client.generate(prompt, GenerateOptions(seed=i, steps=steps, cache_mode="bypass"))
                Image.fromarray(np.concatenate([res.image, full.image], axis=1)).save(path.with_suffix(".hit.png"))
            client.close()
            hit = f"HIT, skipped {res.skipped_steps}/{steps} steps" if res.cache_hit else "miss"
            sim = "-" if res.similarity != res.similarity else f"{res.similarity:.3f}"
            shown = path.with_suffix(".hit.png") if res.cache_hit else path
            console.print(f"\\[{protocol}] {prompt!r}: {hit}, similarity {sim}, {res.latency_ms:.0f} ms -> {shown}")
        console.print(_metrics_summary(server.urls.metrics))


def _metrics_summary(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    wanted = (
        "nirvana_cache_hits_total",
        "nirvana_cache_misses_total",
        "nirvana_skipped_steps_total",
        "nirvana_unet_steps_total",
        "nirvana_cache_entries",
    )
    return "metrics: " + ", ".join(line for line in lines if line.startswith(wanted))


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="diffusers-format checkpoint folder.", exists=True)],
    out: Annotated[Path, typer.Option(help="Model repository to write.")],
    profile: Annotated[
        str, typer.Option(help="cpu: ONNX in python models; gpu: TensorRT plans (needs a GPU).")
    ] = "cpu",
    cache_dir: CacheDir = Path(".nirvana-cache"),
    milvus_uri: Annotated[str | None, typer.Option(help="Milvus server URI (default: milvus-lite file).")] = None,
    config: ConfigFile = None,
    verbose: bool = False,
) -> None:
    """Export and check the sub-models and write a complete Triton model repository."""
    from nirvana.serving.launch import ServeOptions, engine_config
    from nirvana_export.repository import PROFILES, write_repository

    _setup_logging(verbose)
    if profile not in PROFILES:
        raise typer.BadParameter(f"profile={profile!r}: choose one of {PROFILES}")
    options = ServeOptions(cache_dir=cache_dir, checkpoint=checkpoint, milvus_uri=milvus_uri, config_file=config)
    write_repository(checkpoint, out, profile, engine_config(options, checkpoint).model_dump(mode="json"))
    console.print(f"model repository ({profile}) written to {out}")


@app.command()
def serve(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: a tiny model it makes).")] = None,
    cache_dir: CacheDir = Path(".nirvana-cache"),
    milvus_uri: Annotated[str | None, typer.Option(help="Milvus server URI, e.g. http://host:19530.")] = None,
    config: ConfigFile = None,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    repo_dir: Annotated[Path | None, typer.Option(help="Where the model repository is generated.")] = None,
    profile: Annotated[str, typer.Option(help="cpu: ONNX in python models; gpu: TensorRT plans (GPU only).")] = "cpu",
    triton_dir: Annotated[Path | None, typer.Option(help="A tritonserver install (default: pytriton's).")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for READY.")] = 300.0,
    max_queue_size: Annotated[int, typer.Option(help="Queued requests beyond this are rejected.", min=1)] = 64,
    max_concurrent: Annotated[int, typer.Option(help="Requests the nirvana model runs at once.", min=1)] = 4,
    verbose: bool = False,
) -> None:
    """Run the real tritonserver with the nirvana model repository until Ctrl-C / SIGTERM."""
    from nirvana_export.repository import PROFILES

    if profile not in PROFILES:
        raise typer.BadParameter(f"profile={profile!r}: choose one of {PROFILES}")
    from nirvana.serving.launch import ServeOptions, make_server, prepare
    from nirvana.serving.tritonserver import ServerPorts, TritonServerError, serve_forever

    _setup_logging(verbose)
    options = ServeOptions(
        cache_dir=cache_dir,
        checkpoint=checkpoint,
        milvus_uri=milvus_uri,
        config_file=config,
        ports=ServerPorts(http_port, grpc_port, metrics_port),
        host=host,
        repo_dir=repo_dir,
        triton_dir=triton_dir,
        ready_timeout_s=ready_timeout,
        profile=profile,
        max_queue_size=max_queue_size,
        max_concurrent_requests=max_concurrent,
    )
    repo, _ = prepare(options)
    server = make_server(options, repo)
    console.print(f"starting tritonserver on {host} (log: {server.log_path})")

    def ready() -> None:
        urls = server.urls
        console.print(f"READY  http {urls.http}  grpc {urls.grpc}  metrics {urls.metrics}  (Ctrl-C stops)")

    try:
        code = serve_forever(server, on_ready=ready)  # signal handlers go in before the server starts
    except TritonServerError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@bench_app.command("overhead")
def bench_overhead(
    entries: Annotated[int, typer.Option(help="Largest cache size measured (10k is always measured too).")] = 100_000,
    queries: Annotated[int, typer.Option(help="Queries per size.")] = 500,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    latent_shape: Annotated[
        str, typer.Option(help="C,H,W of the stored latents (SD 1.5 at 512x512: 4,64,64).")
    ] = "4,64,64",
    work_dir: Annotated[Path | None, typer.Option(help="Where the temporary caches go (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Cache-path latency (embed, search, select, latent load) and search recall at 10k and N entries."""
    from nirvana.bench.overhead import run_overhead

    _setup_logging(verbose)
    sizes = sorted({min(10_000, entries), entries})
    shape = tuple(int(x) for x in latent_shape.split(","))
    report = run_overhead(sizes, queries, shape, work_dir)
    _emit(report, json_path)


@bench_app.command("serving")
def bench_serving(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: a tiny model made on the fly).")] = None,
    requests: Annotated[int, typer.Option(help="Requests per path.")] = 20,
    steps: Annotated[int, typer.Option(help="Denoising steps per request.")] = 20,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Median latency in-process (torch, ONNX) vs through tritonserver (gRPC, HTTP), measured in one run."""
    from nirvana.bench.serving import run_serving

    _setup_logging(verbose)
    report = run_serving(checkpoint, requests, steps, work_dir)
    _emit(report, json_path)


@bench_app.command("replay")
def bench_replay(
    workload: Annotated[Path, typer.Argument(help="CSV/TSV with a prompt column (e.g. diffusiondb_1k.csv).")],
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: a tiny model made on the fly).")] = None,
    column: Annotated[str | None, typer.Option(help="Prompt column (default: prompt or Prompt).")] = None,
    limit: Annotated[int | None, typer.Option(help="Replay only the first N requests.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per request (N).")] = 50,
    sort_by: Annotated[
        str | None, typer.Option(help="Column to sort by first (default: timestamp if present).")
    ] = None,
    tenant_column: Annotated[str | None, typer.Option(help="Column used as TENANT (e.g. user_name).")] = None,
    config: ConfigFile = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Cache and model dir (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Replay a prompt workload in-process: hit rate, K histogram, fraction of UNet steps saved."""
    from nirvana.bench.replay import run_replay

    _setup_logging(verbose)
    report = run_replay(
        workload,
        checkpoint=checkpoint,
        column=column,
        limit=limit,
        steps=steps,
        sort_by=sort_by,
        tenant_column=tenant_column,
        config_path=config,
        work_dir=work_dir,
    )
    _emit(report, json_path)


if __name__ == "__main__":
    app()
