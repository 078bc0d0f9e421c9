"""Similarity → number of denoising steps to skip (K).

NIRVANA maps the cosine similarity between a new prompt and its nearest cached prompt to ``K_opt``: the largest
number of steps whose cached latent still yields a faithful image. The table below is the paper's, for CLIP text
features and N = 50 steps; it belongs to that embedder and must be calibrated for another one (pass a different
``thresholds`` from configuration). For other step counts the Ks are scaled proportionally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# (similarity threshold, K) at the reference step count N = 50, from NIRVANA: s > 0.95 → skip 25 steps, ...
DEFAULT_THRESHOLDS: tuple[tuple[float, int], ...] = ((0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5))
DEFAULT_REFERENCE_STEPS = 50


class InvalidThresholds(ValueError):
    """The similarity → K table is malformed (the message names the offending pair)."""


def scale_k(k: int, num_steps: int, reference_steps: int = DEFAULT_REFERENCE_STEPS) -> int:
    """Scale a K defined at ``reference_steps`` to a run of ``num_steps`` denoising steps.

    Returns ``round(k * num_steps / reference_steps)`` with halves rounded up (not Python's banker's rounding, so
    that N = 25 gives the evenly spread 3, 5, 8, 10, 13), at least 1 when ``k > 0`` (a hit always skips something)
    and always below ``num_steps`` (at least one step must run with the new prompt's conditioning). With
    ``num_steps == 1`` nothing can be skipped and the result is 0.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if reference_steps < 1:
        raise ValueError(f"reference_steps must be >= 1, got {reference_steps}")
    if k == 0:
        return 0
    # Integer half-up rounding: floor(k * N / ref + 1/2), exact for all ints.
    scaled = (2 * k * num_steps + reference_steps) // (2 * reference_steps)
    return min(max(scaled, 1), num_steps - 1)


@dataclass(frozen=True)
class KSelector:
    """Chooses how many denoising steps a cache hit may skip.

    ``thresholds`` are ``(similarity, K)`` pairs at ``reference_steps``, similarities strictly decreasing and Ks
    strictly decreasing; a similarity strictly greater than a threshold earns that pair's K (the paper uses ">").
    """

    thresholds: tuple[tuple[float, int], ...] = DEFAULT_THRESHOLDS
    reference_steps: int = DEFAULT_REFERENCE_STEPS

    def __post_init__(self) -> None:
        if isinstance(self.reference_steps, bool) or not isinstance(self.reference_steps, int):
            raise InvalidThresholds(f"reference_steps must be an int, got {self.reference_steps!r}")
        if self.reference_steps < 2:
            raise InvalidThresholds(f"reference_steps must be >= 2, got {self.reference_steps}")
        # Accept lists from parsed configuration, but store an immutable, hashable tuple.
        try:
            pairs = tuple((float(s), k) for s, k in self.thresholds)
        except (TypeError, ValueError) as exc:
            raise InvalidThresholds(f"thresholds must be (similarity, K) pairs, got {self.thresholds!r}") from exc
        if not pairs:
            raise InvalidThresholds("thresholds must contain at least one (similarity, K) pair")
        for index, (similarity, k) in enumerate(pairs):
            _check_pair(index, similarity, k, self.reference_steps)
            if index > 0:
                prev_similarity, prev_k = pairs[index - 1]
                if not similarity < prev_similarity:
                    raise InvalidThresholds(
                        f"thresholds[{index}] = ({similarity}, {k}): similarity must be strictly below the previous "
                        f"pair's {prev_similarity}"
                    )
                if not k < prev_k:
                    raise InvalidThresholds(
                        f"thresholds[{index}] = ({similarity}, {k}): K must be strictly below the previous pair's "
                        f"{prev_k}"
                    )
        object.__setattr__(self, "thresholds", pairs)

    def k_opt(self, similarity: float, num_steps: int) -> int:
        """Largest K (in steps of a ``num_steps`` run) that ``similarity`` (cosine, in [-1, 1]) allows; 0 = miss."""
        for threshold, k in self.thresholds:
            if similarity > threshold:
                return scale_k(k, num_steps, self.reference_steps)
        return 0

    def admit_ks(self, num_steps: int) -> list[int]:
        """The distinct scaled Ks, ascending: the steps at which admission saves a request's latents."""
        scaled = {scale_k(k, num_steps, self.reference_steps) for _, k in self.thresholds}
        scaled.discard(0)
        return sorted(scaled)

    def choose(self, similarity: float, cached_ks: Iterable[int], num_steps: int) -> int | None:
        """The largest cached K not above ``k_opt(similarity)``, or None if no cached latent is usable."""
        limit = self.k_opt(similarity, num_steps)
        usable = [k for k in cached_ks if 0 < k <= limit]
        return max(usable) if usable else None


def _check_pair(index: int, similarity: float, k: object, reference_steps: int) -> None:
    """Validate one (similarity, K) pair on its own; raises InvalidThresholds naming it."""
    where = f"thresholds[{index}] = ({similarity}, {k!r})"
    # Written so that NaN fails too.
    if not -1.0 < similarity <= 1.0:
        raise InvalidThresholds(f"{where}: similarity must be in (-1, 1]")
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidThresholds(f"{where}: K must be an int")
    if not 0 < k < reference_steps:
        raise InvalidThresholds(f"{where}: K must be in [1, {reference_steps - 1}] (reference_steps={reference_steps})")
