"""Generate and score a workload's pairs with the engine's own code: the records :mod:`.fit` calibrates on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from nirvana.calibration.fidelity import Scorer
from nirvana.calibration.generate import PairGenerator, PairSettings
from nirvana.calibration.pairs import WorkloadPair
from nirvana.checkpoint import Checkpoint

__all__ = ["score_pairs"]


def score_pairs(
    checkpoint: Checkpoint,
    pairs: Sequence[WorkloadPair],
    settings: PairSettings,
    scorer: Scorer,
    examples_per_band: int = 3,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict], dict[int, list[dict]]]:
    """One record per pair (its fields and ``scores[str(K)]``), and per band up to ``examples_per_band`` pairs'
    images (``{"pair": ..., "cached_source", "uncached": uint8 [H, W, 3], "cached": {K: image}}``) for the report.

    ``progress`` is called with the number of pairs finished after each batch.
    """
    generator = PairGenerator(checkpoint, settings)
    records: list[dict] = []
    examples: dict[int, list[dict]] = {}
    for start in range(0, len(pairs), settings.batch_size):
        batch = pairs[start : start + settings.batch_size]
        images = generator.generate(
            [p.cached_prompt for p in batch], [p.new_prompt for p in batch], [p.seed for p in batch]
        )
        scores = {k: scorer.score(cached, images.uncached) for k, cached in images.cached.items()}
        for i, pair in enumerate(batch):
            records.append({**pair.to_dict(), "scores": {str(k): float(s[i]) for k, s in scores.items()}})
            kept = examples.setdefault(pair.band, [])
            if len(kept) < examples_per_band:
                kept.append(
                    {
                        "pair": pair.to_dict(),
                        "cached_source": np.asarray(images.cached_source[i]),
                        "uncached": np.asarray(images.uncached[i]),
                        "cached": {k: np.asarray(c[i]) for k, c in images.cached.items()},
                    }
                )
        if progress is not None:
            progress(len(batch))
    return records, examples
