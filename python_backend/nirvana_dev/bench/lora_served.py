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
