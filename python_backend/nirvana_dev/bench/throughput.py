"""`nirvana bench throughput`: images/s and latency at 1, 2, 4, 8 requests in flight, against one server, one run.

Closed loop: at each level C, C clients each send their next request as soon as the previous one answered, over
the ordinary gRPC infer API. Beside the client's figures it reads the server's counters before and after each level.
Rows per UNet execution: with a step scheduler (the `step_scheduler` model runs every request's loop) from its
`nirvana_scheduler_*` counters; without, from `nv_inference_count` / `nv_inference_exec_count` of `unet` (above 2 means
requests shared an execution). Two overheads per request-step:

- `overhead_ms_per_step`: everything a request's step costs that is not UNet execution, queueing included (the time
  a `nirvana` instance spent on a request, minus its non-UNet sub-model requests and minus the UNet executions its
  steps sat in, over the steps it ran). Issue 32's figure; both designs.
- `orchestration_ms_per_step`: the orchestrator's own time beside all its sub-model requests (their queueing counts
  as theirs): the figure earlier runs reported as the overhead (docs/results.md, "orchestration ms per step").

Mixes: `bypass` (every request computes every step, no cache work) and `mixed` (every other request repeats a
prompt admitted before the run, so it hits and skips K steps; the others are new prompts that miss and admit).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

# Models a `nirvana` request calls: their time (queueing included) is not the orchestrator's own.
SUBMODELS = ("text_encoder", "prompt_embedder", "unet", "vae_decoder", "cache", "step_scheduler")
# ... and those whose time is not UNet execution (the UNet's own queueing is overhead in issue 32's sense).
NON_UNET_SUBMODELS = ("text_encoder", "prompt_embedder", "vae_decoder", "cache")
ITERATIONS = "nirvana_scheduler_iterations_total"
SCHEDULER = "step_scheduler"  # the key the scheduler's unlabelled `nirvana_scheduler_*` samples are filed under
_SAMPLE = re.compile(r'^(nv_[a-z_]+)\{model="([^"]+)",version="[^"]*"\} ([0-9.e+-]+)$')
_SCHEDULER_SAMPLE = re.compile(r"^(nirvana_scheduler_[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$")
WARM_PROMPTS = [f"a {c} lighthouse on a cliff at dusk, oil painting number {i}" for i, c in enumerate(
    ["red", "blue", "green", "golden", "silver", "purple", "white", "black"]
)]  # fmt: skip


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """(metric, model) → value: Triton's per-model `nv_*` counters (summed over versions) and the step scheduler's
    `nirvana_scheduler_*` ones (under the model `step_scheduler`)."""
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if match := _SAMPLE.match(line):
            key, value = (match[1], match[2]), match[3]
        elif match := _SCHEDULER_SAMPLE.match(line):
            key, value = (match[1], SCHEDULER), match[2]
        else:
            continue
        values[key] = values.get(key, 0.0) + float(value)
    return values


def scrape(url: str) -> dict[tuple[str, str], float]:
    """`parse_metrics` of the server's /metrics now."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_metrics(response.read().decode())


def settled_scrape(url: str, timeout_s: float = 5.0) -> dict[tuple[str, str], float]:
    """A scrape once the step scheduler has published every loop that ended: it updates its counters just after
    sending a loop's final latent, so a client can hold its image a moment before they move."""
    values = scrape(url)
    end = time.perf_counter() + timeout_s
    while (ITERATIONS, SCHEDULER) in values and time.perf_counter() < end:
        time.sleep(0.1)
        again = scrape(url)
        if again == values and not values.get(("nirvana_scheduler_active_requests", SCHEDULER)):
            break
        values = again
    return values


def _delta(after: dict, before: dict, metric: str, model: str) -> float:
    return after.get((metric, model), 0.0) - before.get((metric, model), 0.0)


def scheduler_figures(before: dict, after: dict, steps_run: int) -> dict | None:
    """The step scheduler's counters between two scrapes (None when the server has none)."""
    if (ITERATIONS, SCHEDULER) not in after:
        return None

    def delta(name: str) -> float:
        return _delta(after, before, f"nirvana_scheduler_{name}", SCHEDULER)

    iterations, executions, rows = delta("iterations_total"), delta("unet_executions_total"), delta("rows_total")
    iteration_ms = delta("iteration_ms_total")
    return {
        "iterations": int(iterations),
        "unet_executions": int(executions),
        "rows_per_execution": rows / executions if executions else None,
        "ms_per_iteration": iteration_ms / iterations if iterations else None,
        "join_wait_ms_per_step": delta("join_wait_ms_total") / steps_run if steps_run else None,
        # The share of iterations that left no request in its loop behind, and how many were in their loops: rows
        # per execution below 2× that are requests elsewhere (encode, decode, the client), not left behind.
        "complete_iteration_share": delta("complete_iterations_total") / iterations if iterations else None,
        "loop_requests_per_iteration": delta("loop_requests_total") / iterations if iterations else None,
    }


