"""`nirvana-client`: send requests to a running nirvana-triton server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nirvana_client.client import GenerateOptions, NirvanaClient

Urls = Annotated[
    list[str] | None,
    typer.Option(
        "--url",
        help="host:port of Triton (gRPC 8001, HTTP 8000 by default). Repeat it for several replicas: requests "
        "are then placed by --policy (client-side balancer).",
    ),
]
Policy = Annotated[
    str,
    typer.Option(
        help="With several --url: round-robin | least-outstanding | predicted-completion (where the request is "
        "predicted to finish first, from each replica's learnt step cost and its requests in flight)."
    ),
]
ControlNetName = Annotated[str | None, typer.Option(help="A ControlNet of the server, by name.")]
ControlImage = Annotated[
    Path | None, typer.Option(help="--controlnet: its control image (PNG/JPEG at the model's image size).")
]
ControlNetScale = Annotated[float | None, typer.Option(help="--controlnet: conditioning scale, 0–2 (default 1).")]

if TYPE_CHECKING:  # imported where used, so `generate` starts without matplotlib and friends
    import numpy

    from nirvana_client.load import Timing
    from nirvana_client.workload import WorkItem

app = typer.Typer(help="Client for a nirvana-triton server (Triton gRPC/HTTP).", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Client for a nirvana-triton server (Triton gRPC/HTTP)."""


def _pixels(path: Path | None) -> numpy.ndarray | None:
    """A control image file as uint8 RGB ``[H, W, 3]`` (the server says which size it needs)."""
    if path is None:
        return None
    import numpy as np
    from PIL import Image

    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except OSError as err:
        raise typer.BadParameter(f"--control-image {path}: {err}") from None


