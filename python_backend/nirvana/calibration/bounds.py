"""One-sided 95% upper confidence bounds for a band's figures, and how many pairs a band needs to be admitted.

A band is admitted only when the *upper bound* of each figure is within budget, not its point estimate: with 20 near
misses and no leak the observed leak rate is 0, but the data cannot exclude a 12% rate. Leak rates are binomial, so
their bound is Wilson's score interval (one-sided, z = 1.645); continuous losses (mean 1 − SSIM, accuracy drop) get
a percentile bootstrap of the mean with a fixed seed, so a calibration is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Z95", "bootstrap_upper", "leak_pairs_needed", "mean_pairs_needed", "wilson_upper"]

Z95 = 1.6448536269514722  # one-sided 95%: P(Z > z) = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_MAX_PAIRS = 10**7  # "needs more than this" reads as "cannot be admitted at this rate"


def wilson_upper(successes: int, n: int, z: float = Z95) -> float | None:
    """Upper end of the Wilson score interval for ``successes`` of ``n`` (None when ``n == 0``).

    With ``z = Z95`` it is the one-sided 95% bound: for 0 of 300 it is z²/(n + z²) ≈ 0.0089 (the two-sided 95% interval,
    z = 1.96, gives ≈ 0.0126; the exact Clopper-Pearson one-sided bound is 1 − 0.05^(1/300) ≈ 0.0099).
    """
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def leak_pairs_needed(leaks: int, n: int, budget: float, z: float = Z95) -> int | None:
    """Smallest sample size at which the Wilson upper bound falls within ``budget``, if further pairs leak at the
    observed rate (``leaks / n``; 0 when ``n == 0``). None when the observed rate itself is not below the budget.

    With no leak it has a closed form: z²/(n + z²) ≤ b ⇔ n ≥ z²(1 − b)/b, e.g. 268 pairs for b = 1%.
    """
    rate = leaks / n if n else 0.0
    if budget <= 0 or rate >= budget:
        return None
    if rate == 0:
        return max(1, math.ceil(z * z * (1 - budget) / budget - 1e-9))

    def fits(size: int) -> bool:
        return wilson_upper(round(rate * size), size, z) <= budget  # type: ignore[operator]

    high = max(n, 1)
    while not fits(high):
        high *= 2
        if high > _MAX_PAIRS:
            return None
    low = 0  # fits(low) is False or low == 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def bootstrap_upper(
    values: Sequence[float], seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES, z: float = Z95
) -> float | None:
    """One-sided upper bound of the mean of ``values`` (percentile bootstrap at the level ``z`` sets: 95% for
    ``Z95``); None for no values. Deterministic for a given ``seed``."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    if data.size == 1 or np.all(data == data[0]):
        return float(data[0])  # no spread to resample; a single value proves little, which min_count handles
    level = float(0.5 * (1 + math.erf(z / math.sqrt(2))))  # Φ(z): 0.95 for Z95
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    return float(np.quantile(means, level))


def mean_pairs_needed(values: Sequence[float], budget: float, z: float = Z95) -> int | None:
    """Pairs at which mean + z·sd/√n falls within ``budget`` if further pairs look like these (the normal
    approximation the bootstrap converges to); None when the mean itself is not below the budget, no values, or
    more than ten million pairs would be needed."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    mean = float(data.mean())
    if mean >= budget:
        return None
    sd = float(data.std(ddof=1)) if data.size > 1 else 0.0
    needed = max(int(data.size), math.ceil((z * sd / (budget - mean)) ** 2))
    return needed if needed <= _MAX_PAIRS else None  # a mean this close to the budget: not by more pairs
