"""`nirvana demo`: a shapes model trained here once (or a tiny random one, or yours) served by the real tritonserver,
a few prompts, misses and hits shown, and a contact sheet of each prompt's uncached and served images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEMO_PROMPTS = [
    "a red fox in the snow, photograph",
    "photo of a red fox in snow",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red fox in the snow, photograph",
]
# For a shapes model: a miss, a paraphrase, a one-attribute near miss, an unrelated scene, and a second scene with its
# paraphrase; each with the scene it asks for, so the model's judge can read the uncached image against it. Under the
# demo models' own encoders (8 and 12 min of training) the paraphrases sit at cosine 0.994-0.999 to their scene's
# first prompt, above the table's 0.99, and the near miss at 0.67-0.68; looser ones ("top-left corner: a little
# crimson disc, pale backdrop") fell to 0.975 after 12 minutes and missed.
_RED_CIRCLE = {"colour": "red", "shape": "circle", "size": "small", "position": "top left", "background": "white"}
_GREEN_TRIANGLE = {
    "colour": "green",
    "shape": "triangle",
    "size": "large",
    "position": "bottom right",
    "background": "gray",
}
SHAPES_DEMO = [
    ("a small red circle in the top left on a white background", _RED_CIRCLE),
    ("a little scarlet circle in the top-left corner on a pale background", _RED_CIRCLE),
    ("a small blue circle in the top left on a white background", {**_RED_CIRCLE, "colour": "blue"}),
    (
        "a large yellow square in the centre on a black background",
        {"colour": "yellow", "shape": "square", "size": "large", "position": "centre", "background": "black"},
    ),
    ("a large green triangle in the bottom right on a gray background", _GREEN_TRIANGLE),
    ("a large green wedge in the bottom right, gray backdrop", _GREEN_TRIANGLE),
]
SHAPES_DEMO_PROMPTS = [prompt for prompt, _ in SHAPES_DEMO]


def is_shapes_model(checkpoint: Path) -> bool:
    return (checkpoint / "judge").is_dir()  # `nirvana-quality train` and the demo's own training write its judge


def demo_prompts(checkpoint: Path) -> list[str]:
    """Shape prompts for a shapes model (it has a judge), else everyday ones."""
    return SHAPES_DEMO_PROMPTS if is_shapes_model(checkpoint) else DEMO_PROMPTS


def shapes_demo_model(cache_root: Path | None, minutes: float, say: Callable[[str], None] = print) -> Path:
    """The demo's shapes model: trained here the first time into ``cache_root`` (default ~/.cache/nirvana), then
    reused. A run stopped part-way resumes from its saved state."""
    import os

    root = cache_root or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nirvana"
    out = root / "shapes-demo-model"
    if (out / "model_index.json").exists() and is_shapes_model(out):
        say(f"using the shapes model trained earlier in {out}")
        return out
    from nirvana_dev.shapes.train import TrainConfig, train_model

    say(f"training the shapes model into {out}: {minutes:g} min plus about 2 for its data, once (reused after) ...")
    # v-prediction is what a CPU learns position with in minutes (docs/caching.md); a smaller pool than the research
    # recipe's 16,384 renders, since a few minutes see fewer samples than that anyway; a larger judge share, since
    # the judge's reading is what the demo reports.
    config = TrainConfig(minutes=minutes, prediction_type="v_prediction", pool_size=8192, judge_share=0.12)
    train_model(out, config)
    return out


def shapes_demo_config(work_dir: Path) -> Path:
    """The similarity -> K table the demo serves a shapes model with: ``s > 0.99 -> K = 16 of 20`` for the model's own
    text encoder (clip). Borrowed, not fitted to the demo's model: 8,000 pairs of a 27-minute CPU-trained shapes model
    put paraphrases at a median cosine 0.994 and its highest near miss at 0.9906 (docs/caching.md), so on the demo's
    shorter-trained model a near miss can still hit; `nirvana calibrate` fits a model's own table. The default table
    is the paper's, for real CLIP."""
    from nirvana.calibration.table import write_config

    return write_config(work_dir / "shapes-thresholds.toml", [(0.99, 16)], steps=20, embedder="clip")


