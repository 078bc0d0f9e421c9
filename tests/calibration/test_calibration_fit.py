"""The workload fit on hand-built scores whose right answer is known; nearest-earlier pairs balanced over bands."""

from __future__ import annotations

import numpy as np

from nirvana.calibration.fit import FidelityBudget, fidelity_cell, fit_fidelity
from nirvana.calibration.pairs import nearest_earlier, sample_pairs
from nirvana.embed import Embedder


def _records(good_above: dict[int, float]) -> list[dict]:
    """100 pairs at similarities 0.995 ... 0.005: SSIM 0.98 ± 0.01 at K above ``good_above[K]``, else 0.5."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(100):
        s = round(0.995 - 0.01 * i, 3)
        scores = {str(k): (0.98 + rng.uniform(-0.01, 0.01)) if s > t else 0.5 for k, t in good_above.items()}
        out.append({"index": i, "similarity": s, "scores": scores})
    return out


def test_fit_finds_the_known_thresholds() -> None:
    fit = fit_fidelity(_records({8: 0.9, 4: 0.5}), [4, 8], FidelityBudget(min_score=0.9, min_count=5))
    # K=8: the 10 good pairs, then the first bad one sinks the bound. K=4: a *mean* budget lets the band take in a few
    # bad pairs (0.5) below 0.5 until the lower bound of the mean reaches 0.9.
    assert fit["thresholds"][0] == (0.904, 8) and [k for _, k in fit["thresholds"]] == [8, 4]
    assert fit["bands"][0]["n"] == 10 and 40 < fit["bands"][1]["n"] < 50
    assert all(band["lower95"] >= 0.9 > band["stopped_by"]["lower95"] for band in fit["bands"])


def test_a_band_short_of_pairs_says_how_many_it_needs() -> None:
    records = _records({8: 0.9, 4: 0.5})[:6]  # 6 good pairs: fewer than min_count
    fit = fit_fidelity(records, [8], FidelityBudget(min_score=0.9, min_count=10))
    assert fit["thresholds"] == [] and fit["rejected"][0]["pairs_needed"] == 10


def test_cell_needs_more_pairs_when_the_bound_is_loose() -> None:
    scores = [0.99, 0.85] * 3  # mean 0.92, but six noisy pairs cannot prove >= 0.9
    cell = fidelity_cell(scores, FidelityBudget(min_score=0.9, min_count=2))
    assert not cell["within"] and cell["lower95"] < 0.9 < cell["mean"]
    assert cell["pairs_needed"] > 6
    assert fidelity_cell([0.5] * 6, FidelityBudget(min_score=0.9))["pairs_needed"] is None


class _Fixed(Embedder):
    name = "minilm"
    dim = 2

    def embed(self, texts):
        angles = {"a": 0.0, "a'": 0.05, "b": 1.2, "b'": 1.25, "c": 2.5, "a''": 0.02}
        return np.array([[np.cos(angles[t]), np.sin(angles[t])] for t in texts], dtype=np.float32)


def test_each_prompt_pairs_with_its_nearest_earlier_prompt() -> None:
    prompts = ["a", "b", "a'", "c", "b'", "a''"]
    nearest, similarity = nearest_earlier(_Fixed().embed(prompts))
    assert nearest.tolist() == [0, 0, 1, 1, 0]  # b->a (only one), a'->a, c->b, b'->b, a''->a
    assert similarity[1] == np.float32(np.cos(0.05))
    pairs = sample_pairs(prompts, list(range(6)), _Fixed(), max_pairs=2)
    assert len(pairs) == 2
    assert sorted(p.band for p in pairs) == [0, 7]  # one from the top band, one from the bottom: balanced
    assert all(p.cached_index < p.index and p.seed == p.index for p in pairs)
