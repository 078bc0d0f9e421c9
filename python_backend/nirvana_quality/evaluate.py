"""What a cache hit does to an image, measured: uncached vs cached generations of prompt pairs, judged.

For each :class:`~nirvana_quality.workload.Pair` (cached prompt A, new prompt B, one seed):

1. A is generated uncached with its state captured before every candidate step K (what admission stores);
2. B is generated uncached from the same x_T (same seed): the reference image;
3. B is generated from A's state at each K, stored as the latent store stores it (float16 by default) and reset
   for a new prompt (``ResumeState.for_new_prompt("reset")``), running steps K..N-1 with B's conditioning —
   exactly what the server does on a hit.

Every image is read back by the judge; cached images are compared with the uncached B image (SSIM, PSNR) and, for
near misses, checked for a *leak*: the judge reads A's value of the changed attribute. Pairs run in batches
(embeddings ``[uncond×B, cond×B]``, latents ``[B, ...]``); ``tests/quality/test_evaluate.py`` checks that a batch
gives the images one-by-one generation gives. The generation itself is ``nirvana.calibration.generate``, shared with
``nirvana calibrate --workload``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nirvana.calibration.generate import DEFAULT_KS, DEFAULT_STEPS, PairGenerator, PairImages, default_ks
from nirvana.calibration.generate import PairSettings as EvalSettings
from nirvana.calibration.table import record_accuracy
from nirvana.checkpoint import Checkpoint, load_checkpoint
from nirvana.embed import Embedder, make_embedder
from nirvana_dev.shapes.judge import Judge, attribute_correct
from nirvana_quality.metrics import psnr, ssim
from nirvana_quality.workload import Pair, make_pairs

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_PAIRS",
    "DEFAULT_STEPS",
    "SIMILARITY_BINS",
    "EvalSettings",
    "PairGenerator",
    "default_ks",
    "evaluate_pairs",
    "run_eval",
    "summarise",
]

# Per pair: A + B + 8 resumed runs ≈ 128 UNet steps at batch 16 (x2 for guidance). Measured on the shapes model's
# architecture, 2 CPU cores shared with other jobs: 1.6-2.3 s/pair, so 320 pairs take 9-12 minutes.
DEFAULT_PAIRS = 320
# Cosine-similarity bin edges per embedder; the last bin is closed, so a similarity of 1.0 lands in it. The shapes
# model's own text encoder puts paraphrases at a median 0.995 and near misses at 0.94, so its bins are finer at the top.
SIMILARITY_BINS = {
    "minilm": (-1.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0),
    "clip": (-1.0, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0),
}


def _judged(judge: Judge, images: np.ndarray, scenes: Sequence) -> list[dict]:
    return [
        {"pred": pred, "correct": attribute_correct(pred, scene)}
        for pred, scene in zip(judge.predict(images), scenes, strict=True)
    ]


def _leak(pair: Pair, pred: dict[str, str]) -> bool | None:
    """Near misses: does the judge read A's value of the changed attribute? None for other relations."""
    return None if pair.attribute is None else pred[pair.attribute] == pair.cached_value


def _batch_records(pairs: Sequence[Pair], images: PairImages, similarity: np.ndarray, judge: Judge) -> list[dict]:
    new_scenes = [p.new_scene for p in pairs]
    source = _judged(judge, images.cached_source, [p.cached_scene for p in pairs])
    uncached = _judged(judge, images.uncached, new_scenes)
    cached = {k: _judged(judge, batch, new_scenes) for k, batch in images.cached.items()}
    records = []
    for i, pair in enumerate(pairs):
        record = {**pair.to_dict(), "similarity": float(similarity[i]), "cached_source": source[i]}
        record["uncached"] = {**uncached[i], "leak": _leak(pair, uncached[i]["pred"])}
        record["cached"] = {}
        for k, judged in cached.items():
            value = psnr(images.cached[k][i], images.uncached[i])
            record["cached"][str(k)] = {
                **judged[i],
                "leak": _leak(pair, judged[i]["pred"]),
                "ssim": ssim(images.cached[k][i], images.uncached[i]),
                "psnr": None if math.isinf(value) else value,  # None: identical to the uncached image
            }
        records.append(record)
    return records


