"""Hit predictor: a one-class SVM over cached prompt embeddings that flags clearly novel prompts (NIRVANA).

A prompt far from everything cached will miss, so its vector search can be skipped. The SVM is fitted on (a sample
of) the cached prompt vectors and refitted as the cache grows. A wrong "novel" costs a lost hit, never a wrong
image, and it is measured: a small fraction of predicted-novel requests run the search anyway ("shadow checks"),
and the share of them that would have hit is the false-skip rate.

Calibration. Used as is (``OneClassSVM.predict``), the SVM flags far more than ``nu`` of fresh prompts drawn like the
cached ones as novel: in 384 dimensions every training point sits noticeably closer to itself (kernel 1) than to
any other point, so the fitted boundary hugs the training points. Measured on clustered unit vectors (4-16
centres, 64-2000 cached prompts, nu = 0.05, gamma = "scale"): 12-99% of queries drawn like the cached prompts were
predicted novel. So the threshold is recalibrated: each training point's score minus its own support-vector term
(a cheap leave-one-out estimate) is comparable with the score of an unseen cache-like prompt, and the ``nu``
quantile of those scores is the threshold. Same measurement: 0-1.4% of cache-like queries flagged, random
directions 80-100% (the 80% for 64 loosely spread prompts over 16 centres, 100% once the cache has 300).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn loads (≈0.3 s, and pandas if installed) only when the predictor fits
    from sklearn.svm import OneClassSVM


@dataclass
class PredictorStats:
    """Counters since construction: fits, predictions, and shadow checks of predicted-novel requests."""

    fitted: bool
    fit_size: int  # prompt count (as passed to maybe_refit) at the last fit; 0 before the first
    predictions: int  # SVM predictions made (calls while disabled or unfitted are not counted)
    predicted_novel: int
    shadow_checks: int
    false_skips: int  # shadow checks that found a usable cached latent

    @property
    def false_skip_rate(self) -> float | None:
        """false_skips / shadow_checks, or None before the first shadow check."""
        return self.false_skips / self.shadow_checks if self.shadow_checks else None


class HitPredictor:
    """One-class SVM (RBF kernel) telling whether a prompt embedding lies outside the cached prompts' region.

    ``nu`` is the SVM's outlier fraction and the quantile of the calibrated threshold: about that fraction of
    prompts resembling cached ones, at most, is predicted novel (wrongly skipped). ``gamma`` is scikit-learn's RBF
    width ("scale", "auto" or a float). ``refit_growth = 0`` refits on every call with ``count >= min_samples``.
    Thread-safe: fitting runs outside the lock and the fitted model is swapped in; one fit runs at a time.
    """

    def __init__(
        self,
        enabled: bool = True,
        min_samples: int = 64,
        refit_growth: float = 0.25,
        nu: float = 0.05,
        gamma: str | float = "scale",
        max_fit_samples: int = 4096,
        shadow_rate: float = 0.05,
        seed: int = 0,
    ) -> None:
        _check(isinstance(min_samples, int) and min_samples >= 2, "min_samples", min_samples, "an int >= 2")
        _check(refit_growth >= 0, "refit_growth", refit_growth, ">= 0")
        _check(0 < nu <= 1, "nu", nu, "in (0, 1]")
        _check(
            gamma in ("scale", "auto") or (_is_number(gamma) and gamma > 0), "gamma", gamma, '"scale", "auto" or > 0'
        )
        _check(
            isinstance(max_fit_samples, int) and max_fit_samples >= min_samples,
            "max_fit_samples",
            max_fit_samples,
            f"an int >= min_samples ({min_samples})",
        )
        _check(0 <= shadow_rate <= 1, "shadow_rate", shadow_rate, "in [0, 1]")
        self.enabled = bool(enabled)
        self.min_samples = min_samples
        self.refit_growth = float(refit_growth)
        self.nu = float(nu)
        self.gamma = gamma
        self.max_fit_samples = max_fit_samples
        self.shadow_rate = float(shadow_rate)
        self._sample_rng = np.random.default_rng(seed)
        self._shadow_rng = np.random.default_rng([seed, 1])  # independent stream: shadows don't shift samples
        self._lock = threading.Lock()  # guards the model reference, the counters and the RNGs
        self._fit_lock = threading.Lock()  # one fit at a time; others skip instead of queueing
        self._refitting = threading.Event()  # a background refit thread is running
        self._model: OneClassSVM | None = None
        self._threshold = 0.0  # decision_function value below which a vector is novel (see module docstring)
        self._dim: int | None = None
        self._fit_size = 0
        self._predictions = self._predicted_novel = self._shadow_checks = self._false_skips = 0

    def maybe_refit(self, count: int, vectors: Callable[[], np.ndarray]) -> bool:
        """Refit on the cached prompt vectors if the cache has grown enough; returns whether it refitted.

        ``count`` is the number of cached prompts. A fit happens when ``count >= min_samples`` and, after the first
        fit, ``count >= (1 + refit_growth) × count at the last fit``. Only then is ``vectors()`` called; it returns
        the cached prompt embeddings, float array of shape (n, dim), L2-normalised like the queries. At most
        ``max_fit_samples`` rows, drawn with the seeded RNG, are used. Returns False while another fit runs.
        """
        if not self.enabled or count < self.min_samples:
            return False
        with self._lock:
            due = self._model is None or count >= self._fit_size * (1.0 + self.refit_growth)
        if not due or not self._fit_lock.acquire(blocking=False):
            return False
        try:
            data = np.asarray(vectors(), dtype=np.float64)
            if data.ndim != 2 or len(data) < 2:
                raise ValueError(f"vectors() must return an (n >= 2, dim) array, got shape {data.shape}")
            if len(data) > self.max_fit_samples:
                with self._lock:
                    rows = self._sample_rng.choice(len(data), size=self.max_fit_samples, replace=False)
                data = data[np.sort(rows)]
            # The slow part (~1 s for 4096 rows of 384 dims) runs without the lock: predictions continue meanwhile.
            from sklearn.svm import OneClassSVM

            model = OneClassSVM(kernel="rbf", nu=self.nu, gamma=self.gamma).fit(data)
            threshold = _calibrated_threshold(model, data, self.nu)
            with self._lock:
                self._model, self._threshold, self._dim, self._fit_size = model, threshold, data.shape[1], count
            return True
        finally:
            self._fit_lock.release()

    def refit_in_background(self, count: Callable[[], int], vectors: Callable[[], np.ndarray]) -> None:
        """``maybe_refit(count(), vectors)`` on a daemon thread, off the request path (a fit on 4k vectors takes
        about a second); does nothing while disabled or while such a thread runs."""
        if not self.enabled or self._refitting.is_set():
            return
        self._refitting.set()

        def run() -> None:
            try:
                self.maybe_refit(count(), vectors)
            finally:
                self._refitting.clear()

        threading.Thread(target=run, name="predictor-refit", daemon=True).start()

    def is_novel(self, vector: np.ndarray) -> bool:
        """Whether the prompt embedding (shape (dim,) or (1, dim)) lies outside the cached region.

        False while disabled or not yet fitted (then every request searches).
        """
        with self._lock:
            model, threshold, dim = (self._model, self._threshold, self._dim) if self.enabled else (None, 0.0, None)
        if model is None:
            return False
        query = np.asarray(vector, dtype=np.float64).reshape(1, -1)
        if query.shape[1] != dim:
            raise ValueError(f"vector has dimension {query.shape[1]}, the predictor was fitted on {dim}")
        novel = bool(model.decision_function(query)[0] < threshold)
        with self._lock:
            self._predictions += 1
            self._predicted_novel += novel
        return novel

    def should_shadow(self) -> bool:
        """For a predicted-novel request: whether to search anyway (probability ``shadow_rate``) to measure errors."""
        with self._lock:
            return bool(self._shadow_rng.random() < self.shadow_rate)

    def record_shadow(self, would_hit: bool) -> None:
        """Record a shadow check's outcome: ``would_hit`` is True when the skipped search would have found a latent."""
        with self._lock:
            self._shadow_checks += 1
            self._false_skips += bool(would_hit)

    def stats(self) -> PredictorStats:
        """A snapshot of the counters."""
        with self._lock:
            return PredictorStats(
                fitted=self._model is not None,
                fit_size=self._fit_size,
                predictions=self._predictions,
                predicted_novel=self._predicted_novel,
                shadow_checks=self._shadow_checks,
                false_skips=self._false_skips,
            )


def _calibrated_threshold(model: OneClassSVM, data: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of leave-one-out-style scores of the training rows ``data`` (shape (n, dim)).

    A support vector's own term ``alpha_i * k(x_i, x_i)`` (k = 1 for the RBF kernel) is what an unseen point at the
    same place would lack; removing it makes training scores comparable with those of new queries.
    """
    scores = model.decision_function(data)
    scores[model.support_] -= model.dual_coef_[0]
    return float(np.quantile(scores, quantile))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"HitPredictor.{field} must be {expected}, got {value!r}")