def run_served_demo(
    work_dir: Path, checkpoint: Path, steps: int, config: Path | None, say: Callable[[str], None] = print
) -> Path:
    """Serve `checkpoint`, send the demo prompts over gRPC and HTTP in turn, save the images, `say` what happened;
    returns the contact sheet (prompt, uncached image, served image, K and similarity per row)."""
    from nirvana_dev.install import ServerPorts, free_ports
    from nirvana_dev.launch import ServeOptions, make_server, prepare

    options = ServeOptions(
        cache_dir=work_dir / "serve", checkpoint=checkpoint, ports=ServerPorts(*free_ports(3)), config_file=config
    )
    say("exporting the sub-models to ONNX and writing the Triton model repository ...")
    repo, _ = prepare(options)
    server = make_server(options, repo)
    say(f"starting tritonserver (log: {server.log_path}) ...")
    with server:
        rows = [
            _send(server.urls, i, prompt, steps, work_dir / "images", say)
            for i, prompt in enumerate(demo_prompts(checkpoint))
        ]
        say(_metrics_summary(server.urls.metrics))
    if is_shapes_model(checkpoint):
        say(judge_reading(checkpoint, [row.uncached for row in rows]))
    from nirvana_dev.demo_sheet import write_sheet

    sheet = write_sheet(rows, work_dir / "sheet.png")
    say(f"contact sheet (prompt, uncached, served, K, similarity): {sheet}")
    return sheet


def _send(urls, i: int, prompt: str, steps: int, images: Path, say: Callable[[str], None]):
    """One demo request over gRPC or HTTP (alternating), then the same request with the cache bypassed."""
    import numpy as np
    from PIL import Image

    from nirvana_client import GenerateOptions, NirvanaClient
    from nirvana_dev.demo_sheet import SheetRow

    protocol = "http" if i % 2 else "grpc"
    client = NirvanaClient(urls.http if protocol == "http" else urls.grpc, protocol)
    try:
        res = client.generate(prompt, GenerateOptions(seed=i, steps=steps))
        full = client.generate(prompt, GenerateOptions(seed=i, steps=steps, cache_mode="bypass"))
    finally:
        client.close()
    images.mkdir(parents=True, exist_ok=True)
    path = images / f"{i:03d}.png"
    Image.fromarray(res.image).save(path)
    if res.cache_hit:  # left: served from the cache; right: the same request computed in full
        Image.fromarray(np.concatenate([res.image, full.image], axis=1)).save(path.with_suffix(".hit.png"))
    row = SheetRow(prompt, full.image, res.image, res.cache_hit, res.skipped_steps, steps, res.similarity)
    hit = f"HIT, skipped {res.skipped_steps}/{steps} steps" if res.cache_hit else "miss"
    shown = path.with_suffix(".hit.png") if res.cache_hit else path
    say(f"\\[{protocol}] {prompt!r}: {hit}, similarity {row.similarity_text()}, {res.latency_ms:.0f} ms -> {shown}")
    return row


def judge_reading(checkpoint: Path, uncached: list) -> str:
    """What the shapes model's judge reads in the demo's uncached images, against the scenes their prompts ask for."""
    import numpy as np

    from nirvana_dev.shapes.judge import Judge, attribute_correct
    from nirvana_dev.shapes.scenes import Scene

    predicted = Judge.load(checkpoint / "judge").predict(np.stack(uncached))
    read = [attribute_correct(p, Scene(**scene)) for p, (_, scene) in zip(predicted, SHAPES_DEMO, strict=True)]
    right, total = sum(sum(r.values()) for r in read), sum(len(r) for r in read)
    return f"the judge reads {right} of {total} attributes ({100 * right / total:.0f}%) in the uncached images"


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