def evaluate_pairs(
    checkpoint: Checkpoint,
    judge: Judge,
    embedder: Embedder,
    pairs: Sequence[Pair],
    settings: EvalSettings,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """One record per pair (its fields, similarity, judged images, per-K SSIM/PSNR/leak); see module docstring.

    ``progress`` is called with the number of pairs finished after each batch.
    """
    generator = PairGenerator(checkpoint, settings)
    cached_vectors = embedder.embed([p.cached_prompt for p in pairs])
    new_vectors = embedder.embed([p.new_prompt for p in pairs])
    similarity = (cached_vectors * new_vectors).sum(axis=1)  # unit vectors: the cosine
    records: list[dict] = []
    for start in range(0, len(pairs), settings.batch_size):
        batch = pairs[start : start + settings.batch_size]
        images = generator.generate(
            [p.cached_prompt for p in batch], [p.new_prompt for p in batch], [p.seed for p in batch]
        )
        records += _batch_records(batch, images, similarity[start : start + len(batch)], judge)
        if progress is not None:
            progress(len(batch))
    return records


# --- report --------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _cell(records: Sequence[dict], k: int) -> dict:
    """Figures of the cached generations at ``k`` of ``records`` (and their uncached baseline)."""
    cached = [r["cached"][str(k)] for r in records]
    near = [(r["cached"][str(k)]["leak"], r["uncached"]["leak"]) for r in records if r["relation"] == "near_miss"]
    psnrs = [c["psnr"] for c in cached if c["psnr"] is not None]
    accuracy, uncached = (
        _mean([record_accuracy(c) for c in cached]),
        _mean([record_accuracy(r["uncached"]) for r in records]),
    )
    return {
        "k": k,
        "n": len(records),
        "accuracy": accuracy,
        "uncached_accuracy": uncached,
        "accuracy_drop": None if accuracy is None else uncached - accuracy,
        "exact_match": _mean([all(c["correct"].values()) for c in cached]),
        "ssim": _mean([c["ssim"] for c in cached]),
        "psnr_db": _mean(psnrs),  # over images not identical to the uncached one
        "identical_fraction": _mean([c["psnr"] is None for c in cached]),
        "n_near_miss": len(near),
        "leak_rate": _mean([bool(c["leak"]) for c in cached]),  # over all cached generations
        "leak_rate_near_miss": _mean([leak for leak, _ in near]),
        "uncached_leak_rate_near_miss": _mean([base for _, base in near]),  # the model's own confusions
    }


def _bin_of(similarity: float, edges: Sequence[float]) -> int:
    return min(max(int(np.searchsorted(edges, similarity, side="right")) - 1, 0), len(edges) - 2)


def summarise(
    records: Sequence[dict], settings: EvalSettings, bins: Sequence[float] = SIMILARITY_BINS["minilm"]
) -> dict:
    """The report: ``uncached_accuracy`` (+ exact match, per attribute), and per K and per K × similarity bin:
    accuracy (and its drop vs uncached on the same pairs), SSIM/PSNR vs uncached B, leak rates."""
    if not records:
        raise ValueError("no records to summarise")
    uncached = [r["uncached"] for r in records]
    attributes = list(uncached[0]["correct"])
    by_bin: dict[int, list[dict]] = {}
    for r in records:
        by_bin.setdefault(_bin_of(r["similarity"], bins), []).append(r)
    relations = sorted({r["relation"] for r in records})
    return {
        "settings": {**asdict(settings), "ks": list(settings.ks), "pairs": len(records)},
        "counts": {rel: sum(r["relation"] == rel for r in records) for rel in relations},
        "uncached_accuracy": _mean([record_accuracy(u) for u in uncached]),
        "uncached_exact_match": _mean([all(u["correct"].values()) for u in uncached]),
        "uncached_accuracy_by_attribute": {a: _mean([u["correct"][a] for u in uncached]) for a in attributes},
        "cached_source_accuracy": _mean([record_accuracy(r["cached_source"]) for r in records]),
        "similarity_by_relation": {
            rel: dict(
                zip(
                    ("min", "median", "max"),
                    np.percentile([r["similarity"] for r in records if r["relation"] == rel], [0, 50, 100])
                    .round(4)
                    .tolist(),
                    strict=True,
                )
            )
            for rel in relations
        },
        "similarity_bins": list(bins),
        "by_k": [_cell(records, k) for k in settings.ks],
        "by_k_and_bin": [
            {"bin": [bins[b], bins[b + 1]], **_cell(by_bin[b], k)} for k in settings.ks for b in sorted(by_bin)
        ],
    }


def run_eval(
    checkpoint_dir: str | Path,
    *,
    pairs: int = DEFAULT_PAIRS,
    seed: int = 0,
    settings: EvalSettings | None = None,
    judge: Judge | None = None,
    embedder: Embedder | None = None,
    embedder_name: str = "minilm",
    progress: bool = True,
) -> dict:
    """Load the checkpoint (and its ``judge/`` unless one is given), evaluate ``make_pairs(pairs, seed)``.

    Returns ``{"report": summarise(...) + timing, "records": [...]}``, the layout ``nirvana-quality eval --json``
    writes and ``nirvana calibrate --eval-json`` reads.
    """
    settings = settings or EvalSettings()
    checkpoint = load_checkpoint(checkpoint_dir)
    judge = judge or Judge.load(Path(checkpoint_dir) / "judge")
    embedder = embedder or make_embedder(embedder_name, checkpoint)  # "clip": the evaluated model's own encoder
    workload = make_pairs(pairs, seed=seed)
    started = time.perf_counter()
    with tqdm(total=len(workload), desc="eval", unit="pair", disable=not progress) as bar:
        records = evaluate_pairs(checkpoint, judge, embedder, workload, settings, progress=bar.update)
    report = summarise(records, settings, SIMILARITY_BINS.get(embedder.name, SIMILARITY_BINS["minilm"]))
    report["settings"].update(workload_seed=seed, embedder=embedder.name, checkpoint=str(checkpoint_dir))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return {"report": report, "records": records}
