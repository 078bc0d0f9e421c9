"""`nirvana bench …`: benchmarks that print figures and write JSON (registered by `nirvana_cli.dev`).

Like the other development commands they need the `dev` extra; imports stay inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nirvana_cli.support import ConfigFile, emit, setup_logging

PROFILE_HELP = (
    "cpu: ONNX in python models; gpu: TensorRT plans (GPU only); torch: the checkpoint's torch modules "
    "(CUDA when present)."
)
bench_app = typer.Typer(help="Benchmarks that print figures (and write JSON).", no_args_is_help=True)
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the figures here.")]
DefaultCheckpoint = Annotated[Path | None, typer.Option(help="Checkpoint (default: a tiny model made on the fly).")]


@bench_app.command("overhead")
def bench_overhead(
    entries: Annotated[
        int, typer.Option(help="Largest cache size measured (10k is always measured too); up to 1,000,000.")
    ] = 100_000,
    queries: Annotated[int, typer.Option(help="Queries per size.")] = 500,
    json_path: JsonOut = None,
    latent_shape: Annotated[
        str, typer.Option(help="C,H,W of the stored latents (SD 1.5 at 512x512: 4,64,64).")
    ] = "4,64,64",
    dim: Annotated[
        int, typer.Option(help="Prompt vector size: 768 for SD 1.5's CLIP, 1280 for SDXL's pooled projection.")
    ] = 768,
    latent_dtype: Annotated[str, typer.Option(help="How latents are stored: q6, float16 or float32.")] = "q6",
    admissions: Annotated[int, typer.Option(help="Admissions timed below capacity, and again at capacity.")] = 2000,
    work_dir: Annotated[Path | None, typer.Option(help="Where the temporary caches go (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Cache path (search, K choice, latent load), recall, open after a restart, the cache owner's RSS, admissions
    below and at capacity (LCBFU eviction) and disk bytes per entry, at 10k and N entries.

    A million entries need about 12 GB of disk for q6 latents (33 GB for float16) and 12 GB of memory."""
    from nirvana_dev.bench.overhead import run_overhead

    if latent_dtype not in ("q6", "float16", "float32"):
        raise typer.BadParameter(f"{latent_dtype!r}: expected q6, float16 or float32", param_hint="--latent-dtype")
    setup_logging(verbose)
    sizes = sorted({min(10_000, entries), entries})
    shape = tuple(int(x) for x in latent_shape.split(","))
    emit(run_overhead(sizes, queries, shape, work_dir, dim, latent_dtype, admissions), json_path)


