"""Fit the similarity → K table from evaluation records, check it on held-out pairs, write it as server config.

**The budget.** A request served from the cache at K must stay within ``max_accuracy_drop`` (1 percentage point)
of the uncached attribute accuracy *on the same prompts and seeds*, and its cache-attributable leak rate must stay
within ``max_leak_rate`` (1%). A leak is cache-attributable when the cached image shows A's value of the changed
attribute while the uncached image of B (same seed) does not: the model's own confusions (red read as orange) are
not the cache's doing and are reported apart. The leak rate is taken over the band's near misses, the only pairs
that can leak, so it does not depend on how many paraphrases the workload mixes in.

**The fit** (greedy from the top). Calibration pairs are sorted by similarity, highest first. For each candidate K,
largest first, the band grows downwards from the highest unassigned similarity, pair by pair; once it holds
``min_count`` pairs it is checked against the budget after every pair, and growth stops at the first check that
fails. If the band reached ``min_count`` and passed at least once, its lowest similarity sets the threshold for K
and the next (smaller) K continues below it; otherwise K is rejected (recorded with the failing figures) and the
next K tries the same pairs. Pairs below the last band miss.

**Bounds, not point estimates.** A band is checked against the budget at the one-sided 95% *upper bound* of each
figure (:mod:`nirvana.calibration.bounds`): Wilson's for the leak rate over its near misses, a seeded bootstrap of the
mean per-pair accuracy drop. With no leak observed, a 1% leak budget therefore needs 268 near misses in the band; a
band that is short of evidence is rejected with ``pairs_needed``, the sample size at which its bounds would fit if
further pairs behaved like these. A band also needs ``min_count`` pairs (default 20), growth stops at the first
failure instead of looking past it for a band that averages out, and thresholds sit just below the lowest admitted
similarity instead of midway to the next pair.

**The records** are what ``nirvana-quality eval --json`` writes (the research package ``nirvana_quality``, which
this module does not import): ``{"report": {"settings": {"steps", "ks", "embedder", ...}}, "records": [...]}``,
each record holding ``relation`` (``paraphrase``, ``near_miss`` or ``unrelated``), ``split`` (``calibration`` or
``heldout``), ``similarity``, ``cached_prompt``, ``new_prompt``, and judged images ``uncached`` and
``cached[str(K)]`` with ``correct`` (attribute -> bool) and ``leak`` (bool, or None when the pair cannot leak).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nirvana.calibration.bounds import bootstrap_upper, leak_pairs_needed, mean_pairs_needed, wilson_upper
from nirvana.calibration.fit import band_threshold
from nirvana.k_choice import KSelector

if TYPE_CHECKING:  # only the embedder passed in runs torch: fitting and config writing stay numpy-only
    from nirvana.embed import Embedder

__all__ = [
    "Budget",
    "CalibrationError",
    "apply_thresholds",
    "calibrate",
    "fit_thresholds",
    "record_accuracy",
    "rescore",
    "steps_saved",
    "write_config",
]

# Below this uncached accuracy the judge sees too little of what a generation shows to tell what the cache changes.
MIN_TRUSTED_ACCURACY = 0.8


class CalibrationError(ValueError):
    """The evaluation records cannot be calibrated (missing split, K or fields); the message says which."""


@dataclass(frozen=True)
class Budget:
    """Quality budget per band: accuracy drop and cache-attributable leak rate (fractions), minimum pairs."""

    max_accuracy_drop: float = 0.01
    max_leak_rate: float = 0.01
    min_count: int = 20

    def __post_init__(self) -> None:
        if not (0 <= self.max_accuracy_drop <= 1 and 0 <= self.max_leak_rate <= 1):
            raise ValueError(f"budget fractions must be in [0, 1], got {self.max_accuracy_drop}, {self.max_leak_rate}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")


def record_accuracy(judged: dict) -> float:
    """Mean per-attribute accuracy of one judged image (``judged["correct"]`` maps attribute -> bool)."""
    return float(np.mean(list(judged["correct"].values())))


def _cache_leak(record: dict, k: int) -> bool:
    return bool(record["cached"][str(k)]["leak"]) and not record["uncached"]["leak"]


def band_figures(records: Sequence[dict], k: int) -> dict:
    """Accuracy (cached at ``k`` and uncached), drop, near-miss count and leak rates of ``records`` at ``k``, with
    the one-sided 95% upper bounds of drop and leak rate that :func:`fit_thresholds` holds to the budget."""
    drops = [record_accuracy(r["uncached"]) - record_accuracy(r["cached"][str(k)]) for r in records]
    cached = float(np.mean([record_accuracy(r["cached"][str(k)]) for r in records]))
    uncached = float(np.mean([record_accuracy(r["uncached"]) for r in records]))
    near = [r for r in records if r["relation"] == "near_miss"]
    leaks = sum(_cache_leak(r, k) for r in near)
    return {
        "k": k,
        "n": len(records),
        "similarity": [float(min(r["similarity"] for r in records)), float(max(r["similarity"] for r in records))],
        "accuracy": cached,
        "uncached_accuracy": uncached,
        "accuracy_drop": uncached - cached,
        "accuracy_drop_upper95": bootstrap_upper(drops),
        "n_near_miss": len(near),
        "leaks": leaks,
        "leak_rate": leaks / len(near) if near else 0.0,
        "leak_rate_upper95": wilson_upper(leaks, len(near)),
        "raw_leak_rate": float(np.mean([bool(r["cached"][str(k)]["leak"]) for r in near])) if near else 0.0,
    }


def _within(figures: dict, budget: Budget) -> bool:
    """Both upper bounds within budget (a band without near misses cannot leak)."""
    leak_upper = figures["leak_rate_upper95"] or 0.0
    # A tiny tolerance so that a drop of exactly the budget (e.g. 1/100) is not lost to float rounding.
    return figures["accuracy_drop_upper95"] <= budget.max_accuracy_drop + 1e-12 and leak_upper <= (
        budget.max_leak_rate + 1e-12
    )


def pairs_needed(records: Sequence[dict], k: int, budget: Budget) -> dict:
    """Pairs (and near misses) a band needs before its upper bounds could fit ``budget``, if more pairs behaved like
    ``records``; None where the observed figure itself is over budget (more pairs of the same kind never help)."""
    drops = [record_accuracy(r["uncached"]) - record_accuracy(r["cached"][str(k)]) for r in records]
    near = [r for r in records if r["relation"] == "near_miss"]
    leaks = sum(_cache_leak(r, k) for r in near)
    return {
        "pairs": mean_pairs_needed(drops, budget.max_accuracy_drop + 1e-12),
        "near_misses": leak_pairs_needed(leaks, len(near), budget.max_leak_rate) if near else None,
    }


def _grow(rows: Sequence[dict], pos: int, k: int, budget: Budget) -> tuple[int | None, dict | None]:
    """End (exclusive) of the longest admissible band from ``pos`` at ``k``, and the figures that stopped it."""
    best, failed = None, None
    for end in range(pos + budget.min_count, len(rows) + 1):
        if end < len(rows) and rows[end]["similarity"] == rows[end - 1]["similarity"]:
            continue  # a threshold cannot separate equal similarities
        figures = band_figures(rows[pos:end], k)
        if not _within(figures, budget):
            failed = figures
            break
        best = end
    return best, failed


def fit_thresholds(records: Sequence[dict], ks: Sequence[int], budget: Budget = Budget()) -> dict:
    """Fit ``thresholds`` ((similarity, K) pairs, both strictly decreasing) on ``records`` (see module docstring).

    Returns ``{"thresholds": [...], "bands": [figures of each admitted band], "rejected": [...]}``; each rejected
    entry has the K, a ``reason`` and, when a check failed, the failing band's figures (an admitted band's
    ``stopped_by`` holds the figures of the first larger band that failed).
    """
    rows = sorted(records, key=lambda r: -r["similarity"])
    thresholds: list[tuple[float, int]] = []
    bands: list[dict] = []
    rejected: list[dict] = []
    pos = 0
    for k in sorted(ks, reverse=True):
        if len(rows) - pos < budget.min_count:
            rejected.append({"k": k, "reason": f"fewer than min_count={budget.min_count} pairs left"})
            continue
        end, failed = _grow(rows, pos, k, budget)
        if end is None:
            entry = {"k": k, "reason": "over budget" if failed else "no admissible band", **(failed or {})}
            if failed:
                band = rows[pos : pos + failed["n"]]
                entry["pairs_needed"] = pairs_needed(band, k, budget)
            rejected.append(entry)
            continue
        threshold = band_threshold(rows, end)
        thresholds.append((threshold, k))
        # stopped_by: the first larger band that failed (None when the band ran out of pairs)
        bands.append({**band_figures(rows[pos:end], k), "threshold": threshold, "stopped_by": failed})
        pos = end
    return {"thresholds": thresholds, "bands": bands, "rejected": rejected}


def _choose(selector: KSelector | None, similarity: float, ks: Sequence[int], steps: int) -> int:
    if selector is None:
        return 0
    return selector.choose(similarity, ks, steps) or 0


def apply_thresholds(records: Sequence[dict], selector: KSelector | None, ks: Sequence[int], steps: int) -> dict:
    """Serve each record's B at the K its own pair's similarity earns (uncached on a miss): accuracy vs uncached and
    the drop's 95% upper bound, leak rates over near misses and per hit (with its Wilson bound: the chance that a
    served hit leaks, for this workload's mix), hit rate per relation, steps saved."""
    drops, hits_by_relation = [], {}
    leaks = raw_leaks = near = skipped = 0
    for r in records:
        k = _choose(selector, r["similarity"], ks, steps)
        image = r["cached"][str(k)] if k else r["uncached"]
        drops.append(record_accuracy(r["uncached"]) - record_accuracy(image))
        skipped += k
        hits_by_relation.setdefault(r["relation"], []).append(k > 0)
        if r["relation"] == "near_miss":
            near += 1
            leaks += bool(k) and _cache_leak(r, k)
            raw_leaks += bool(image["leak"])
    uncached = float(np.mean([record_accuracy(r["uncached"]) for r in records]))
    hits = sum(sum(v) for v in hits_by_relation.values())
    return {
        "pairs": len(records),
        "accuracy": uncached - float(np.mean(drops)),
        "uncached_accuracy": uncached,
        "accuracy_drop": float(np.mean(drops)),
        "accuracy_drop_upper95": bootstrap_upper(drops),
        "leak_rate_near_miss": leaks / near if near else 0.0,
        "raw_leak_rate_near_miss": raw_leaks / near if near else 0.0,
        "hits": hits,
        "leaks": leaks,
        "leak_rate_per_hit_upper95": wilson_upper(leaks, hits),
        "hit_rate": {rel: float(np.mean(v)) for rel, v in sorted(hits_by_relation.items())},
        "steps_saved_own_pair": skipped / (steps * len(records)),
    }


