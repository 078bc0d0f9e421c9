"""`nirvana bench steps`: issue 32's acceptance figures, the step scheduler against per-step BLS, one run each.

For each design one server (the tiny model unless a checkpoint is given; 8 `nirvana` instances), warmed up, then,
cache bypassed:

- served step cost at 1 in flight: (median latency at 22 steps − median at 4 steps) / 18, the requests alternating
  so a drift of the machine falls on both; encoding, decoding and the hand-offs cancel out;
- closed-loop images/s and p50/p99 latency at each level (`throughput.measure_level`), with rows per UNet
  execution (the scheduler's counters, or the `unet` model's) and the server's overhead per request-step.

Once, in this process before any server runs: "UNet alone", the repository's `unet/1/model.onnx` by onnxruntime with
1 intra-op thread (as the scheduler runs it), median ms at 2 rows (a guidance pair) and at 16. Overhead per
request-step at 1 in flight = served step cost − UNet alone at 2 rows.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nirvana_dev.bench.throughput import measure_level

DESIGNS = {"scheduler": True, "per-step": False}  # name → ServeOptions.step_scheduler
SHORT_STEPS, LONG_STEPS = 4, 22
MAX_ROWS = 16  # the UNet's largest execution (nirvana.contract.specs.DEFAULT_UNET_MAX_BATCH): 8 guidance pairs
# Issue 32's acceptance
TARGET_OVERHEAD_MS, TARGET_ROWS, TARGET_SPEEDUP = 0.5, 14.0, 2.0


def step_cost(short_ms: list[float], long_ms: list[float], short_steps: int, long_steps: int) -> dict:
    """Served cost of one step: what the longer loop's median latency adds, per added step."""
    if long_steps <= short_steps:
        raise ValueError(f"long_steps={long_steps} must exceed short_steps={short_steps}")
    short, long = statistics.median(short_ms), statistics.median(long_ms)
    return {
        "short_steps": short_steps,
        "long_steps": long_steps,
        "requests_each": min(len(short_ms), len(long_ms)),
        "median_ms_short": short,
        "median_ms_long": long,
        "ms_per_step": (long - short) / (long_steps - short_steps),
    }