def _headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise typer.BadParameter(f"--header {line!r}: expected 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    return headers


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text prompt.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write.")] = Path("out.png"),
    url: Urls = None,
    policy: Policy = "predicted-completion",
    protocol: Annotated[str, typer.Option(help="grpc or http")] = "grpc",
    negative_prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    cache_mode: Annotated[str | None, typer.Option(help="auto | bypass | refresh")] = None,
    tenant: str | None = None,
    lora: Annotated[str | None, typer.Option(help='LoRA adapters and scales, e.g. "ink:0.8,glow:0.5".')] = None,
    controlnet: ControlNetName = None,
    control_image: ControlImage = None,
    controlnet_scale: ControlNetScale = None,
    stream: Annotated[bool, typer.Option(help="Stream (gRPC): a progress bar with hit/K as the steps run.")] = False,
    previews: Annotated[Path | None, typer.Option(help="--stream: write preview PNGs into this folder.")] = None,
    preview_every: Annotated[int, typer.Option(help="--previews: one preview every N steps run.", min=1)] = 1,
    header: Annotated[
        list[str] | None, typer.Option(help='"Name: value" sent with the request (repeatable), e.g. for a gateway.')
    ] = None,
) -> None:
    """Generate one image and print hit / skipped steps / similarity / latency."""
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    if (stream or previews) and protocol != "grpc":
        raise typer.BadParameter("--stream and --previews need --protocol grpc")
    urls = _urls(url, protocol, policy)
    if len(urls) > 1 and (stream or previews):
        raise typer.BadParameter("--stream and --previews talk to one server: give one --url")
    pixels = _pixels(control_image)
    options = GenerateOptions(
        negative_prompt, seed, steps, guidance, cache_mode, tenant, lora, controlnet, pixels, controlnet_scale
    )
    if len(urls) > 1:
        _generate_balanced(prompt, out, urls, policy, protocol, options)
        return
    client = NirvanaClient(urls[0], protocol, headers=_headers(header or []))  # type: ignore[arg-type]
    try:
        if stream or previews:
            from nirvana_client.stream_view import generate_with_progress

            res, _ = generate_with_progress(client, prompt, options, previews, preview_every)
        else:
            res = client.generate(prompt, options)
    except InferenceServerException as err:
        typer.echo(f"error: {err.message()}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
    Image.fromarray(res.image).save(out)
    typer.echo(
        f"{out}: hit={res.cache_hit} skipped_steps={res.skipped_steps} "
        f"similarity={res.similarity:.3f} latency_ms={res.latency_ms:.1f}"
    )


def _urls(urls: list[str] | None, protocol: str, policy: str) -> list[str]:
    """The --url values, or the local default of the protocol; a usage error for an unknown --policy."""
    from nirvana_client.routing import POLICIES

    if policy not in POLICIES:
        raise typer.BadParameter(f"policy={policy!r}: choose one of {', '.join(POLICIES)}")
    from nirvana_client.balancer import expand_urls

    try:
        return expand_urls(list(urls or [])) or ["127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000"]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--url") from None


def _generate_balanced(
    prompt: str, out: Path, urls: list[str], policy: str, protocol: str, options: GenerateOptions
) -> None:
    """One request through the balancer: the image, and which replica served it."""
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    from nirvana_client.balancer import Balancer

    balancer = Balancer(urls, policy, protocol)  # type: ignore[arg-type]
    try:
        res, replica, _ = balancer.generate(prompt, options)
    except InferenceServerException as err:
        typer.echo(f"error: {err.message()}", err=True)
        raise typer.Exit(1) from None
    finally:
        balancer.close()
    Image.fromarray(res.image).save(out)
    typer.echo(
        f"{out}: replica={urls[replica]} hit={res.cache_hit} skipped_steps={res.skipped_steps} "
        f"similarity={res.similarity:.3f} latency_ms={res.latency_ms:.1f}"
    )


Workload = Annotated[Path, typer.Argument(help="Prompts: .txt (one per line), .csv/.tsv/.parquet, .jsonl.")]
Column = Annotated[str | None, typer.Option(help="Prompt column (default: prompt, Prompt, text or caption).")]
SeedColumn = Annotated[str | None, typer.Option(help="Seed column (default: 'seed' if present, else the index).")]
TimestampColumn = Annotated[
    str | None, typer.Option(help="Arrival-time column; rows are replayed sorted by it (default: 'timestamp').")
]
Limit = Annotated[int | None, typer.Option(help="Use the first N requests (after sorting / shuffling).", min=1)]
Steps = Annotated[int, typer.Option(help="NUM_INFERENCE_STEPS sent with every request.", min=1)]


def _load(
    workload: Path,
    column: str | None,
    seed_column: str | None,
    timestamp_column: str | None,
    limit: int | None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[WorkItem]:
    """The workload's items, or a usage error naming what is wrong with the file."""
    from nirvana_client.workload import WorkloadError, load_workload

    try:
        return load_workload(
            workload,
            column,
            seed_column=seed_column,
            timestamp_column=timestamp_column,
            limit=limit,
            shuffle=shuffle,
            shuffle_seed=seed,
        )
    except WorkloadError as err:
        raise typer.BadParameter(str(err), param_hint="WORKLOAD") from None


def _timing(
    timing: str | None, speed: float | None, concurrency: int, rate: float | None, max_in_flight: int, seed: int
) -> Timing:
    """The pacing asked for; without --timing, --rate means poisson and --speed means trace."""
    from nirvana_client.load import Timing

    mode = timing or ("poisson" if rate is not None else "trace" if speed is not None else "closed")
    try:
        return Timing(mode, speed or 1.0, concurrency, rate or 1.0, max_in_flight, seed)  # type: ignore[arg-type]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def replay(
    workload: Workload,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.json, report.md, plots.")],
    url: Urls = None,
    policy: Policy = "predicted-completion",
    protocol: Annotated[str, typer.Option(help="grpc or http")] = "grpc",
    column: Column = None,
    seed_column: SeedColumn = None,
    timestamp_column: TimestampColumn = None,
    timing: Annotated[
        str | None, typer.Option(help="trace | closed | poisson (default: from --speed/--rate, else closed).")
    ] = None,
    speed: Annotated[float | None, typer.Option(help="trace: replay this many times faster than recorded.")] = None,
    concurrency: Annotated[int, typer.Option(help="closed: requests outstanding at once.", min=1)] = 1,
    rate: Annotated[float | None, typer.Option(help="poisson: mean requests per second.")] = None,
    max_in_flight: Annotated[int, typer.Option(help="trace/poisson: most requests outstanding.", min=1)] = 16,
    limit: Limit = None,
    shuffle: Annotated[bool, typer.Option(help="Shuffle the workload (with --seed) before --limit.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --shuffle and of the Poisson arrivals.")] = 0,
    max_seconds: Annotated[float | None, typer.Option(help="Stop sending after this many seconds.")] = None,
    steps: Steps = 50,
    guidance: Annotated[float | None, typer.Option(help="GUIDANCE_SCALE (default: the server's).")] = None,
    negative_prompt: str | None = None,
    tenant: Annotated[str | None, typer.Option(help="TENANT sent with every request.")] = None,
    compare_bypass: Annotated[
        bool, typer.Option(help="Also send every request with CACHE_MODE=bypass, in alternating blocks.")
    ] = False,
    block_size: Annotated[int, typer.Option(help="--compare-bypass: requests per block.", min=1)] = 25,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 600.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay a prompt workload against a running server and write the benchmark report.

    The DiffusionDB trace replays in timestamp order: `--timing trace --speed 60`. With --compare-bypass every
    request also runs with the cache off, in alternating blocks, so cache on/off are measured side by side.
    With several --url values the requests go through the client balancer (--policy) and report.json holds
    latency, each replica's share and learnt costs, and the error of the predicted server time.
    """
    from nirvana_client.benchmark import run_and_report
    from nirvana_client.efficiency import summary as efficiency_summary
    from nirvana_client.replay import ReplayOptions
    from nirvana_client.report import prediction_summary

    if shuffle and (timing == "trace" or (timing is None and speed is not None)):
        raise typer.BadParameter("--shuffle breaks a trace's order; use closed or poisson timing")
    items = _load(workload, column, seed_column, timestamp_column, limit, shuffle, seed)
    urls = _urls(url, protocol, policy)
    pacing = _timing(timing, speed, concurrency, rate, max_in_flight, seed)
    if len(urls) > 1:
        if compare_bypass:
            raise typer.BadParameter("--compare-bypass runs against one server: give one --url")
        request = GenerateOptions(negative_prompt, None, steps, guidance, None, tenant)
        _replay_balanced(items, out, urls, policy, protocol, pacing, request, max_seconds, timeout)
        return
    try:
        options = ReplayOptions(
            url=urls[0],
            protocol=protocol,  # type: ignore[arg-type]
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            tenant=tenant,
            timing=pacing,
            compare_bypass=compare_bypass,
            block_size=block_size,
            max_seconds=max_seconds,
            timeout_s=timeout,
        )
        report = run_and_report(items, options, out, str(workload), progress=progress)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(summary_line(report))
    typer.echo(efficiency_summary(report["cache_efficiency"]))
    typer.echo(prediction_summary(report))
    typer.echo(f"report: {out / 'report.md'}")
    if report["errors"] and report["errors"] == sum(m["requests"] for m in report["by_mode"].values()):
        raise typer.Exit(1)  # nothing succeeded: a script running this must notice


def _replay_balanced(
    items: list[WorkItem],
    out: Path,
    urls: list[str],
    policy: str,
    protocol: str,
    timing: Timing,
    request: GenerateOptions,
    max_seconds: float | None,
    timeout: float,
) -> None:
    """Replay over several replicas through the balancer; writes report.json (summary, per-replica learnt state,
    prediction errors, records). The single-server report (report.md, plots, bypass comparison) needs one URL."""
    import dataclasses
    import json

    from nirvana_client.balancer import Balancer, latency_summary, run_balanced
    from nirvana_client.load import Deadline, schedule

    try:
        offsets = schedule(timing, len(items), [item.timestamp_s for item in items])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    pairs = [
        (item.prompt, dataclasses.replace(request, seed=item.seed, tenant=item.tenant or request.tenant))
        for item in items
    ]
    balancer = Balancer(urls, policy, protocol, timeout_s=timeout)  # type: ignore[arg-type]
    try:
        records = run_balanced(balancer, pairs, timing, Deadline(max_seconds), offsets)
    finally:
        balancer.close()
    summary = latency_summary(records, len(urls)) | {"prediction_error": balancer.error_summary()}
    report = {"urls": urls, "policy": policy, "timing": dataclasses.asdict(timing), **summary}
    report |= {"replicas": balancer.snapshot(), "records": [dataclasses.asdict(r) for r in records]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    shares = " ".join(f"{u}={s:.0%}" for u, s in zip(urls, summary["share"], strict=True))
    typer.echo(
        f"requests={summary['requests']} errors={summary['errors']} hit_rate={summary['hit_rate']:.3f} "
        f"mean_ms={summary['mean_ms']:.1f} p50_ms={summary['p50_ms']:.1f} p99_ms={summary['p99_ms']:.1f} {shares}"
    )
    typer.echo(f"report: {out / 'report.json'}")
    if summary["errors"] and summary["errors"] == summary["requests"]:
        raise typer.Exit(1)  # nothing succeeded: a script running this must notice


def summary_line(report: dict) -> str:
    """One line of the figures that matter."""
    ratio = report["latency_ratio_cached_over_bypass"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (
        f"requests={report['requests']} errors={report['errors']} hit_rate={report['hit_rate']:.3f} "
        f"steps_saved={report['steps_saved_fraction']:.3f} cached/bypass latency: mean={fmt(ratio['mean'])} "
        f"p99={fmt(ratio['p99'])}"
    )


@app.command("perf-data")
def perf_data(
    workload: Workload,
    out: Annotated[Path, typer.Option("-o", "--out", help="JSON file for perf_analyzer --input-data.")] = Path(
        "input.json"
    ),
    column: Column = None,
    seed_column: SeedColumn = None,
    timestamp_column: TimestampColumn = None,
    limit: Limit = None,
    steps: Annotated[int | None, typer.Option(help="NUM_INFERENCE_STEPS (default: the server's).", min=1)] = None,
    guidance: float | None = None,
    cache_mode: Annotated[str | None, typer.Option(help="auto | bypass | refresh (default: the server's).")] = None,
    tenant: str | None = None,
    negative_prompt: str | None = None,
    lora: Annotated[str | None, typer.Option(help='LORA of every request, e.g. "ink:0.8".')] = None,
    controlnet: ControlNetName = None,
    control_image: ControlImage = None,
    controlnet_scale: ControlNetScale = None,
) -> None:
    """Write perf_analyzer --input-data JSON for the `nirvana` model: one request per workload prompt."""
    from nirvana_client.perfdata import input_data, write_input_data

    if cache_mode is not None and cache_mode not in ("auto", "bypass", "refresh"):
        raise typer.BadParameter(f"--cache-mode={cache_mode!r}: must be auto, bypass or refresh")
    items = _load(workload, column, seed_column, timestamp_column, limit)
    document = input_data(
        items,
        steps=steps,
        guidance=guidance,
        cache_mode=cache_mode,
        tenant=tenant,
        negative_prompt=negative_prompt,
        lora=lora,
        controlnet=controlnet,
        control_image=_pixels(control_image),
        controlnet_scale=controlnet_scale,
    )
    write_input_data(document, out)
    typer.echo(f"{out}: {len(document['data'])} requests for perf_analyzer --input-data")


if __name__ == "__main__":
    app()
