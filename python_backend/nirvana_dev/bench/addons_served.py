"""`nirvana bench addons --served`: what a ControlNet costs per step through the real server, measured in one run.

A random ControlNet (and LoRA adapter) made for the checkpoint (`nirvana_dev.tiny_addons`); CACHE_MODE=bypass, so
every request runs all N steps. One request at a time: the server's UNet ms per step (the denoising loop, with the
``controlnet_<name>`` model's call per step where there is one) plain, with the ControlNet, and with the ControlNet
and a fused adapter set. Then ``--in-flight`` requests at once, half plain, half controlled, each with its own
control image and scale: their UNet ms per step, and rows per execution of the ``unet_control`` and ControlNet
models from Triton's statistics (> 2 rows: requests with different control images shared an execution), and how
long the first request for a new adapter set waited while its model was fused and loaded.
"""

from __future__ import annotations

import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nirvana_dev.bench.lora_served import _Clients
from nirvana_dev.bench.serving import PROMPTS

MODELS = ("unet", "unet_control", "controlnet_edges")


def _control_image(size: tuple[int, int], seed: int) -> np.ndarray:
    """White strokes on black at the image size: an edge map, different for each seed."""
    image = np.zeros((*size, 3), np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(8):
        row, col = rng.integers(0, max(1, size[0] - size[0] // 8), 2)
        image[row : row + size[0] // 8, col : col + 2] = 255
    return image


def _step_ms(clients: _Clients, steps: int, seed: int, **options: object) -> float:
    from nirvana_client import GenerateOptions

    result = clients.get().generate(
        PROMPTS[seed % len(PROMPTS)], GenerateOptions(seed=seed, steps=steps, cache_mode="bypass", **options)
    )
    return result.server_timings_ms["unet_ms"] / steps


def _median_step_ms(clients: _Clients, steps: int, repeats: int, **options: object) -> float:
    _step_ms(clients, steps, 0, **options)  # warm-up (and the adapter set's load)
    return statistics.median(_step_ms(clients, steps, seed, **options) for seed in range(1, repeats + 1))


def _counts(url: str) -> dict[str, tuple[int, int]]:
    import tritonclient.grpc as grpcclient

    triton = grpcclient.InferenceServerClient(url)
    try:
        stats = triton.get_inference_statistics(as_json=True)["model_stats"]
    finally:
        triton.close()
    return {s["name"]: (int(s.get("inference_count", 0)), int(s.get("execution_count", 0))) for s in stats}


def _concurrent(clients: _Clients, steps: int, requests: int, in_flight: int, size: tuple[int, int]) -> dict:
    def one(i: int) -> tuple[bool, float]:
        controlled = i % 2 == 1
        options = {"controlnet": "edges", "control_image": _control_image(size, i), "controlnet_scale": 0.5 + i % 3 / 2}
        return controlled, _step_ms(clients, steps, i, **(options if controlled else {}))

    before = _counts(clients.url)
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        done = list(pool.map(one, range(requests)))
    after = _counts(clients.url)
    rows = {}
    for name in MODELS:
        inferences = after.get(name, (0, 0))[0] - before.get(name, (0, 0))[0]
        executions = after.get(name, (0, 0))[1] - before.get(name, (0, 0))[1]
        rows[name] = round(inferences / max(1, executions), 2)
    return {
        "plain_unet_ms_per_step": statistics.median(ms for controlled, ms in done if not controlled),
        "controlnet_unet_ms_per_step": statistics.median(ms for controlled, ms in done if controlled),
        "rows_per_execution": rows,
    }


def _adapter_load_ms(clients: _Clients, steps: int) -> float:
    """How long the first request for a new adapter set waited for its model (fused and loaded for it)."""
    from nirvana_client import GenerateOptions

    options = GenerateOptions(seed=0, steps=steps, cache_mode="bypass", lora="ink:0.3")
    return clients.get().generate(PROMPTS[0], options).server_timings_ms["adapter_ms"]


def run_addons_served(
    checkpoint: Path | None, steps: int, repeats: int, in_flight: int, work_dir: Path | None, profile: str = "cpu"
) -> dict:
    from nirvana.checkpoint import load_checkpoint_info
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare
    from nirvana_dev.tiny_addons import make_tiny_controlnet, make_tiny_lora
    from nirvana_dev.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        make_tiny_lora(root / "adapters" / "ink", checkpoint)
        make_tiny_controlnet(root / "controlnets" / "edges", checkpoint)
        config = root / "engine.toml"
        config.write_text(f'[adapters]\ndir = "{root / "adapters"}"\n\n[controlnets]\ndir = "{root / "controlnets"}"\n')
        ports = ServerPorts(*free_ports(3))
        options = ServeOptions(
            cache_dir=root / "serve", checkpoint=checkpoint, config_file=config, ports=ports, profile=profile
        )
        repo, _ = prepare(options)
        size = load_checkpoint_info(checkpoint).image_size
        control = {"controlnet": "edges", "control_image": _control_image(size, 0)}
        report: dict = {"profile": profile, "steps": steps, "repeats": repeats, "in_flight": in_flight}
        report["one_at_a_time"] = {}
        with make_server(options, repo) as server:
            clients = _Clients(server.urls.grpc)
            try:
                alone = report["one_at_a_time"]
                alone["plain_unet_ms_per_step"] = _median_step_ms(clients, steps, repeats)
                alone["controlnet_unet_ms_per_step"] = _median_step_ms(clients, steps, repeats, **control)
                alone["controlnet_lora_unet_ms_per_step"] = _median_step_ms(
                    clients, steps, repeats, lora="ink:0.8", **control
                )
                report["concurrent"] = _concurrent(clients, steps, 2 * in_flight, in_flight, size)
                report["adapter_load_ms"] = _adapter_load_ms(clients, steps)
            finally:
                clients.close()
    alone = report["one_at_a_time"]
    alone["controlnet_cost_ms_per_step"] = alone["controlnet_unet_ms_per_step"] - alone["plain_unet_ms_per_step"]
    alone["controlnet_cost_ratio"] = alone["controlnet_unet_ms_per_step"] / alone["plain_unet_ms_per_step"]
    return report