@bench_app.command("replicas")
def bench_replicas(
    replicas: Annotated[int, typer.Option(help="Cache replicas, one process each.", min=1)] = 4,
    prompts: Annotated[int, typer.Option(help="Prompts replica 0 admits, one latent each.", min=64)] = 20_000,
    hits: Annotated[int, typer.Option(help="Lookups of the hot prompts per replica.", min=1)] = 2000,
    dim: Annotated[int, typer.Option(help="Prompt vector size (768: SD 1.5's CLIP).", min=2)] = 768,
    json_path: JsonOut = None,
    milvus_uri: Annotated[
        str | None, typer.Option(help="A running Milvus server (http://host:19530); default: start the embedded one.")
    ] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Milvus data and latents (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Replicas on one Milvus server and one latent directory: each one's RSS and sync time, hits across
    replicas, the LCBFU count error after concurrent hits, and a new replica's open time. The embedded server
    needs the test extra's `milvus` wheel."""
    from nirvana_dev.bench.replicas_scale import run_replicas

    setup_logging(verbose)
    emit(run_replicas(replicas, prompts, hits, dim, work_dir, milvus_uri), json_path)


@bench_app.command("serving")
def bench_serving(
    checkpoint: DefaultCheckpoint = None,
    requests: Annotated[int, typer.Option(help="Requests per path.")] = 20,
    steps: Annotated[int, typer.Option(help="Denoising steps per request.")] = 20,
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Median latency in-process (torch, ONNX) vs through tritonserver (gRPC, HTTP), measured in one run."""
    from nirvana_dev.bench.serving import run_serving

    setup_logging(verbose)
    emit(run_serving(checkpoint, requests, steps, work_dir), json_path)


@bench_app.command("addons")
def bench_addons(
    checkpoint: DefaultCheckpoint = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per request.", min=2)] = 20,
    repeats: Annotated[int, typer.Option(help="Requests measured per variant.", min=1)] = 5,
    served: Annotated[bool, typer.Option(help="Through tritonserver: ControlNet models, --in-flight at once.")] = False,
    in_flight: Annotated[int, typer.Option(help="--served: requests in flight in the concurrent part.", min=2)] = 4,
    profile: Annotated[str, typer.Option(help="--served: cpu or torch.")] = "cpu",
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Cost of add-ons: LoRA merge time per set, UNet ms per step plain / fused LoRA / ControlNet (in-process, or
    --served through the ControlNet models of tritonserver)."""
    from nirvana_dev.bench.addons import run_addons
    from nirvana_dev.bench.addons_served import run_addons_served

    if profile not in ("cpu", "torch"):
        raise typer.BadParameter(f"profile={profile!r}: --served runs the cpu or the torch profile")
    setup_logging(verbose)
    run = run_addons_served(checkpoint, steps, repeats, in_flight, work_dir, profile) if served else None
    emit(run or run_addons(checkpoint, steps, repeats, work_dir), json_path)


@bench_app.command("lora-served")
def bench_lora_served(
    checkpoint: DefaultCheckpoint = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per request.", min=2)] = 20,
    requests: Annotated[int, typer.Option(help="Requests per run (three adapter sets in turn).", min=3)] = 48,
    in_flight: Annotated[int, typer.Option(help="Requests in flight at once.", min=1)] = 8,
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """LoRA sets through tritonserver under mixed load: loaded sets' latency while a third set loads, vs all loaded."""
    from nirvana_dev.bench.lora_served import run_lora_served

    setup_logging(verbose)
    emit(run_lora_served(checkpoint, steps, requests, in_flight, work_dir), json_path)


@bench_app.command("throughput")
def bench_throughput(
    checkpoint: DefaultCheckpoint = None,
    levels: Annotated[str, typer.Option(help="Requests in flight, comma-separated.")] = "1,2,4,8",
    requests: Annotated[int, typer.Option(help="Requests per level and mix.", min=1)] = 24,
    steps: Annotated[int, typer.Option(help="Denoising steps per request.")] = 20,
    mix: Annotated[
        list[str], typer.Option(help="bypass (all steps, no cache work) and/or mixed (half hits, half misses).")
    ] = ["bypass", "mixed"],  # noqa: B006 (typer reads the default, never mutates it)
    profile: Annotated[str, typer.Option(help=PROFILE_HELP)] = "cpu",
    instances: Annotated[int | None, typer.Option(help="nirvana orchestrator instances.", min=1)] = None,
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Images/s, p50/p99 latency and UNet rows per execution at several levels of requests in flight, one server."""
    from nirvana_dev.bench.throughput import run_throughput

    wrong = [m for m in mix if m not in ("bypass", "mixed")]
    if wrong:
        raise typer.BadParameter(f"mix={wrong[0]!r}: choose bypass or mixed")
    try:
        in_flight = [int(x) for x in levels.split(",")]
    except ValueError:
        raise typer.BadParameter(f"levels={levels!r}: comma-separated integers, e.g. 1,2,4,8") from None
    if not in_flight or min(in_flight) < 1:
        raise typer.BadParameter(f"levels={levels!r}: every level must be at least 1")
    setup_logging(verbose)
    report = run_throughput(checkpoint, in_flight, requests, steps, mix, work_dir, profile=profile, instances=instances)
    emit(report, json_path)


@bench_app.command("steps")
def bench_steps(
    checkpoint: DefaultCheckpoint = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per request of the closed-loop levels.", min=1)] = 20,
    requests: Annotated[int, typer.Option(help="Requests per level (closed loop).", min=1)] = 32,
    step_requests: Annotated[
        int, typer.Option(help="Requests at 4 and at 22 steps each, for the served step cost.", min=8)
    ] = 10,
    levels: Annotated[str, typer.Option(help="Requests in flight, comma-separated.")] = "1,8",
    designs: Annotated[
        str, typer.Option(help="scheduler (the step scheduler) and/or per-step (a BLS call of `unet` per step).")
    ] = "scheduler,per-step",
    instances: Annotated[int, typer.Option(help="nirvana orchestrator instances.", min=1)] = 8,
    unet_runs: Annotated[int, typer.Option(help="Timed runs of the UNet alone per row count.", min=30)] = 50,
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Issue 32's figures, both designs side by side: served step cost and overhead per request-step at 1 in flight
    against the UNet alone, images/s, p50/p99 and rows per UNet execution at each level (cache bypassed)."""
    from nirvana_dev.bench.steps import DESIGNS, print_table, run_steps

    chosen = [d.strip() for d in designs.split(",") if d.strip()]
    wrong = [d for d in chosen if d not in DESIGNS]
    if wrong or not chosen:
        raise typer.BadParameter(f"designs={designs!r}: comma-separated, among {', '.join(DESIGNS)}")
    try:
        in_flight = [int(x) for x in levels.split(",")]
    except ValueError:
        raise typer.BadParameter(f"levels={levels!r}: comma-separated integers, e.g. 1,8") from None
    if not in_flight or min(in_flight) < 1:
        raise typer.BadParameter(f"levels={levels!r}: every level must be at least 1")
    setup_logging(verbose)
    report = run_steps(
        checkpoint,
        in_flight,
        requests,
        steps,
        chosen,
        work_dir,
        step_requests=step_requests,
        instances=instances,
        unet_runs=unet_runs,
    )
    if json_path:  # the JSON (every level's server figures) goes to the file, first: the figures outlive the table
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


@bench_app.command("replay")
def bench_replay(
    workload: Annotated[Path, typer.Argument(help="CSV/TSV with a prompt column (e.g. diffusiondb_1k.csv).")],
    checkpoint: DefaultCheckpoint = None,
    column: Annotated[str | None, typer.Option(help="Prompt column (default: prompt or Prompt).")] = None,
    limit: Annotated[int | None, typer.Option(help="Replay only the first N requests.")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per request (N).")] = 50,
    tenant_column: Annotated[str | None, typer.Option(help="Column used as TENANT (e.g. user_name).")] = None,
    config: ConfigFile = None,
    compare_bypass: Annotated[
        bool, typer.Option(help="Also run every request with the cache bypassed (blocks alternate): cache efficiency.")
    ] = True,
    block_size: Annotated[int, typer.Option(help="--compare-bypass: requests per block.", min=1)] = 25,
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Cache and model dir (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Replay a prompt workload in-process (in timestamp order when it has one): hit rate, K histogram, steps saved,
    and with the bypass comparison the cache efficiency."""
    from nirvana_dev.bench.replay import run_replay

    setup_logging(verbose)
    report = run_replay(
        workload,
        checkpoint=checkpoint,
        column=column,
        limit=limit,
        steps=steps,
        tenant_column=tenant_column,
        config_path=config,
        work_dir=work_dir,
        compare_bypass=compare_bypass,
        block_size=block_size,
    )
    emit(report, json_path)


@bench_app.command("routing")
def bench_routing(
    workload: Annotated[Path, typer.Argument(help="Prompts with a prompt column (e.g. diffusiondb_1k.csv).")],
    checkpoint: DefaultCheckpoint = None,
    requests: Annotated[int, typer.Option(help="Requests per policy (the same ones, same arrivals).", min=1)] = 80,
    steps: Annotated[int, typer.Option(help="Denoising steps per request (N).", min=1)] = 20,
    load: Annotated[float, typer.Option(help="Poisson rate as a fraction of the measured joint capacity.")] = 0.7,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals.")] = 0,
    capacity_seconds: Annotated[float, typer.Option(help="Length of the joint-capacity run.")] = 15.0,
    policy_limit_s: Annotated[float, typer.Option(help="Stop sending a policy's requests after this long.")] = 150.0,
    pin: Annotated[
        bool, typer.Option(help="Split the cores between the replicas (as each would have its own GPU).")
    ] = False,
    json_path: JsonOut = None,
    work_dir: Annotated[Path | None, typer.Option(help="Temporary files (default: a temp dir).")] = None,
    verbose: bool = False,
) -> None:
    """Two unequal replicas (profile cpu and torch) behind the client balancer: each routing policy on one
    Poisson schedule, with prediction error and the simulator's mean beside the measured one."""
    from nirvana_dev.bench.routing import print_table, run_routing

    if not load > 0:
        raise typer.BadParameter(f"load={load}: must be a positive fraction of capacity")
    setup_logging(verbose)
    report = run_routing(
        workload,
        checkpoint,
        requests=requests,
        steps=steps,
        load=load,
        seed=seed,
        capacity_seconds=capacity_seconds,
        policy_limit_s=policy_limit_s,
        pin=pin,
        work_dir=work_dir,
    )
    print_table(report)
    if json_path:  # the table is the printed figures; the JSON (with per-replica learnt costs) goes to the file
        json_path.write_text(json.dumps(report, indent=2) + "\n")
