"""`nirvana-quality latents`: what a latent codec (`cache.latent_dtype`) costs in bytes and in the images resumed from
it, against float16, on the same pairs.

For each pair of the quality workload (`nirvana_quality.workload.make_pairs`: cached prompt A, new prompt B, a seed)
A is generated with its state captured at each K, and B is resumed from that state twice — the latent stored as
float16 and stored under the codec — exactly as a hit resumes (`nirvana.calibration.generate.PairGenerator`). The
two images of each (pair, K) are compared in grey levels (0–255, every channel of every pixel); with the
checkpoint's judge (``<checkpoint>/judge``, the shapes model) both sets are also judged. Bytes per entry are those of
A's captured states at each K, as the latent store writes them (`LatentStore.encoded_size`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from nirvana.calibration.generate import PairGenerator, PairSettings
from nirvana.calibration.table import record_accuracy
from nirvana.checkpoint import load_checkpoint
from nirvana_dev.shapes.judge import Judge
from nirvana_quality.evaluate import _judged
from nirvana_quality.workload import make_pairs

__all__ = ["run_latents"]


def _entry_bytes(generator: PairGenerator, pairs: list, codecs: tuple[str, ...], root: Path) -> dict[str, float]:
    """Mean bytes of a stored captured state (latent and scheduler state) per codec, over ``pairs``' A states."""
    from nirvana.cache.latents import LatentStore

    seeds = [p.seed for p in pairs]
    source = generator._denoise(
        generator._embeddings([p.cached_prompt for p in pairs]),
        seeds,
        latent=generator.x_t(seeds),
        capture_at=generator.settings.ks,
    )
    stores = {codec: LatentStore(root / codec, dtype=codec) for codec in codecs}
    sizes: dict[str, list[int]] = {codec: [] for codec in codecs}
    for state in source.captured.values():
        for row in range(len(pairs)):
            arrays = state.to_arrays()  # latent and model outputs [B, ...]; the counts and generator state shared
            tensors = {n: a[row : row + 1] if _per_row(n) else a for n, a in arrays.items()}
            for codec, store in stores.items():
                sizes[codec].append(store.encoded_size(tensors, {"k": state.step}))
    return {codec: float(np.mean(values)) for codec, values in sizes.items()}


def _per_row(name: str) -> bool:
    return name == "latent" or name.startswith("model_output_")


def run_latents(
    checkpoint_dir: Path, codec: str, pairs: int, steps: int, ks: tuple[int, ...], seed: int, work_dir: Path
) -> dict:
    checkpoint = load_checkpoint(checkpoint_dir)
    workload = make_pairs(pairs, seed=seed)
    base = PairSettings(steps=steps, ks=ks, latent_dtype="float16")
    generators = {name: PairGenerator(checkpoint, replace(base, latent_dtype=name)) for name in ("float16", codec)}
    judge = _judge(checkpoint_dir)
    started = time.perf_counter()
    diffs: dict[int, list[np.ndarray]] = {k: [] for k in base.ks}
    judged: dict[str, list[float]] = {"float16": [], codec: []}
    for start in range(0, len(workload), base.batch_size):
        batch = workload[start : start + base.batch_size]
        prompts = ([p.cached_prompt for p in batch], [p.new_prompt for p in batch], [p.seed for p in batch])
        images = {name: generator.generate(*prompts) for name, generator in generators.items()}
        for k in base.ks:
            diffs[k].append(np.abs(images["float16"].cached[k].astype(int) - images[codec].cached[k].astype(int)))
            for name in judged:
                judged[name] += _accuracy(judge, batch, images[name].cached[k]) if judge is not None else []
    per_k = {
        str(k): {"max_grey_diff": int(np.concatenate(d).max()), "mean_grey_diff": float(np.concatenate(d).mean())}
        for k, d in diffs.items()
    }
    every = np.concatenate([np.concatenate(d) for d in diffs.values()])
    report = {
        "checkpoint": str(checkpoint_dir),
        "codec": codec,
        "pairs": len(workload),
        "steps": steps,
        "ks": list(base.ks),
        "seconds": round(time.perf_counter() - started, 1),
        "max_grey_diff": int(every.max()),
        "mean_grey_diff": float(every.mean()),
        # A hard edge that moves by a pixel makes a large maximum: how many values moved visibly says more.
        "share_over_8_grey_levels": float((every > 8).mean()),
        "identical_image_fraction": float(np.mean([(d == 0).all() for ds in diffs.values() for b in ds for d in b])),
        "per_k": per_k,
        "entry_bytes": _entry_bytes(generators["float16"], workload[: base.batch_size], ("float16", codec), work_dir),
    }
    if judge is not None:
        report["judge_accuracy"] = {name: float(np.mean(values)) for name, values in judged.items()}
        report["judge_accuracy_drop"] = report["judge_accuracy"]["float16"] - report["judge_accuracy"][codec]
    return report


def _judge(checkpoint_dir: Path) -> Judge | None:
    return Judge.load(checkpoint_dir / "judge") if (checkpoint_dir / "judge").is_dir() else None


def _accuracy(judge: Judge, batch: list, images: np.ndarray) -> list[float]:
    """Per image: the share of B's attributes the judge reads back (`nirvana.calibration.table.record_accuracy`)."""
    return [record_accuracy(judged) for judged in _judged(judge, images, [p.new_scene for p in batch])]