def steps_saved(
    records: Sequence[dict], selector: KSelector | None, ks: Sequence[int], steps: int, embedder: Embedder
) -> dict:
    """NIRVANA's computation saved, Σ K_hit / Σ N, when every A is cached and each B hits its *nearest* cached prompt
    (by ``embedder``), over paraphrases and over all pairs; hits on another scene's prompt (None: no scenes)."""
    prompts = sorted({r["cached_prompt"] for r in records})
    cached = embedder.embed(prompts)
    new = embedder.embed([r["new_prompt"] for r in records])
    similarity = new @ cached.T
    nearest, source = similarity.max(axis=1), similarity.argmax(axis=1)
    ks_hit = np.array([_choose(selector, float(s), ks, steps) for s in nearest])
    paraphrase = np.array([r["relation"] == "paraphrase" for r in records])
    # These hits' images were never generated: where records name scenes, count hits on another scene's prompt.
    scenes = {r["cached_prompt"]: r.get("cached_scene") for r in records}
    hit = [(r, prompts[j]) for r, j, k in zip(records, source, ks_hit, strict=True) if k and r.get("new_scene")]
    other_scene = [scenes[a] != r["new_scene"] for r, a in hit]
    return {
        "cached_prompts": len(cached),
        "paraphrase_pairs": int(paraphrase.sum()),
        "paraphrase_steps_saved": float(ks_hit[paraphrase].sum() / (steps * max(int(paraphrase.sum()), 1))),
        "paraphrase_hit_rate": float((ks_hit[paraphrase] > 0).mean()) if paraphrase.any() else 0.0,
        "all_steps_saved": float(ks_hit.sum() / (steps * len(records))),
        "all_hit_rate": float((ks_hit > 0).mean()),
        "all_hits_on_other_scene": int(sum(other_scene)) if other_scene else None,
    }


