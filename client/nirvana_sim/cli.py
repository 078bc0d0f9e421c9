"""`nirvana-sim simulate`: sweep routing policies over a replica pool and report latency by load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nirvana_sim.engine import DIFFUSIONDB_CLIP, load_trace_gaps
from nirvana_sim.experiments import capacity_rps, run_sweep
from nirvana_sim.model import BUILTIN_KINDS, load_kinds, parse_pool

app = typer.Typer(help="Discrete-event simulator of a nirvana-triton replica pool.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Discrete-event simulator of a nirvana-triton replica pool."""


def _parse_loads(text: str) -> list[float]:
    try:
        loads = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated fractions like 0.3,0.7, got {text!r}") from None
    if not loads or any(load <= 0 for load in loads):
        raise typer.BadParameter(f"loads must be positive fractions of capacity, got {text!r}")
    return loads


@app.command()
def simulate(
    replicas: Annotated[str, typer.Option(help="Pool as kind:count pairs, e.g. 'h100:8,l4:8'.")] = "h100:8,l4:8",
    loads: Annotated[str, typer.Option(help="Offered load as fractions of the pool's no-cache capacity.")] = (
        "0.3,0.5,0.7,0.9"
    ),
    requests: Annotated[int, typer.Option(help="Requests per run (bounds the run).", min=1)] = 2000,
    steps: Annotated[int, typer.Option(help="Denoising steps N per request.", min=1)] = 50,
    hit_rate: Annotated[float, typer.Option(help="Cache hit rate with cache on.", min=0.0, max=1.0)] = (
        DIFFUSIONDB_CLIP.hit_rate
    ),
    seed: Annotated[int, typer.Option(help="Seed for arrivals and cache draws.")] = 0,
    max_active: Annotated[int, typer.Option(help="Requests sharing one step per replica.", min=1)] = 8,
    kinds_file: Annotated[Path | None, typer.Option(help="JSON of extra/overriding replica kinds.")] = None,
    trace: Annotated[Path | None, typer.Option(help="CSV with a `timestamp` column: arrival gaps to replay.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write config and rows as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write mean and p99 latency vs load (PNG) here.")] = None,
) -> None:
    """Run every policy at every load, cache off and on, and print mean/p50/p99 latency, throughput, busy share."""
    try:
        kinds = BUILTIN_KINDS | (load_kinds(kinds_file) if kinds_file else {})
    except (OSError, ValueError, TypeError) as error:
        raise typer.BadParameter(str(error), param_hint="--kinds-file") from None
    try:
        pool = parse_pool(replicas, kinds)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--replicas") from None
    profile = dataclasses.replace(DIFFUSIONDB_CLIP, hit_rate=hit_rate)
    gaps = load_trace_gaps(trace, seed) if trace else None
    rows = run_sweep(
        pool, _parse_loads(loads), requests, steps, seed, profile, max_active=max_active, trace_gaps_ms=gaps
    )
    capacity = capacity_rps(pool, steps, max_active)
    _print_table(rows, replicas, capacity)
    if json_path:
        config = {"replicas": replicas, "pool_size": len(pool), "capacity_rps": capacity, "requests": requests}
        config |= {"steps": steps, "hit_rate": hit_rate, "seed": seed, "max_active": max_active}
        config |= {"trace": str(trace) if trace else None, "skipped_counts": profile.skipped_counts}
        json_path.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    if plot:
        _plot(rows, replicas, plot)


def _print_table(rows: list[dict], replicas: str, capacity: float) -> None:
    table = Table(title=f"{replicas}: capacity {capacity:.1f} req/s (no cache)")
    for column in ("load", "req/s", "cache", "policy", "mean ms", "p50 ms", "p99 ms", "done/s", "busy"):
        table.add_column(column, justify="left" if column in ("cache", "policy") else "right")
    for row in rows:
        table.add_row(
            f"{row['load']:.2f}",
            f"{row['rate_rps']:.1f}",
            row["cache"],
            row["policy"],
            f"{row['mean_ms']:.0f}",
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['throughput_rps']:.1f}",
            f"{row['utilisation']:.2f}",
        )
    Console(width=120).print(table)


def _plot(rows: list[dict], replicas: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    for axis, metric, label in zip(axes, ("mean_ms", "p99_ms"), ("mean latency (s)", "p99 latency (s)"), strict=True):
        for colour, policy in enumerate(policies):
            for cache, style in (("off", "-"), ("on", "--")):
                points = [(r["load"], r[metric] / 1000) for r in rows if r["policy"] == policy and r["cache"] == cache]
                axis.plot(
                    *zip(*points, strict=True), style, color=f"C{colour}", marker="o", label=f"{policy}, cache {cache}"
                )
        axis.set(xlabel="load (fraction of no-cache capacity)", ylabel=label, yscale="log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Routing policies on {replicas}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    app()
