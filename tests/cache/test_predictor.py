"""Hit predictor (nirvana.cache.predictor) on synthetic 384-dimensional unit vectors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nirvana.cache.predictor import HitPredictor, PredictorStats

DIM = 384


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Prompts:
    """Cached prompts clustered around a few topics (centres); cosine to the centre about 0.86."""

    def __init__(self, seed: int = 0, centres: int = 6, spread: float = 0.03) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = unit(self.rng.standard_normal((centres, DIM)))
        self.spread = spread

    def near(self, n: int) -> np.ndarray:
        """Drawn like the cached prompts: the nearest cached prompt has cosine about 0.78."""
        picks = self.centres[self.rng.integers(0, len(self.centres), n)]
        return unit(picks + self.spread * self.rng.standard_normal((n, DIM)))

    def random(self, n: int) -> np.ndarray:
        return unit(self.rng.standard_normal((n, DIM)))


@pytest.fixture(scope="module")
def fitted() -> tuple[HitPredictor, Prompts]:
    prompts = Prompts()
    cache = prompts.near(400)
    predictor = HitPredictor(min_samples=64)
    assert predictor.maybe_refit(len(cache), lambda: cache)
    return predictor, prompts


def novel_fraction(predictor: HitPredictor, vectors: np.ndarray) -> float:
    return float(np.mean([predictor.is_novel(v) for v in vectors]))


def test_queries_like_the_cache_are_not_novel(fitted: tuple[HitPredictor, Prompts]) -> None:
    predictor, prompts = fitted
    assert novel_fraction(predictor, prompts.near(400)) <= 0.05


def test_random_directions_are_novel(fitted: tuple[HitPredictor, Prompts]) -> None:
    predictor, prompts = fitted
    assert novel_fraction(predictor, prompts.random(400)) >= 0.90


def test_accepts_row_vectors_and_checks_dimension(fitted: tuple[HitPredictor, Prompts]) -> None:
    predictor, prompts = fitted
    vector = prompts.near(1)
    assert predictor.is_novel(vector) == predictor.is_novel(vector[0])
    with pytest.raises(ValueError, match="dimension 10"):
        predictor.is_novel(np.ones(10))


def test_disabled_is_never_novel_and_never_fits() -> None:
    prompts = Prompts(seed=1)
    predictor = HitPredictor(enabled=False)

    def vectors() -> np.ndarray:
        raise AssertionError("vectors() must not be called while disabled")

    assert not predictor.maybe_refit(1000, vectors)
    assert not any(predictor.is_novel(v) for v in prompts.random(20))
    assert predictor.stats() == PredictorStats(False, 0, 0, 0, 0, 0)


def test_not_fitted_below_min_samples() -> None:
    prompts = Prompts(seed=2)
    calls = []
    predictor = HitPredictor(min_samples=64)

    def vectors() -> np.ndarray:
        calls.append(1)
        return prompts.near(64)

    assert not predictor.maybe_refit(63, vectors)
    assert calls == [] and not predictor.stats().fitted
    assert not predictor.is_novel(prompts.random(1)[0])  # unfitted: every request searches
    assert predictor.stats().predictions == 0
    assert predictor.maybe_refit(64, vectors)
    assert calls == [1] and predictor.stats().fitted and predictor.stats().fit_size == 64


def test_refits_only_after_enough_growth() -> None:
    prompts = Prompts(seed=3)
    cache = prompts.near(200)
    calls: list[int] = []
    predictor = HitPredictor(min_samples=64, refit_growth=0.25)

    def vectors() -> np.ndarray:
        calls.append(len(calls))
        return cache

    assert predictor.maybe_refit(100, vectors)
    assert not predictor.maybe_refit(110, vectors)
    assert not predictor.maybe_refit(124, vectors)
    assert predictor.maybe_refit(125, vectors)  # grew by 25%
    assert not predictor.maybe_refit(150, vectors)
    assert not predictor.maybe_refit(90, vectors)  # shrinking never refits
    assert len(calls) == 2 and predictor.stats().fit_size == 125


def test_fit_subsamples_to_max_fit_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.svm import OneClassSVM

    seen: list[int] = []
    real_fit = OneClassSVM.fit

    def spy(self: object, data: np.ndarray, *args: object, **kwargs: object) -> object:
        seen.append(len(data))
        return real_fit(self, data, *args, **kwargs)

    monkeypatch.setattr(OneClassSVM, "fit", spy)
    predictor = HitPredictor(min_samples=8, max_fit_samples=100)
    assert predictor.maybe_refit(500, lambda: Prompts(seed=4).near(500))
    assert seen == [100]


def test_fits_are_reproducible_with_a_seed() -> None:
    prompts = Prompts(seed=5)
    cache, queries = prompts.near(300), np.vstack([prompts.near(50), prompts.random(50)])
    answers = []
    for _ in range(2):
        predictor = HitPredictor(min_samples=8, max_fit_samples=100, seed=7)
        predictor.maybe_refit(300, lambda: cache)
        answers.append([predictor.is_novel(q) for q in queries])
    assert answers[0] == answers[1]


def test_bad_vectors_are_rejected() -> None:
    predictor = HitPredictor(min_samples=2)
    with pytest.raises(ValueError, match="shape"):
        predictor.maybe_refit(5, lambda: np.ones(5))


def test_false_skip_rate_bookkeeping_is_exact() -> None:
    predictor = HitPredictor()
    assert predictor.stats().false_skip_rate is None
    for would_hit in [True, False, False, True, False, False, False, False]:
        predictor.record_shadow(would_hit)
    stats = predictor.stats()
    assert (stats.shadow_checks, stats.false_skips) == (8, 2)
    assert stats.false_skip_rate == 0.25


def test_prediction_counters(fitted: tuple[HitPredictor, Prompts]) -> None:
    _, prompts = fitted
    predictor = HitPredictor(min_samples=64)
    predictor.maybe_refit(400, lambda: prompts.near(400))
    novel = [predictor.is_novel(v) for v in np.vstack([prompts.near(30), prompts.random(20)])]
    stats = predictor.stats()
    assert stats.predictions == 50 and stats.predicted_novel == sum(novel)


def test_shadow_rate() -> None:
    assert not any(HitPredictor(shadow_rate=0.0).should_shadow() for _ in range(200))
    assert all(HitPredictor(shadow_rate=1.0).should_shadow() for _ in range(200))
    predictor = HitPredictor(shadow_rate=0.2, seed=3)
    share = np.mean([predictor.should_shadow() for _ in range(5000)])
    assert 0.17 < share < 0.23


def test_concurrent_predictions_during_refits() -> None:
    prompts = Prompts(seed=6)
    cache = prompts.near(600)
    predictor = HitPredictor(min_samples=64, refit_growth=0.0)
    predictor.maybe_refit(100, lambda: cache[:100])
    queries = prompts.near(50)
    errors: list[BaseException] = []

    def predict() -> None:
        try:
            for q in queries:
                predictor.is_novel(q)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=predict) for _ in range(4)]
    for thread in threads:
        thread.start()
    for n in (200, 400, 600):
        predictor.maybe_refit(n, lambda n=n: cache[:n])
    for thread in threads:
        thread.join()
    assert errors == [] and predictor.stats().predictions == 4 * 50


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"min_samples": 1}, "min_samples must be an int >= 2, got 1"),
        ({"nu": 0.0}, "nu must be in (0, 1], got 0.0"),
        ({"gamma": "wide"}, "gamma must be"),
        ({"gamma": -1.0}, "got -1.0"),
        ({"max_fit_samples": 10}, "max_fit_samples must be an int >= min_samples (64), got 10"),
        ({"shadow_rate": 1.5}, "shadow_rate must be in [0, 1], got 1.5"),
        ({"refit_growth": -0.1}, "refit_growth must be >= 0, got -0.1"),
    ],
)
def test_invalid_settings_name_field_and_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        HitPredictor(**kwargs)
    assert needle in str(info.value)