def unet_inputs(model, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of `rows` rows for an ONNX UNet (float32 everywhere; timesteps mid-schedule)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model.session.get_inputs():
        trailing = spec.shape[1:]
        if not all(isinstance(d, int) for d in trailing):
            raise ValueError(f"{model.path}: input {spec.name} has a dynamic non-batch axis {spec.shape}")
        if spec.name == "timestep":
            feeds[spec.name] = np.full((rows, *trailing), 500.0, dtype=np.float32)
        else:
            feeds[spec.name] = rng.standard_normal((rows, *trailing)).astype(np.float32)
    return feeds


def unet_alone(onnx: Path, rows: tuple[int, ...] = (2, MAX_ROWS), runs: int = 30, warm_up: int = 5) -> dict:
    """Median ms of one UNet execution at each row count, onnxruntime in this process with 1 intra-op thread."""
    from nirvana.runtime.onnx_runtime import OnnxModel

    model = OnnxModel(onnx, num_threads=1)
    medians = {}
    for n in rows:
        feeds = unet_inputs(model, n)
        for _ in range(warm_up):
            model.run(feeds)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model.run(feeds)
            times.append((time.perf_counter() - start) * 1e3)
        medians[str(n)] = statistics.median(times)
    return {"runs": runs, "threads": 1, "median_ms_by_rows": medians}


def _latencies(client, n: int, tag: str) -> tuple[list[float], list[float]]:
    from nirvana_client import GenerateOptions

    short, long = [], []
    for i in range(n):  # alternating: a slow spell of the machine weighs on both medians
        for count, into in ((SHORT_STEPS, short), (LONG_STEPS, long)):
            prompt = f"{tag} step cost {count} {i}: a small wooden boat on a calm lake, watercolour"
            result = client.generate(prompt, GenerateOptions(seed=7, steps=count, cache_mode="bypass"))
            into.append(result.latency_ms)
    return short, long


def measure_design(
    design: str,
    checkpoint: Path,
    cache_dir: Path,
    levels: list[int],
    requests: int,
    steps: int,
    step_requests: int,
    instances: int,
    limit_s: float,
    before_start: Callable[[Path], None] | None = None,
) -> dict:
    """One server of `design`: warm-up, the step cost at 1 in flight, then the closed loop at each level.
    `before_start(repo)` runs once the repository is written, before the server starts (nothing else running)."""
    from nirvana_client import GenerateOptions, NirvanaClient
    from nirvana_client.load import Deadline, run_closed_loop
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare

    options = ServeOptions(
        cache_dir=cache_dir,
        checkpoint=checkpoint,
        ports=ServerPorts(*free_ports(3)),
        instances=instances,
        step_scheduler=DESIGNS[design],
    )
    repo, _ = prepare(options)
    if before_start is not None:
        before_start(repo)
    with make_server(options, repo) as server:
        make_client = lambda: NirvanaClient(server.urls.grpc, "grpc")  # noqa: E731
        # Warm every orchestrator instance (each is its own process) and every batch size the levels reach.
        width = max(levels)
        warm = [f"warm-up {i}: a red lighthouse on a cliff at dusk" for i in range(2 * width)]
        clients = [make_client() for _ in range(width)]
        clients_iter = iter(clients)
        local = threading.local()

        def send(prompt: str, _: float | None) -> None:
            if not hasattr(local, "client"):
                local.client = next(clients_iter)
            local.client.generate(prompt, GenerateOptions(seed=7, steps=steps, cache_mode="bypass"))

        run_closed_loop(warm, send, width, Deadline(limit_s))
        for client in clients:
            client.close()
        one = make_client()
        _latencies(one, 2, f"{design} warm")  # both loop lengths once
        short, long = _latencies(one, step_requests, design)
        one.close()
        rows = [measure_level(make_client, server.urls.metrics, c, "bypass", requests, steps, limit_s) for c in levels]
    cost = step_cost(short, long, SHORT_STEPS, LONG_STEPS)
    first, last = rows[0], rows[-1]
    return {
        "step_cost": cost,
        "levels": rows,
        f"speedup_{last['in_flight']}_vs_{first['in_flight']}": last["images_per_s"] / first["images_per_s"],
    }


def run_steps(
    checkpoint: Path | None,
    levels: list[int],
    requests: int,
    steps: int,
    designs: list[str],
    work_dir: Path | None,
    step_requests: int = 10,
    instances: int = 8,
    unet_runs: int = 50,
    limit_s: float = 600.0,
) -> dict:
    from nirvana_dev.tiny_model import make_tiny_model

    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise ValueError(f"designs {unknown}: choose among {sorted(DESIGNS)}")
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "steps": steps,
        "levels": levels,
        "requests_per_level": requests,
        "cache_mode": "bypass",
        "instances": instances,
        "designs": {},
    }
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        if checkpoint is None:
            checkpoint = make_tiny_model(root / "tiny-model")
            report["checkpoint"] = "tiny random-weight model"
        else:
            report["checkpoint"] = str(checkpoint)

        def measure_unet(repo: Path) -> None:
            if "unet_alone" not in report:  # the same ONNX file serves both designs: measured once
                report["unet_alone"] = unet_alone(repo / "unet" / "1" / "model.onnx", runs=unet_runs)

        for design in designs:
            # One cache dir: the export is reused, and the cache is bypassed anyway
            report["designs"][design] = measure_design(
                design, checkpoint, root / "serve", levels, requests, steps, step_requests, instances, limit_s,
                before_start=measure_unet,
            )  # fmt: skip
    summarise(report)
    return report


def _level(rows: list[dict], in_flight: int) -> dict | None:
    return next((r for r in rows if r["in_flight"] == in_flight), None)


