"""Similarity → K selection (nirvana.k_choice)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nirvana.k_choice import DEFAULT_THRESHOLDS, InvalidThresholds, KSelector, scale_k

SELECTOR = KSelector()


@pytest.mark.parametrize(
    ("similarity", "expected"),
    [
        (1.0, 25),
        (0.96, 25),
        (0.95, 20),  # strict ">" as in the paper: the boundary earns the next-lower K
        (0.93, 20),
        (0.90, 15),
        (0.88, 15),
        (0.85, 10),
        (0.80, 10),
        (0.75, 5),
        (0.70, 5),
        (0.65, 0),
        (0.30, 0),
        (-1.0, 0),
    ],
)
def test_paper_table_at_50_steps(similarity: float, expected: int) -> None:
    assert SELECTOR.k_opt(similarity, 50) == expected


def test_nan_similarity_is_a_miss() -> None:
    assert SELECTOR.k_opt(float("nan"), 50) == 0


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [
        (50, [5, 10, 15, 20, 25]),
        (100, [10, 20, 30, 40, 50]),
        (20, [2, 4, 6, 8, 10]),
        (25, [3, 5, 8, 10, 13]),  # halves round up
    ],
)
def test_admit_ks_scale_with_step_count(num_steps: int, expected: list[int]) -> None:
    assert SELECTOR.admit_ks(num_steps) == expected


def test_k_opt_scales_with_step_count() -> None:
    assert SELECTOR.k_opt(0.97, 100) == 50
    assert SELECTOR.k_opt(0.97, 20) == 10
    assert SELECTOR.k_opt(0.97, 25) == 13
    assert SELECTOR.k_opt(0.70, 20) == 2


def test_admit_ks_collapse_to_distinct_values_for_few_steps() -> None:
    # 5 steps: Ks 0.5, 1, 1.5, 2, 2.5 → 1, 1, 2, 2, 3 → distinct, ascending.
    assert SELECTOR.admit_ks(5) == [1, 2, 3]
    assert SELECTOR.admit_ks(2) == [1]
    assert SELECTOR.admit_ks(1) == []


def test_scale_k_bounds() -> None:
    assert scale_k(0, 50) == 0
    assert scale_k(5, 3) == 1  # at least one step skipped on a hit
    assert scale_k(49, 10) == 9  # at least one step left to run
    assert scale_k(25, 1) == 0
    with pytest.raises(ValueError, match="num_steps"):
        scale_k(5, 0)


@pytest.mark.parametrize(
    ("cached", "similarity", "expected"),
    [
        ([5, 10, 15, 20, 25], 0.97, 25),
        ([5, 10, 15, 20, 25], 0.87, 15),
        ([5, 10, 25], 0.91, 10),  # 20 allowed but not cached; 25 cached but too far
        ([25], 0.91, None),
        ([5, 10], 0.60, None),  # a miss never uses a latent
        ([], 0.99, None),
        ({20, 5}, 0.99, 20),
    ],
)
def test_choose_largest_cached_k_not_above_k_opt(cached: list[int], similarity: float, expected: int | None) -> None:
    assert SELECTOR.choose(similarity, cached, 50) == expected


@pytest.mark.parametrize(
    ("thresholds", "needle"),
    [
        (((0.9, 20), (0.95, 25)), "(0.95, 25)"),  # similarity not decreasing
        (((0.95, 20), (0.90, 25)), "(0.9, 25)"),  # K not decreasing
        (((0.95, 20), (0.90, 20)), "(0.9, 20)"),  # K equal
        (((1.5, 20),), "(1.5, 20)"),
        (((-1.0, 5),), "(-1.0, 5)"),
        (((0.9, 0),), "(0.9, 0)"),
        (((0.9, 50),), "(0.9, 50)"),
        (((0.9, 2.5),), "(0.9, 2.5)"),
        (((float("nan"), 5),), "(nan, 5)"),
    ],
)
def test_invalid_thresholds_are_rejected_with_the_pair(thresholds: tuple, needle: str) -> None:
    with pytest.raises(InvalidThresholds) as info:
        KSelector(thresholds=thresholds)
    assert needle in str(info.value)


def test_empty_or_malformed_thresholds_are_rejected() -> None:
    with pytest.raises(InvalidThresholds, match="at least one"):
        KSelector(thresholds=())
    with pytest.raises(InvalidThresholds, match="pairs"):
        KSelector(thresholds=(0.9,))  # type: ignore[arg-type]
    with pytest.raises(InvalidThresholds, match="reference_steps"):
        KSelector(reference_steps=1)


def test_thresholds_from_config_lists_become_tuples() -> None:
    selector = KSelector(thresholds=[[0.8, 10], [0.6, 4]], reference_steps=20)  # type: ignore[arg-type]
    assert selector.thresholds == ((0.8, 10), (0.6, 4))
    assert selector.k_opt(0.7, 20) == 4
    hash(selector)  # frozen and usable as a cache key


@given(
    a=st.floats(min_value=-1.0, max_value=1.0),
    b=st.floats(min_value=-1.0, max_value=1.0),
    num_steps=st.integers(min_value=1, max_value=200),
)
def test_k_opt_is_monotone_in_similarity(a: float, b: float, num_steps: int) -> None:
    low, high = sorted((a, b))
    assert SELECTOR.k_opt(low, num_steps) <= SELECTOR.k_opt(high, num_steps)


@given(similarity=st.floats(min_value=-1.0, max_value=1.0), num_steps=st.integers(min_value=1, max_value=200))
def test_k_opt_is_one_of_the_admitted_ks_or_a_miss(similarity: float, num_steps: int) -> None:
    k = SELECTOR.k_opt(similarity, num_steps)
    assert k == 0 or k in SELECTOR.admit_ks(num_steps)
    assert 0 <= k < num_steps or (k == 0 and num_steps == 1)


def test_default_table_is_the_papers() -> None:
    assert DEFAULT_THRESHOLDS == ((0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5))
