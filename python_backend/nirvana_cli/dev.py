"""Development commands of `nirvana`: `serve`, `demo`, `make-tiny-model`, `bench` (registered by `main`).

They need the `dev` extra (the pytriton wheel's tritonserver, the client): imports stay inside the commands, so
`nirvana --help` and the product's own commands work without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nirvana_cli.bench import PROFILE_HELP, bench_app
from nirvana_cli.support import CacheDir, ConfigFile, MilvusUri, console, setup_logging

# The shapes demo model's training budget, the first time. From a fresh clone on 2 cores (2026-12-07): 8 min gave a
# judge reading of 22 of 30 attributes (73%) in the demo's uncached images, 12 min 25 of 30 (83%).
DEMO_TRAIN_MINUTES = 12.0


def register(app: typer.Typer) -> None:
    app.command("make-tiny-model")(make_tiny_model_cmd)
    app.command()(serve)
    app.command()(demo)
    app.add_typer(bench_app, name="bench")


def make_tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the diffusers-format checkpoint into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    scheduler: Annotated[
        str,
        typer.Option(
            help="Scheduler saved with the model: ddim, euler, euler_a, dpmpp (UNet families; auto = ddim), "
            "flow_euler (SD 3 and FLUX; auto)."
        ),
    ] = "auto",
    architecture: Annotated[
        str,
        typer.Option(
            help="tiny (64x64 images, seconds on a CPU), tiny-sd2 (SD 2.x layout, v-prediction, 96x96), "
            "tiny-sdxl (SDXL layout: two text encoders, time/text conditioning, 128x128), "
            "tiny-sd3 / tiny-flux (SD 3's and FLUX.1's transformer layouts, 64x64), "
            "or sd15 / sd21 / sdxl / sd35m / flux1 (SD 1.5's, SD 2.1's, SDXL's, SD 3.5 Medium's, FLUX.1 dev's sizes, "
            "for GPUs and memory figures)."
        ),
    ] = "tiny",
    embedder: Annotated[
        str,
        typer.Option(
            help="Retrieval embedder recorded in its nirvana.json: minilm (random text features mean nothing) "
            "or clip (only exact repeats hit; no MiniLM model served)."
        ),
    ] = "minilm",
) -> None:
    """Write a random-weight Stable Diffusion, SD 3 or FLUX.1 checkpoint (diffusers layout, local tokenizers, no
    download)."""
    from nirvana.embed import EMBEDDERS
    from nirvana_dev.tiny_dit import DIT_ARCHITECTURES
    from nirvana_dev.tiny_model import ARCHITECTURES, make_tiny_model

    known = sorted([*ARCHITECTURES, *DIT_ARCHITECTURES])
    if architecture not in known:
        raise typer.BadParameter(f"architecture={architecture!r}: choose one of {known}")
    if embedder not in EMBEDDERS:
        raise typer.BadParameter(f"embedder={embedder!r}: choose one of {sorted(EMBEDDERS)}")
    path = make_tiny_model(out_dir, seed=seed, scheduler=scheduler, architecture=architecture, embedder=embedder)
    console.print(f"tiny checkpoint written to {path} (retrieval embedder: {embedder})")


def demo(
    work_dir: Annotated[Path, typer.Option(help="Holds the cache, the repository, the images and sheet.png.")] = Path(
        "demo"
    ),
    model: Annotated[
        str,
        typer.Option(
            help="shapes: a small model of coloured shapes, trained here once (a few minutes) and reused, whose "
            "pictures show what a hit does; tiny: random weights (seconds, noise images)."
        ),
    ] = "shapes",
    checkpoint: Annotated[Path | None, typer.Option(help="Use this checkpoint instead (--model is ignored).")] = None,
    train_minutes: Annotated[
        float,
        typer.Option(help="Training budget of the shapes model, the first time (data adds about 2 min).", min=0.5),
    ] = DEMO_TRAIN_MINUTES,
    model_cache: Annotated[
        Path | None, typer.Option(help="Where the trained shapes model is kept (default: ~/.cache/nirvana).")
    ] = None,
    steps: int = 20,
    in_process: Annotated[bool, typer.Option(help="Run the pipeline in this process instead of in Triton.")] = False,
    config: ConfigFile = None,
) -> None:
    """Start tritonserver on a small model, send a few prompts over gRPC and HTTP, show misses and cache hits, stop.

    Served (the default), it writes sheet.png: per prompt, the image computed in full (cache bypassed, same seed), the
    image served, K and the similarity, so you can see what the cache did to the picture; with a shapes model its
    judge reads the uncached images against the scenes the prompts ask for. --in-process writes the images only.
    """
    from nirvana_dev.demo import demo_prompts, run_served_demo, shapes_demo_config, shapes_demo_model
    from nirvana_dev.tiny_model import make_tiny_model

    setup_logging(verbose=False)
    if model not in ("shapes", "tiny"):
        raise typer.BadParameter(f"--model={model!r}: expected shapes or tiny", param_hint="--model")
    if checkpoint is None and model == "shapes":
        checkpoint = shapes_demo_model(model_cache, train_minutes, say=console.print)
        config = config or shapes_demo_config(work_dir)
    elif checkpoint is None:
        checkpoint = work_dir / "tiny-model"
        if not (checkpoint / "model_index.json").exists():
            console.print(f"making a tiny random-weight model in {checkpoint}")
            make_tiny_model(checkpoint)
    if not in_process:
        run_served_demo(work_dir, checkpoint, steps, config, say=console.print)
        return
    from nirvana_cli.generate import generate

    generate(
        demo_prompts(checkpoint),
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


def serve(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: a tiny model it makes).")] = None,
    cache_dir: CacheDir = Path(".nirvana-cache"),
    milvus_uri: MilvusUri = None,
    config: ConfigFile = None,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    repo_dir: Annotated[Path | None, typer.Option(help="Where the model repository is generated.")] = None,
    profile: Annotated[str, typer.Option(help=PROFILE_HELP)] = "cpu",
    instances: Annotated[int | None, typer.Option(help="nirvana orchestrator instances (default 8).", min=1)] = None,
    queue_delay_us: Annotated[
        int | None, typer.Option(help="How long the UNet batcher waits for other requests' steps (µs).", min=0)
    ] = None,
    triton_dir: Annotated[Path | None, typer.Option(help="A tritonserver install (default: pytriton's).")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for READY.")] = 300.0,
    max_queue_size: Annotated[int, typer.Option(help="Queued requests beyond this are rejected.", min=1)] = 64,
    tenant_source: Annotated[
        str | None,
        typer.Option(help="client (TENANT as typed; the default here) | header (a gateway's) | token (signed)."),
    ] = None,
    admin_key_file: Annotated[
        Path | None, typer.Option(help="Key of the restricted Triton APIs (default: generated under --cache-dir).")
    ] = None,
    step_scheduler: Annotated[
        bool, typer.Option(help="Run every request's loop in the step scheduler (off: one BLS UNet call per step).")
    ] = True,
    verbose: bool = False,
) -> None:
    """Run the real tritonserver with the nirvana model repository until Ctrl-C / SIGTERM (dies with this process).

    Clients reach only `nirvana` and `nirvana_stream`; Triton's repository, shared-memory, logging and trace APIs
    need the `nirvana-admin-key` header (docs/security.md)."""
    from nirvana_dev.install import ServerPorts, TritonServerError
    from nirvana_dev.launch import ServeOptions, make_server, prepare
    from nirvana_dev.tritonserver import serve_forever
    from nirvana_export.repository import PROFILES

    if profile not in PROFILES:
        raise typer.BadParameter(f"profile={profile!r}: choose one of {PROFILES}")
    setup_logging(verbose)
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
        instances=instances,
        queue_delay_us=queue_delay_us,
        tenant_source=tenant_source,
        admin_key_file=admin_key_file,
        step_scheduler=step_scheduler,
    )
    if tenant_source not in (None, "client", "header", "token"):
        raise typer.BadParameter(f"--tenant-source={tenant_source!r}: choose client, header or token")
    try:
        repo, _ = prepare(options)
        server = make_server(options, repo)
        console.print(f"starting tritonserver on {host} (log: {server.log_path})")

        def ready() -> None:
            urls = server.urls
            console.print(f"READY  http {urls.http}  grpc {urls.grpc}  metrics {urls.metrics}  (Ctrl-C stops)")
            console.print(f"admin key (restricted APIs): {admin_key_file or cache_dir / 'triton' / 'admin.key'}")

        code = serve_forever(server, on_ready=ready)  # signal handlers go in before the server starts
    except TritonServerError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    raise typer.Exit(code)