def server_figures(before: dict, after: dict, steps_run: int) -> dict:
    """What the server measured between two scrapes: UNet batching and the overheads per request-step."""
    execs = _delta(after, before, "nv_inference_exec_count", "unet")
    rows = _delta(after, before, "nv_inference_count", "unet")
    # Triton adds a batched execution's compute time once per request in it: per execution = per request.
    unet_requests = _delta(after, before, "nv_inference_request_success", "unet")
    unet_us = _delta(after, before, "nv_inference_compute_infer_duration_us", "unet")
    requests = _delta(after, before, "nv_inference_request_success", "nirvana")
    # In `execute` (a request queued for a free instance is not orchestration time).
    nirvana_us = _delta(after, before, "nv_inference_compute_infer_duration_us", "nirvana")
    submodel_us = sum(_delta(after, before, "nv_inference_request_duration_us", m) for m in SUBMODELS)
    non_unet_us = sum(_delta(after, before, "nv_inference_request_duration_us", m) for m in NON_UNET_SUBMODELS)
    scheduler = scheduler_figures(before, after, steps_run)
    unet_ms_per_execution = unet_us / unet_requests / 1e3 if unet_requests else None
    if scheduler is None:
        # Per step: each request-step sat in one `unet` execution, and Triton already sums them per request.
        unet_step_us, rows_per_execution = unet_us, rows / execs if execs else None
    else:
        # Every request-step of an iteration sits through all of it: the mean iteration (or, where the scheduler
        # calls the `unet` model per iteration, that execution) per step. Unweighted by the iteration's size, which
        # rather counts the partly filled iterations of a ramp as overhead than hides any.
        per_step_ms = unet_ms_per_execution if unet_requests else scheduler["ms_per_iteration"]
        unet_step_us, rows_per_execution = (per_step_ms or 0.0) * 1e3 * steps_run, scheduler["rows_per_execution"]
    figures = {
        "design": "per-step" if scheduler is None else "scheduler",
        "unet_executions": int(execs) if scheduler is None else scheduler["unet_executions"],
        "rows_per_execution": rows_per_execution,
        # The `unet` model's own counters (in the scheduler design: zero unless it calls the model through BLS)
        "unet_rows_per_execution": rows / execs if execs else None,
        "unet_ms_per_execution": unet_ms_per_execution,
        "server_ms_per_request": nirvana_us / requests / 1e3 if requests else None,
        "overhead_ms_per_step": (nirvana_us - non_unet_us - unet_step_us) / steps_run / 1e3 if steps_run else None,
        # Sub-model request durations include their queueing, so this is what the orchestrator itself adds. Not
        # with a step scheduler: it is decoupled, and Triton ends its request's duration when `execute` returns
        # (at once, the loop runs on a thread), so the whole loop would count as the orchestrator's.
        "orchestration_ms_per_step": (nirvana_us - submodel_us) / steps_run / 1e3
        if steps_run and scheduler is None
        else None,
    }
    if scheduler is not None:
        figures["scheduler"] = scheduler
    return figures


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _items(mix: str, level: int, n: int) -> list[tuple[str, str]]:
    """(prompt, cache mode) of the requests of one level: new prompts miss; `mixed` repeats warm ones too."""
    fresh = [f"level {level} request {i}: a small wooden boat on a calm lake, watercolour" for i in range(n)]
    if mix == "bypass":
        return [(p, "bypass") for p in fresh]
    return [(WARM_PROMPTS[i % len(WARM_PROMPTS)], "auto") if i % 2 else (fresh[i], "auto") for i in range(n)]


def measure_level(client_factory, metrics_url: str, level: int, mix: str, n: int, steps: int, limit_s: float) -> dict:
    from nirvana_client import GenerateOptions
    from nirvana_client.load import Deadline, run_closed_loop

    clients = [client_factory() for _ in range(level)]
    slots = iter(range(level))
    local = threading.local()  # one client per worker thread

    def send(item: tuple[str, str], _: float | None) -> tuple[float, int]:
        if not hasattr(local, "client"):
            local.client = clients[next(slots)]
        prompt, mode = item
        result = local.client.generate(prompt, GenerateOptions(seed=7, steps=steps, cache_mode=mode))
        return result.latency_ms, steps - result.skipped_steps

    items = _items(mix, level, n)
    before, start = settled_scrape(metrics_url), time.perf_counter()
    results = [r for r in run_closed_loop(items, send, level, Deadline(limit_s)) if r is not None]
    elapsed = time.perf_counter() - start
    after = settled_scrape(metrics_url)
    for client in clients:
        client.close()
    latencies = [r[0] for r in results]
    return {
        "in_flight": level,
        "requests": len(results),
        "images_per_s": len(results) / elapsed,
        "latency_ms": {"p50": statistics.median(latencies), "p99": _percentile(latencies, 0.99)},
        **server_figures(before, after, sum(r[1] for r in results)),
    }


def run_throughput(
    checkpoint: Path | None,
    levels: list[int],
    requests: int,
    steps: int,
    mixes: list[str],
    work_dir: Path | None,
    limit_s: float = 600.0,
    **serve_options: object,
) -> dict:
    from nirvana_client import GenerateOptions, NirvanaClient
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare
    from nirvana_dev.tiny_model import make_tiny_model

    report: dict = {"steps": steps, "requests_per_level": requests, "levels": levels, "mixes": {}}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        options = ServeOptions(
            cache_dir=root / "serve", checkpoint=checkpoint, ports=ServerPorts(*free_ports(3)), **serve_options
        )
        repo, _ = prepare(options)
        with make_server(options, repo) as server:
            make_client = lambda: NirvanaClient(server.urls.grpc, "grpc")  # noqa: E731
            warm = make_client()
            for prompt in WARM_PROMPTS:  # admitted now, hits for the `mixed` runs; also warms every model
                warm.generate(prompt, GenerateOptions(seed=7, steps=steps))
            warm.close()
            for mix in mixes:
                rows = [
                    measure_level(make_client, server.urls.metrics, c, mix, requests, steps, limit_s) for c in levels
                ]
                report["mixes"][mix] = rows
    for mix, rows in report["mixes"].items():
        first, last = rows[0], rows[-1]
        report[f"{mix}_speedup_{last['in_flight']}_vs_{first['in_flight']}"] = (
            last["images_per_s"] / first["images_per_s"]
        )
    return report
