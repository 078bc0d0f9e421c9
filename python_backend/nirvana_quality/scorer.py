"""``--scorer judge`` for ``nirvana calibrate --workload``: the shapes model's attribute judge as a fidelity scorer.

Registered through the ``nirvana.scorers`` entry point (pyproject), so the product's calibration finds it without
importing the research package. A pair's score is the share of attributes the judge reads the same on B cached and
B uncached: 1.0 when a hit changed nothing the judge can see, and the default bound of 0.99 is the issue's budget
of at most one point of attribute accuracy lost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirvana.calibration.fidelity import Scorer, ScorerError
from nirvana_dev.shapes.judge import Judge, JudgeFormatError

__all__ = ["JudgeScorer", "make_judge_scorer"]


class JudgeScorer(Scorer):
    """Agreement of the judge's reading of the cached and the uncached image of B, per pair in [0, 1]."""

    name, unit, default_min = "judge", "", 0.99

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    def score(self, cached: np.ndarray, uncached: np.ndarray) -> list[float]:
        both = self.judge.predict(np.concatenate([cached, uncached]))
        read_cached, read_uncached = both[: len(cached)], both[len(cached) :]
        return [
            float(np.mean([a[name] == b[name] for name in a])) for a, b in zip(read_cached, read_uncached, strict=True)
        ]


def make_judge_scorer(checkpoint_dir: Path) -> JudgeScorer:
    """The judge saved beside a shapes checkpoint (``judge/``, as ``nirvana-quality train`` writes it)."""
    try:
        return JudgeScorer(Judge.load(Path(checkpoint_dir) / "judge"))
    except (FileNotFoundError, JudgeFormatError) as err:
        raise ScorerError(f"scorer 'judge' needs a shapes checkpoint with a judge: {err}") from None
