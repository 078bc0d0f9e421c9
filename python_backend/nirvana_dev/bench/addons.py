"""`nirvana bench addons`: what LoRA adapters and a ControlNet cost in-process, measured in one run.

Random adapters and a ControlNet made for the checkpoint (`nirvana_dev.tiny_addons`); CACHE_MODE=bypass so every
request runs all N steps. Reports the time to merge an adapter set (the first request naming it waits that long;
requests for merged sets do not) and the UNet ms per step plain, with a fused adapter set, and with a ControlNet.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np

PROMPT = "a red fox in the snow, photograph"


def _step_ms(pipe, steps: int, repeats: int, **options: object) -> float:
    pipe.generate(PROMPT, steps=steps, cache_mode="bypass", **options)  # warm-up (and the merge, for adapters)
    per_step = []
    for seed in range(repeats):
        result = pipe.generate(PROMPT, seed=seed, steps=steps, cache_mode="bypass", **options)
        per_step.append(result.timings_ms["unet_ms"] / steps)
    return statistics.median(per_step)


def run_addons(checkpoint: Path | None, steps: int, repeats: int, work_dir: Path | None) -> dict:
    from nirvana.config import load_config
    from nirvana.pipeline import Pipeline
    from nirvana_dev.tiny_addons import make_tiny_controlnet, make_tiny_lora
    from nirvana_dev.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        checkpoint = checkpoint or make_tiny_model(root / "tiny-model")
        for seed, name in enumerate(("ink", "glow", "sepia")):
            make_tiny_lora(root / "adapters" / name, checkpoint, seed=seed)
        make_tiny_controlnet(root / "controlnets" / "edges", checkpoint)
        config = load_config(
            {
                "checkpoint": str(checkpoint),
                "cache": {"dir": str(root / "cache")},
                "adapters": {"dir": str(root / "adapters"), "max_loaded": 2},
                "controlnets": {"dir": str(root / "controlnets")},
            }
        )
        pipe = Pipeline(config)
        try:
            size = pipe.checkpoint.image_size
            edges = np.zeros((*size, 3), np.uint8)
            edges[size[0] // 4 : size[0] // 2, size[1] // 4 :: 4] = 255
            report = {"steps": steps, "repeats": repeats, "unet_ms_per_step": {}}
            report["unet_ms_per_step"]["plain"] = _step_ms(pipe, steps, repeats)
            report["unet_ms_per_step"]["lora_fused"] = _step_ms(pipe, steps, repeats, lora="ink:0.8,glow:0.5")
            report["unet_ms_per_step"]["controlnet"] = _step_ms(
                pipe, steps, repeats, controlnet="edges", control_image=edges
            )
            for lora in ("sepia", "ink:0.8,glow:0.5", "glow"):  # a new set, a loaded one, a new one (LRU of 2)
                pipe.generate(PROMPT, steps=steps, cache_mode="bypass", lora=lora)
            report["adapter_merge_s"] = pipe.addons.adapters.load_seconds  # type: ignore[union-attr]
        finally:
            pipe.close()
    plain = report["unet_ms_per_step"]["plain"]
    report["controlnet_cost_ms_per_step"] = report["unet_ms_per_step"]["controlnet"] - plain
    report["lora_cost_ms_per_step"] = report["unet_ms_per_step"]["lora_fused"] - plain
    return report