def summarise(report: dict) -> None:
    """Overhead per request-step from the step cost and the UNet alone, and issue 32's acceptance checks."""
    alone = report["unet_alone"]["median_ms_by_rows"]["2"]
    for figures in report["designs"].values():
        figures["overhead_ms_per_request_step"] = figures["step_cost"]["ms_per_step"] - alone
    scheduler, per_step = report["designs"].get("scheduler"), report["designs"].get("per-step")
    if scheduler is None:
        return
    top = max(report["levels"])
    checks: dict = {"overhead_ms_at_1_le_0_5": scheduler["overhead_ms_per_request_step"] <= TARGET_OVERHEAD_MS}
    high = _level(scheduler["levels"], 8)
    if high is not None:
        checks["rows_per_execution_at_8_ge_14"] = (high["rows_per_execution"] or 0) >= TARGET_ROWS
    low = _level(scheduler["levels"], 1)
    if low is not None and high is not None:
        checks["images_per_s_8_vs_1_ge_2"] = high["images_per_s"] / low["images_per_s"] >= TARGET_SPEEDUP
    if per_step is not None:
        checks["no_level_slower_than_per_step"] = all(
            row["images_per_s"] >= (_level(per_step["levels"], row["in_flight"]) or {"images_per_s": 0})["images_per_s"]
            for row in scheduler["levels"]
        )
    # What the UNet alone allows at `top` in flight: `top` guidance pairs per execution, `steps` executions each
    rows = min(2 * top, MAX_ROWS)
    if str(rows) in report["unet_alone"]["median_ms_by_rows"]:
        bound = (rows // 2) / (report["steps"] * report["unet_alone"]["median_ms_by_rows"][str(rows)] / 1e3)
        report[f"unet_alone_images_per_s_at_{rows}_rows"] = bound
    report["acceptance"] = checks


def _scheduler(row: dict, figure: str) -> str:
    """A step-scheduler figure of a level's row ("n/a" for the per-step design)."""
    scheduler = row.get("scheduler") or {}
    if figure == "complete" and scheduler.get("complete_iteration_share") is not None:
        return f"{100 * scheduler['complete_iteration_share']:.1f}"
    value = scheduler.get("loop_requests_per_iteration") if figure == "loop_requests" else None
    return "n/a" if value is None else f"{value:.2f}"


def print_table(report: dict) -> None:
    """Both designs side by side."""
    designs = list(report["designs"])
    alone = report["unet_alone"]["median_ms_by_rows"]
    lines: list[tuple[str, list[str]]] = []

    def add(label: str, value: Callable[[dict], str]) -> None:
        lines.append((label, [value(report["designs"][d]) for d in designs]))

    def at(level: int, fmt: Callable[[dict], str]) -> Callable[[dict], str]:
        def get(figures: dict) -> str:
            row = _level(figures["levels"], level)
            return "n/a" if row is None else fmt(row)

        return get

    def num(value: float | None, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

    c = report["designs"][designs[0]]["step_cost"]
    add(f"served step cost at 1 in flight, ms ({c['long_steps']}−{c['short_steps']} steps)", lambda f: num(
        f["step_cost"]["ms_per_step"]))  # fmt: skip
    add(f"  median latency {c['short_steps']} / {c['long_steps']} steps, ms", lambda f: (
        f"{f['step_cost']['median_ms_short']:.1f} / {f['step_cost']['median_ms_long']:.1f}"))  # fmt: skip
    add("UNet alone, 2 rows, ms (1 thread)", lambda f: num(alone["2"]))
    add("overhead per request-step at 1, ms", lambda f: num(f["overhead_ms_per_request_step"]))
    for level in report["levels"]:
        add(f"images/s at {level} (N={report['steps']})", at(level, lambda r: num(r["images_per_s"])))
        add(f"  latency p50 / p99 at {level}, ms", at(level, lambda r: (
            f"{r['latency_ms']['p50']:,.0f} / {r['latency_ms']['p99']:,.0f}")))  # fmt: skip
        add(f"  rows per UNet execution at {level} (of {MAX_ROWS})", at(level, lambda r: num(r["rows_per_execution"])))
        add(f"  server overhead per request-step at {level}, ms", at(level, lambda r: num(r["overhead_ms_per_step"])))
        add(f"  requests in their loop per iteration at {level}", at(level, lambda r: _scheduler(r, "loop_requests")))
        add(f"  iterations carrying all of them at {level}, %", at(level, lambda r: _scheduler(r, "complete")))
    first, last = report["levels"][0], report["levels"][-1]
    add(f"images/s {last} vs {first}", lambda f: num(f.get(f"speedup_{last}_vs_{first}")) + "x")
    width = max(len(label) for label, _ in lines)
    print(f"{'':{width}}  " + "  ".join(f"{d:>14}" for d in designs))
    for label, values in lines:
        print(f"{label:{width}}  " + "  ".join(f"{v:>14}" for v in values))
    extra = [f"UNet alone 16 rows: {num(alone.get(str(MAX_ROWS)))} ms"]
    for key, value in report.items():
        if key.startswith("unet_alone_images_per_s_at_"):
            extra.append(f"UNet-alone bound at {max(report['levels'])} in flight: {value:.2f} images/s")
    print("; ".join(extra))
    if "acceptance" in report:
        print("acceptance (scheduler): " + ", ".join(f"{k}={v}" for k, v in report["acceptance"].items()))
