"""Fit similarity → K thresholds on a workload's scored pairs, holding a fidelity budget at the 95% lower bound.

Each record is a pair (see :mod:`nirvana.calibration.pairs`) with ``similarity`` and ``scores[str(K)]``: the
scorer's fidelity of B resumed from A's latent at K against B uncached (higher is closer; SSIM by default). A band of
pairs may be served at K when it holds ``min_count`` pairs and the one-sided 95% *lower* bound of its mean score
(seeded bootstrap) is at least ``min_score`` — for SSIM, the upper bound of the mean fidelity loss 1 − SSIM stays
within 1 − ``min_score``.

The fit is :func:`nirvana.calibration.table.fit_thresholds`'s greedy from the top: pairs sorted by similarity, for each
K (largest first) the band grows downwards pair by pair while the check passes; its lowest similarity sets K's
threshold, and the next K continues below it. A K whose first band cannot pass is rejected with the number of pairs
the band would need if further pairs scored like these (None when its mean itself is below ``min_score``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nirvana.calibration.bounds import bootstrap_upper, mean_pairs_needed
from nirvana.calibration.pairs import band_of
from nirvana.k_choice import KSelector

__all__ = ["FidelityBudget", "band_table", "fidelity_cell", "fit_fidelity"]

# A threshold sits this far below the lowest similarity its band admitted (or at the next pair, if closer).
_THRESHOLD_MARGIN = 1e-3


@dataclass(frozen=True)
class FidelityBudget:
    """Mean fidelity a band must keep at its 95% lower bound, and the pairs it needs before it can be admitted."""

    min_score: float
    min_count: int = 10

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")


def fidelity_cell(scores: Sequence[float], budget: FidelityBudget) -> dict:
    """n, mean score, its one-sided 95% lower bound, whether both meet ``budget``, and the pairs needed if not."""
    losses = [-s for s in scores]  # the bounds are written for losses (smaller is better)
    upper = bootstrap_upper(losses)
    lower = None if upper is None else -upper
    within = len(scores) >= budget.min_count and lower is not None and lower >= budget.min_score - 1e-12
    needed = None if within else mean_pairs_needed(losses, -budget.min_score)
    if needed is not None:
        needed = max(needed, budget.min_count, len(scores) + 1)
    return {
        "n": len(scores),
        "mean": float(np.mean(scores)) if scores else None,
        "lower95": lower,
        "within": within,
        "pairs_needed": needed,
    }


def _scores(rows: Sequence[dict], k: int) -> list[float]:
    return [float(r["scores"][str(k)]) for r in rows]


def _grow(rows: Sequence[dict], pos: int, k: int, budget: FidelityBudget) -> tuple[int | None, dict | None]:
    best, failed = None, None
    for end in range(pos + budget.min_count, len(rows) + 1):
        if end < len(rows) and rows[end]["similarity"] == rows[end - 1]["similarity"]:
            continue  # a threshold cannot separate equal similarities
        cell = fidelity_cell(_scores(rows[pos:end], k), budget)
        if not cell["within"]:
            failed = {**cell, "similarity": [rows[end - 1]["similarity"], rows[pos]["similarity"]]}
            break
        best = end
    return best, failed


def band_threshold(rows: Sequence[dict], end: int) -> float:
    """Threshold under the band ending (exclusive) at ``end`` of ``rows`` sorted by similarity, highest first."""
    low = rows[end - 1]["similarity"]
    below = rows[end]["similarity"] if end < len(rows) else -1.0
    candidate = round(low - _THRESHOLD_MARGIN, 6)
    return candidate if below <= candidate < low else below


def fit_fidelity(records: Sequence[dict], ks: Sequence[int], budget: FidelityBudget) -> dict:
    """``{"thresholds": [(similarity, K), ...], "bands": [...], "rejected": [...]}`` (see module docstring)."""
    rows = sorted(records, key=lambda r: -r["similarity"])
    thresholds: list[tuple[float, int]] = []
    bands, rejected = [], []
    pos = 0
    for k in sorted(ks, reverse=True):
        remaining = _scores(rows[pos:], k)
        if len(remaining) < budget.min_count:
            cell = fidelity_cell(remaining, budget)
            rejected.append({"k": k, "reason": f"fewer than min_count={budget.min_count} pairs left", **cell})
            continue
        end, failed = _grow(rows, pos, k, budget)
        if end is None:
            rejected.append({"k": k, "reason": "over budget", **(failed or {})})
            continue
        threshold = band_threshold(rows, end)
        thresholds.append((threshold, k))
        cell = fidelity_cell(_scores(rows[pos:end], k), budget)
        span = [rows[end - 1]["similarity"], rows[pos]["similarity"]]
        bands.append({"k": k, "threshold": threshold, "similarity": span, **cell, "stopped_by": failed})
        pos = end
    return {"thresholds": thresholds, "bands": bands, "rejected": rejected}


def band_table(
    records: Sequence[dict],
    ks: Sequence[int],
    edges: Sequence[float],
    budget: FidelityBudget,
    selector: KSelector | None,
    steps: int,
) -> list[dict]:
    """Per similarity band (top first): its pairs' figures at every K and the K the fitted table serves them at
    (the K its lowest pair earns; 0 = miss)."""
    by_band: dict[int, list[dict]] = {}
    for r in records:
        by_band.setdefault(band_of(r["similarity"], edges), []).append(r)
    table = []
    for band in sorted(by_band, reverse=True):
        rows = by_band[band]
        low = min(r["similarity"] for r in rows)
        served = (selector.choose(low, ks, steps) or 0) if selector else 0
        table.append(
            {
                "band": band,
                "edges": [edges[band], edges[band + 1]],
                "n": len(rows),
                "served_k": served,
                "by_k": {str(k): fidelity_cell(_scores(rows, k), budget) for k in ks},
            }
        )
    return table
