"""Upper bounds against known values, and the pairs a band needs before it can be admitted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nirvana.calibration.bounds import bootstrap_upper, leak_pairs_needed, mean_pairs_needed, wilson_upper

Z_TWO_SIDED_95 = 1.959963984540054


def test_wilson_upper_for_no_leak_in_300() -> None:
    # One-sided 95% (z = 1.645): z^2 / (n + z^2); the often-quoted 0.0126 is the two-sided 95% interval (z = 1.96).
    assert wilson_upper(0, 300) == pytest.approx(1.6448536269514722**2 / (300 + 1.6448536269514722**2))
    assert wilson_upper(0, 300) == pytest.approx(0.00894, abs=1e-5)
    assert wilson_upper(0, 300, z=Z_TWO_SIDED_95) == pytest.approx(0.0126, abs=1e-4)
    assert wilson_upper(0, 0) is None


def test_wilson_upper_with_leaks_matches_the_textbook_value() -> None:
    # 5 of 100, z = 1.645: (0.05 + z²/200 + z·sqrt(0.05·0.95/100 + z²/40000)) / (1 + z²/100) = 0.1018 / 1.0271
    assert wilson_upper(5, 100) == pytest.approx(0.0992, abs=1e-4)
    assert wilson_upper(100, 100) == 1.0


def test_no_leak_needs_z_squared_over_budget_near_misses() -> None:
    needed = leak_pairs_needed(0, 20, 0.01)
    assert needed == 268
    assert wilson_upper(0, needed) <= 0.01 < wilson_upper(0, needed - 1)


def test_some_leaks_need_the_smallest_n_whose_bound_fits() -> None:
    needed = leak_pairs_needed(1, 200, 0.01)  # observed 0.5%
    assert needed is not None
    assert wilson_upper(round(0.005 * needed), needed) <= 0.01
    assert wilson_upper(round(0.005 * (needed - 1)), needed - 1) > 0.01 or round(0.005 * (needed - 1)) < round(
        0.005 * needed
    )
    assert leak_pairs_needed(2, 100, 0.01) is None  # observed 2% is over budget: more pairs cannot help


def test_bootstrap_is_deterministic_with_its_seed_and_above_the_mean() -> None:
    values = np.random.default_rng(1).uniform(0, 0.2, size=40).tolist()
    first, again = bootstrap_upper(values, seed=3), bootstrap_upper(values, seed=3)
    assert first == again
    assert bootstrap_upper(values, seed=4) != first
    mean, se = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert mean < first == pytest.approx(mean + 1.645 * se, rel=0.05)  # the normal approximation, roughly
    assert bootstrap_upper([0.0] * 10) == 0.0 and bootstrap_upper([]) is None


def test_mean_pairs_needed_from_the_observed_variance() -> None:
    values = [0.0, 0.1] * 5  # mean 0.05, sd 0.0527
    needed = mean_pairs_needed(values, 0.06)
    sd = float(np.std(values, ddof=1))
    assert needed == math.ceil((1.6448536269514722 * sd / 0.01) ** 2)
    assert mean_pairs_needed(values, 0.05) is None  # mean not below the budget
