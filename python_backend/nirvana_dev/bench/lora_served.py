"""`nirvana bench lora-served`: LoRA adapter sets through the real server under a mixed load, measured in one run.

Three adapter sets in one request stream, `--in-flight` requests at a time (CACHE_MODE=bypass, so every request runs
all N steps). In the *warm* runs all three sets are loaded before the stream starts; in the *cold* run the third set
is one the server has not loaded yet (the same adapter at another scale: same compute, a new UNet model), so its
first request fuses and loads it while the other two sets' requests go on. Reported: latency of the two loaded
sets' requests in each run (the cold run's p99 over the warm runs'), how long those requests waited for their set
(``adapter_ms``), the load time, and whether every image of the cold run equals the same request sent alone.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nirvana_dev.bench.serving import PROMPTS


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _stream(sets: tuple[str, str, str], requests: int) -> list[tuple[str, int, str]]:
    return [(PROMPTS[i % len(PROMPTS)], i, sets[i % 3]) for i in range(requests)]


class _Clients:
    """One gRPC client per worker thread (tritonclient's clients are not shared across threads here)."""

    def __init__(self, url: str) -> None:
        self.url, self._local, self._made, self._lock = url, threading.local(), [], threading.Lock()

    def get(self):
        from nirvana_client import NirvanaClient

        if not hasattr(self._local, "client"):
            self._local.client = NirvanaClient(self.url, "grpc")
            with self._lock:
                self._made.append(self._local.client)
        return self._local.client

    def close(self) -> None:
        for client in self._made:
            client.close()


def _send(clients: _Clients, steps: int, item: tuple[str, int, str]) -> dict:
    from nirvana_client import GenerateOptions

    prompt, seed, lora = item
    start = time.perf_counter()
    result = clients.get().generate(prompt, GenerateOptions(seed=seed, steps=steps, cache_mode="bypass", lora=lora))
    latency = (time.perf_counter() - start) * 1e3
    return {"lora": lora, "ms": latency, "adapter_ms": result.server_timings_ms.get("adapter_ms", 0.0), "image": result}


def _run(clients: _Clients, items: list, steps: int, in_flight: int, loaded: tuple[str, str]) -> dict:
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        done = list(pool.map(lambda item: _send(clients, steps, item), items))
    warm = [d for d in done if d["lora"] in loaded]
    others = [d for d in done if d["lora"] not in loaded]
    return {
        "loaded_sets_ms": {
            "mean": statistics.fmean(d["ms"] for d in warm),
            "p50": _percentile([d["ms"] for d in warm], 50),
            "p99": _percentile([d["ms"] for d in warm], 99),
        },
        "loaded_sets_max_adapter_wait_ms": max(d["adapter_ms"] for d in warm),
        "third_set_max_adapter_wait_ms": max(d["adapter_ms"] for d in others),
        "_done": done,
    }


def _rows_per_execution(url: str) -> dict[str, float]:
    """UNet rows per execution of each adapter set's model (Triton's statistics): > 2 means requests shared one."""
    import tritonclient.grpc as grpcclient

    triton = grpcclient.InferenceServerClient(url)
    try:
        stats = triton.get_inference_statistics(as_json=True)["model_stats"]
    finally:
        triton.close()
    return {
        s["name"]: int(s.get("inference_count", 0)) / max(1, int(s.get("execution_count", 0)))
        for s in stats
        if "_lora_" in s["name"]
    }


def run_lora_served(checkpoint: Path | None, steps: int, requests: int, in_flight: int, work_dir: Path | None) -> dict:
    from nirvana_client import GenerateOptions
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare
    from nirvana_dev.tiny_addons import make_tiny_lora
    from nirvana_dev.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        for seed, name in enumerate(("ink", "glow", "sepia")):
            make_tiny_lora(root / "adapters" / name, checkpoint, seed=seed)
        config = root / "engine.toml"  # room for all four sets: nothing is unloaded during the runs
        config.write_text(f'[adapters]\ndir = "{root / "adapters"}"\nmax_loaded = 4\n')
        ports = ServerPorts(*free_ports(3))
        options = ServeOptions(cache_dir=root / "serve", checkpoint=checkpoint, config_file=config, ports=ports)
        repo, _ = prepare(options)
        loaded, third, cold = ("ink:0.8", "glow:0.5"), "sepia:0.7", "sepia:0.6"
        report: dict = {"steps": steps, "requests": requests, "in_flight": in_flight, "sets": [*loaded, third, cold]}
        with make_server(options, repo) as server:
            clients = _Clients(server.urls.grpc)
            try:
                for lora in (*loaded, third):  # load the warm runs' three sets
                    _send(clients, steps, (PROMPTS[0], 0, lora))
                warm_items = _stream((*loaded, third), requests)
                cold_items = _stream((*loaded, cold), requests)
                report["warm_1"] = _run(clients, warm_items, steps, in_flight, loaded)
                report["cold"] = _run(clients, cold_items, steps, in_flight, loaded)
                report["warm_2"] = _run(clients, warm_items, steps, in_flight, loaded)
                mismatched = 0
                for item, got in zip(cold_items, report["cold"]["_done"], strict=True):
                    prompt, seed, lora = item
                    alone = clients.get().generate(
                        prompt, GenerateOptions(seed=seed, steps=steps, lora=lora, cache_mode="bypass")
                    )
                    mismatched += int(not np.array_equal(alone.image, got["image"].image))
                report["cold_run_images_differing_from_single_request"] = mismatched
                report["unet_rows_per_execution_by_set_model"] = _rows_per_execution(server.urls.grpc)
            finally:
                clients.close()
    for name in ("warm_1", "cold", "warm_2"):
        report[name].pop("_done")
    warm_p99 = statistics.fmean(report[name]["loaded_sets_ms"]["p99"] for name in ("warm_1", "warm_2"))
    report["loaded_sets_p99_cold_over_warm"] = report["cold"]["loaded_sets_ms"]["p99"] / warm_p99
    report["warm_runs_p99_ratio"] = (
        report["warm_2"]["loaded_sets_ms"]["p99"] / report["warm_1"]["loaded_sets_ms"]["p99"]
    )
    return report


# --- LoRA-scale churn -------------------------------------------------------------------------------------------
# `python -m nirvana_dev.bench.lora_served churn`: does a client sending a stream of distinct LoRA scales (each a new
# adapter set: a fuse, a file, a model load) slow down everyone else? Two loaded sets and plain requests, `in_flight`
# at a time, timed in alternating runs without and with churn (`churners` clients sending new scales back to back,
# 2 steps each, the fewest allowed): quiet, churn, quiet, churn, quiet. Reported: p50/p99 of loaded-set and plain
# requests per run, the mean churn p99 over the mean quiet p99, the spread of the quiet runs (the noise floor), and
# what became of the churn requests (served, refused by the loader's bounds, failed otherwise).


def _http_get(url: str, timeout: float) -> Any:
    import requests as http

    return http.get(url, timeout=timeout)


def _churn_scales(names: tuple[str, ...], step: float = 0.05, rounds: int = 4) -> list[str]:
    """Every single-adapter set on the scale grid, again and again: with `max_loaded` far below their number, each
    is long unloaded when it comes round again, so each request is a load."""
    grid = [round(k * step, 2) for k in range(1, int(2.0 / step) + 1)]
    return [f"{name}:{scale}" for _ in range(rounds) for scale in grid for name in names]


def _timed_run(clients: _Clients, items: list, steps: int, in_flight: int) -> dict:
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        done = list(pool.map(lambda item: _send(clients, steps, item), items))
    report = {}
    for label, rows in (("loaded_sets", [d for d in done if d["lora"]]), ("plain", [d for d in done if not d["lora"]])):
        values = [d["ms"] for d in rows]
        report[f"{label}_ms"] = {"n": len(values), "p50": _percentile(values, 50), "p99": _percentile(values, 99)}
    report["loaded_sets_max_adapter_wait_ms"] = max(d["adapter_ms"] for d in done if d["lora"])
    return report


def _churn(url: str, scales: list[str], stop: threading.Event, outcomes: dict, lock: threading.Lock) -> None:
    from tritonclient.utils import InferenceServerException

    from nirvana_client import GenerateOptions, NirvanaClient

    client = NirvanaClient(url, "grpc")
    try:
        while not stop.is_set():
            with lock:
                if not scales:
                    return
                lora = scales.pop(0)
            start = time.perf_counter()
            try:
                client.generate("churn", GenerateOptions(seed=1, steps=2, cache_mode="bypass", lora=lora))
                kind = "served"
            except InferenceServerException as err:
                message = err.message() or ""
                kind = "refused" if ("max_pending_loads" in message or "load_wait_s" in message) else "failed"
                if kind == "failed":
                    outcomes.setdefault("failures", set()).add(message[:200])
            with lock:
                outcomes[kind] = outcomes.get(kind, 0) + 1
                outcomes["max_ms"] = max(outcomes.get("max_ms", 0.0), (time.perf_counter() - start) * 1e3)
    finally:
        client.close()


def run_lora_churn(
    checkpoint: Path | None,
    steps: int = 10,
    requests: int = 96,
    in_flight: int = 8,
    churners: int = 2,
    work_dir: Path | None = None,
    runs: int = 5,
    adapters_config: str = "max_loaded = 3\nmax_pending_loads = 2\nload_wait_s = 10\n",
) -> dict:
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare
    from nirvana_dev.tiny_addons import make_tiny_lora
    from nirvana_dev.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        for seed, name in enumerate(("ink", "glow", "sepia", "tint")):
            make_tiny_lora(root / "adapters" / name, checkpoint, seed=seed)
        config = root / "engine.toml"
        config.write_text(f'[adapters]\ndir = "{root / "adapters"}"\n{adapters_config}')
        ports = ServerPorts(*free_ports(3))
        options = ServeOptions(cache_dir=root / "serve", checkpoint=checkpoint, config_file=config, ports=ports)
        repo, _ = prepare(options)
        loaded = ("ink:0.8", "glow:0.5")
        # Loaded-set and plain requests interleaved: 2 of every 3 name a loaded set.
        items = [(PROMPTS[i % len(PROMPTS)], i, (loaded[i % 2] if i % 3 else "")) for i in range(requests)]
        report: dict = {"steps": steps, "requests": requests, "in_flight": in_flight, "churners": churners}
        report["adapters_config"] = adapters_config.strip().replace("\n", "; ")
        with make_server(options, repo) as server:
            clients = _Clients(server.urls.grpc)
            try:
                for lora in loaded:  # load both sets, and warm every orchestrator path once
                    _send(clients, steps, (PROMPTS[0], 0, lora))
                _timed_run(clients, items[: in_flight * 2], steps, in_flight)
                lock, outcomes = threading.Lock(), {}
                scales = _churn_scales(("sepia", "tint"))
                for run in range(runs):
                    if run % 2 == 0:
                        report[f"quiet_{run // 2 + 1}"] = _timed_run(clients, items, steps, in_flight)
                        continue
                    stop = threading.Event()
                    threads = [
                        threading.Thread(target=_churn, args=(server.urls.grpc, scales, stop, outcomes, lock))
                        for _ in range(churners)
                    ]
                    for thread in threads:
                        thread.start()
                    try:
                        report[f"churn_{run // 2 + 1}"] = _timed_run(clients, items, steps, in_flight)
                    finally:
                        stop.set()
                        for thread in threads:
                            thread.join(timeout=120)
                outcomes["failures"] = sorted(outcomes.get("failures", ()))
                report["churn_requests"] = outcomes
                metrics = _http_get(server.urls.metrics, timeout=10).text
                report["adapter_metrics"] = [
                    line
                    for line in metrics.splitlines()
                    if line.startswith("nirvana_adapter_") and "bucket" not in line
                ]
            finally:
                clients.close()
    quiet_runs = [name for name in report if name.startswith("quiet_")]
    churn_runs = [name for name in report if name.startswith("churn_") and name != "churn_requests"]
    for label in ("loaded_sets", "plain"):
        quiet = [report[run][f"{label}_ms"]["p99"] for run in quiet_runs]
        churn = [report[run][f"{label}_ms"]["p99"] for run in churn_runs]
        report[f"{label}_p99_churn_over_quiet"] = statistics.fmean(churn) / statistics.fmean(quiet)
        report[f"{label}_p99_quiet_max_over_min"] = max(quiet) / min(quiet)
    return report


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="LoRA-scale churn against loaded-set and plain requests")
    parser.add_argument("mode", choices=["churn"])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--churners", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="alternating quiet and churn runs, quiet first and last")
    parser.add_argument("--adapters-config", default="max_loaded = 3\nmax_pending_loads = 2\nload_wait_s = 10\n")
    args = parser.parse_args()
    result = run_lora_churn(
        args.checkpoint, args.steps, args.requests, args.in_flight, args.churners, None, args.runs, args.adapters_config
    )
    print(json.dumps(result, indent=2, default=str))
