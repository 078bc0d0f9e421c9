"""`nirvana demo`: a tiny model (or yours) served by the real tritonserver, a few prompts, misses and hits shown."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEMO_PROMPTS = [
    "a red fox in the snow, photograph",
    "photo of a red fox in snow",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red fox in the snow, photograph",
]
# For a shapes model (`nirvana-quality train`): a miss, a paraphrase, a one-attribute near miss, an unrelated scene.
SHAPES_DEMO_PROMPTS = [
    "a small red circle in the top left on a white background",
    "top-left corner: a little crimson disc, pale backdrop",
    "a small blue circle in the top left on a white background",
    "a large yellow square in the centre on a black background",
]


def demo_prompts(checkpoint: Path) -> list[str]:
    """Shape prompts for a shapes model (it has a judge), else everyday ones."""
    return SHAPES_DEMO_PROMPTS if (checkpoint / "judge").is_dir() else DEMO_PROMPTS


def run_served_demo(
    work_dir: Path, checkpoint: Path, steps: int, config: Path | None, say: Callable[[str], None] = print
) -> None:
    """Serve `checkpoint`, send the demo prompts over gRPC and HTTP in turn, save the images, `say` what happened."""
    import numpy as np
    from PIL import Image

    from nirvana_client import GenerateOptions, NirvanaClient
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare

    options = ServeOptions(
        cache_dir=work_dir / "serve", checkpoint=checkpoint, ports=ServerPorts(*free_ports(3)), config_file=config
    )
    say("exporting the sub-models to ONNX and writing the Triton model repository ...")
    repo, _ = prepare(options)
    server = make_server(options, repo)
    say(f"starting tritonserver (log: {server.log_path}) ...")
    (work_dir / "images").mkdir(parents=True, exist_ok=True)
    with server:
        for i, prompt in enumerate(demo_prompts(checkpoint)):
            protocol = "http" if i % 2 else "grpc"
            client = NirvanaClient(server.urls.http if protocol == "http" else server.urls.grpc, protocol)
            res = client.generate(prompt, GenerateOptions(seed=i, steps=steps))
            path = work_dir / "images" / f"{i:03d}.png"
            Image.fromarray(res.image).save(path)
            if res.cache_hit:  # left: served from the cache; right: the same request computed in full
                full = client.generate(prompt, GenerateOptions(seed=i, steps=steps, cache_mode="bypass"))
                Image.fromarray(np.concatenate([res.image, full.image], axis=1)).save(path.with_suffix(".hit.png"))
            client.close()
            hit = f"HIT, skipped {res.skipped_steps}/{steps} steps" if res.cache_hit else "miss"
            sim = "-" if res.similarity != res.similarity else f"{res.similarity:.3f}"
            shown = path.with_suffix(".hit.png") if res.cache_hit else path
            say(f"\\[{protocol}] {prompt!r}: {hit}, similarity {sim}, {res.latency_ms:.0f} ms -> {shown}")
        say(_metrics_summary(server.urls.metrics))


def _metrics_summary(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    wanted = (
        "nirvana_cache_hits_total",
        "nirvana_cache_misses_total",
        "nirvana_skipped_steps_total",
        "nirvana_unet_steps_total",
        "nirvana_cache_entries",
    )
    return "metrics: " + ", ".join(line for line in lines if line.startswith(wanted))