def write_config(path: str | Path, thresholds: Sequence[tuple[float, int]], steps: int, embedder: str) -> Path:
    """Write ``{"embedder": ..., "cache": {"selection": {"thresholds", "reference_steps"}}}`` as TOML (``.toml``)
    or JSON (anything else): the file ``nirvana serve --config`` reads."""
    out = Path(path)
    table = [[float(s), int(k)] for s, k in thresholds]
    KSelector(thresholds=tuple(map(tuple, table)), reference_steps=steps)  # refuse to write what the server rejects
    if out.suffix == ".toml":
        pairs = ", ".join(f"[{s!r}, {k}]" for s, k in table)
        text = (
            f"# Similarity -> K thresholds fitted by `nirvana calibrate` for the {embedder} embedder at N={steps}.\n"
            f"embedder = {json.dumps(embedder)}\n\n[cache.selection]\nreference_steps = {steps}\n"
            f"thresholds = [{pairs}]\n"
        )
    else:
        data = {"embedder": embedder, "cache": {"selection": {"thresholds": table, "reference_steps": steps}}}
        text = json.dumps(data, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _warnings(calibration: dict, rejected: Sequence[dict]) -> list[str]:
    """What makes a fitted table less trustworthy than its figures suggest."""
    out = []
    if calibration["uncached_accuracy"] < MIN_TRUSTED_ACCURACY:
        out.append(
            f"uncached accuracy is only {calibration['uncached_accuracy']:.3f}: the model or the judge cannot show "
            "what the cache changes, so these thresholds are not evidence of quality"
        )
    # An admitted band's bounds are within budget, so its sample is large enough; say which Ks lack the evidence.
    for entry in rejected:
        needed = entry.get("pairs_needed") or {}
        wants = [f"{needed['pairs']} pairs"] if needed.get("pairs") else []
        wants += [f"{needed['near_misses']} near misses"] if needed.get("near_misses") else []
        if wants:
            had = f"it had {entry['n']} pairs and {entry['n_near_miss']} near misses"
            out.append(f"K={entry['k']}: rejected on too little evidence: the band needs about {' and '.join(wants)}")
            out[-1] += f" ({had})"
    return out


def rescore(evaluation: dict, embedder: Embedder) -> dict:
    """``evaluation`` with each record's ``similarity`` recomputed by ``embedder`` (and the settings naming it).

    The generated images depend on the pair, never on the embedder, so one evaluation calibrates any embedder.
    """
    records = evaluation["records"]
    cached = embedder.embed([r["cached_prompt"] for r in records])
    new = embedder.embed([r["new_prompt"] for r in records])
    similarity = (cached * new).sum(axis=1)  # unit vectors: the cosine
    report = {**evaluation["report"], "settings": {**evaluation["report"]["settings"], "embedder": embedder.name}}
    return {
        **evaluation,
        "report": report,
        "records": [{**r, "similarity": float(s)} for r, s in zip(records, similarity, strict=True)],
    }


def _split(records: Sequence[dict], split: str) -> list[dict]:
    chosen = [r for r in records if r.get("split") == split]
    if not chosen:
        raise CalibrationError(f"the evaluation records hold no {split!r} pairs")
    return chosen


def calibrate(evaluation: dict, out: str | Path, embedder: Embedder, budget: Budget = Budget()) -> dict:
    """Fit on the calibration split of ``evaluation`` (``run_eval``'s result), write ``out``, check on held-out.

    When no band meets the budget the table written is ``[(1.0, smallest K)]``: no similarity exceeds 1, so the
    server effectively never resumes from another prompt's latent (only exact repeats can round above 1).
    """
    settings = evaluation["report"]["settings"]
    steps, ks = int(settings["steps"]), [int(k) for k in settings["ks"]]
    records = evaluation["records"]
    missing = [k for k in ks if any(str(k) not in r["cached"] for r in records)]
    if missing:
        raise CalibrationError(f"records lack cached images at K={missing} listed in the settings")
    fit = fit_thresholds(_split(records, "calibration"), ks, budget)
    thresholds = fit["thresholds"] or [(1.0, min(ks))]
    selector = KSelector(thresholds=tuple(thresholds), reference_steps=steps) if fit["thresholds"] else None
    path = write_config(out, thresholds, steps, embedder.name)
    heldout = _split(records, "heldout")
    calibration = apply_thresholds(_split(records, "calibration"), selector, ks, steps)
    return {
        "config": str(path),
        "embedder": embedder.name,
        "steps": steps,
        "ks": ks,
        "budget": asdict(budget),
        "thresholds": [list(t) for t in thresholds],
        "caching_disabled": not fit["thresholds"],
        "bands": fit["bands"],
        "rejected": fit["rejected"],
        "warnings": _warnings(calibration, fit["rejected"]),
        "calibration": calibration,
        "heldout": {
            **apply_thresholds(heldout, selector, ks, steps),
            **steps_saved(heldout, selector, ks, steps, embedder),
        },
    }
