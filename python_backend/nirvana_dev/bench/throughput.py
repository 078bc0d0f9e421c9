"""`nirvana bench throughput`: images/s and latency at 1, 2, 4, 8 requests in flight, against one server, one run.

Closed loop: at each level C, C clients each send their next request as soon as the previous one answered, over
the ordinary gRPC infer API. Beside the client's figures it reads Triton's own counters before and after each level:
rows per UNet execution (`nv_inference_count` / `nv_inference_exec_count` of `unet`: above 2 means requests shared
an execution), UNet ms per execution, and the orchestration overhead per denoising step (time a `nirvana` instance
spent on a request, minus the time its sub-model requests took including their queueing, over the steps it ran).

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
SUBMODELS = ("text_encoder", "prompt_embedder", "unet", "vae_decoder", "cache")
_SAMPLE = re.compile(r'^(nv_[a-z_]+)\{model="([^"]+)",version="[^"]*"\} ([0-9.e+-]+)$')
WARM_PROMPTS = [f"a {c} lighthouse on a cliff at dusk, oil painting number {i}" for i, c in enumerate(
    ["red", "blue", "green", "golden", "silver", "purple", "white", "black"]
)]  # fmt: skip


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric, model) → value of Triton's per-model `nv_*` counters (summed over versions)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if match := _SAMPLE.match(line):
            key = (match[1], match[2])
            values[key] = values.get(key, 0.0) + float(match[3])
    return values


def _delta(after: dict, before: dict, metric: str, model: str) -> float:
    return after.get((metric, model), 0.0) - before.get((metric, model), 0.0)


def server_figures(before: dict, after: dict, steps_run: int) -> dict:
    """What Triton measured between two scrapes: UNet batching and the orchestration overhead per step."""
    execs = _delta(after, before, "nv_inference_exec_count", "unet")
    rows = _delta(after, before, "nv_inference_count", "unet")
    # Triton adds a batched execution's compute time once per request in it: per execution = per request.
    unet_requests = _delta(after, before, "nv_inference_request_success", "unet")
    unet_us = _delta(after, before, "nv_inference_compute_infer_duration_us", "unet")
    requests = _delta(after, before, "nv_inference_request_success", "nirvana")
    # In `execute` (a request queued for a free instance is not orchestration time).
    nirvana_us = _delta(after, before, "nv_inference_compute_infer_duration_us", "nirvana")
    submodel_us = sum(_delta(after, before, "nv_inference_request_duration_us", m) for m in SUBMODELS)
    return {
        "unet_executions": int(execs),
        "unet_rows_per_execution": rows / execs if execs else None,
        "unet_ms_per_execution": unet_us / unet_requests / 1e3 if unet_requests else None,
        "server_ms_per_request": nirvana_us / requests / 1e3 if requests else None,
        # Sub-model request durations include their queueing, so this is what the orchestrator itself adds.
        "overhead_ms_per_step": (nirvana_us - submodel_us) / steps_run / 1e3 if steps_run else None,
    }


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
    before, start = scrape(metrics_url), time.perf_counter()
    results = [r for r in run_closed_loop(items, send, level, Deadline(limit_s)) if r is not None]
    elapsed = time.perf_counter() - start
    after = scrape(metrics_url)
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
