"""`nirvana bench serving`: what serving through Triton costs over calling the pipeline in-process.

Same prompts, seeds and step count, CACHE_MODE=bypass everywhere (so every request does the same work), one run:
in-process with torch sub-models, in-process with the exported ONNX files (the runtime the CPU repository serves),
and through the real tritonserver over gRPC and HTTP. The Triton-vs-in-process(ONNX) ratio is the serving overhead.
Over gRPC also the streaming model: time to its first event and what previews cost per step.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

from nirvana.config import load_config
from nirvana.pipeline import Pipeline

PROMPTS = [f"a {c} {s} in the {p}" for c, s, p in zip(
    ["red", "blue", "green", "golden", "silver", "purple"] * 4,
    ["fox", "lighthouse", "robot", "dragon", "sailboat", "castle"] * 4,
    ["snow", "rain", "desert", "forest", "city", "mountains"] * 4,
    strict=True,
)]  # fmt: skip


def _median_ms(fn, prompts: list[str], steps: int) -> float:
    fn(prompts[0], 0, steps)  # warm-up
    times = []
    for seed, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        fn(prompt, seed, steps)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _stream_figures(client, prompts: list[str], steps: int) -> dict:
    """The streaming model, previews off and on alternately: median time to the first event (the cache's answer)
    and between progress events; their difference is what a preview costs per step."""
    from nirvana_client import GenerateOptions
    from nirvana_client.stream import generate_stream

    first: dict[int, list[float]] = {0: [], 1: []}
    gaps: dict[int, list[float]] = {0: [], 1: []}
    generate_stream(client, prompts[0], GenerateOptions(seed=0, steps=steps, cache_mode="bypass"))  # warm-up
    for seed, prompt in enumerate(prompts):
        for every in (0, 1):
            options = GenerateOptions(seed=seed, steps=steps, cache_mode="bypass")
            _, events = generate_stream(client, prompt, options, preview_every=every)
            first[every].append(events[0].elapsed_ms)
            t = [e.elapsed_ms for e in events if e.event == "progress"]
            gaps[every].extend(b - a for a, b in itertools.pairwise(t))
    step_ms = {every: statistics.median(g) for every, g in gaps.items()}
    return {
        "first_event_ms": statistics.median(first[0]),
        "first_event_ms_with_previews": statistics.median(first[1]),
        "step_ms": step_ms[0],
        "step_ms_with_previews": step_ms[1],
        "preview_cost_ms_per_step": step_ms[1] - step_ms[0],
    }


def run_serving(checkpoint: Path | None, requests: int, steps: int, work_dir: Path | None) -> dict:
    from nirvana.checkpoint import load_checkpoint
    from nirvana.runtime.onnx_runtime import OnnxSubModels
    from nirvana_client import GenerateOptions, NirvanaClient
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare
    from nirvana_dev.tiny_model import make_tiny_model

    prompts = (PROMPTS * (requests // len(PROMPTS) + 1))[:requests]
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        options = ServeOptions(cache_dir=root / "serve", checkpoint=checkpoint, ports=ServerPorts(*free_ports(3)))
        repo, _ = prepare(options)
        report = {"requests": requests, "steps": steps, "median_ms": {}}
        ckpt = load_checkpoint(checkpoint)
        config = load_config({"checkpoint": str(checkpoint), "cache": {"dir": str(root / "local")}})
        onnx = OnnxSubModels(repo, fingerprint=ckpt.fingerprint, version="1")
        for name, models in (("in_process_torch", None), ("in_process_onnx", onnx)):
            pipe = Pipeline(config, checkpoint=ckpt, models=models)
            gen = lambda p, s, n, pipe=pipe: pipe.generate(p, seed=s, steps=n, cache_mode="bypass")  # noqa: E731
            report["median_ms"][name] = _median_ms(gen, prompts, steps)
            pipe.close()
        server = make_server(options, repo)
        with server:
            for protocol, url in (("grpc", server.urls.grpc), ("http", server.urls.http)):
                client = NirvanaClient(url, protocol)

                def remote(prompt: str, seed: int, n: int, client: NirvanaClient = client) -> object:
                    return client.generate(prompt, GenerateOptions(seed=seed, steps=n, cache_mode="bypass"))

                report["median_ms"][f"triton_{protocol}"] = _median_ms(remote, prompts, steps)
                if protocol == "grpc":
                    report["stream"] = _stream_figures(client, prompts, steps)
                client.close()
    med = report["median_ms"]
    report["triton_over_in_process_onnx"] = {p: med[f"triton_{p}"] / med["in_process_onnx"] for p in ("grpc", "http")}
    report["serving_overhead_ms"] = {p: med[f"triton_{p}"] - med["in_process_onnx"] for p in ("grpc", "http")}
    return report
