"""LCBFU eviction: Least Computationally Beneficial and Frequently Used (NIRVANA).

Each cached latent is one ``(prompt, K)`` entry. Its score is ``hits × K``: a latent at a large K saves more
compute per hit, and one that is hit often saves it often. The lowest scores are evicted first. This module only
decides *which* entries go; the caller deletes them from the latent store and the vector index (and drops a prompt
from the index when its last latent goes, see :func:`emptied_prompts`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


class InvalidBudget(ValueError):
    """A policy limit is not a positive int (the message names the field and the value)."""


class BudgetInfeasible(ValueError):
    """The incoming entries alone exceed the budget: evicting everything would not make room."""


@dataclass(frozen=True)
class EntryStats:
    """What the policy needs to know about one cached latent.

    ``k`` is the number of denoising steps the latent skips, ``hits`` how often it was reused (0 for a fresh entry),
    ``last_access`` a timestamp in seconds (any monotone clock), ``nbytes`` its size in the latent store.
    """

    prompt_id: int
    k: int
    hits: int
    last_access: float
    nbytes: int

    @property
    def score(self) -> int:
        """NIRVANA's LCBFU score: hits × K (0 until the entry is first reused)."""
        return self.hits * self.k


def eviction_order(entry: EntryStats) -> tuple:
    """Sort key: lowest score first, then least recently used, then (prompt_id, k) so the order is total."""
    return (entry.score, entry.last_access, entry.prompt_id, entry.k, entry.hits, entry.nbytes)


class LCBFUPolicy:
    """Chooses LCBFU victims under an entry-count and/or byte budget.

    ``min_entries_per_prompt`` (suggested by NIRVANA's follow-up analysis) keeps that many of each prompt's best
    entries while other entries can be evicted instead, so a prompt's small-K latents are not all lost to the many
    large-K ones. It is a preference, not a guarantee: the budget is a hard limit, so when evicting every
    unprotected entry is not enough, protected entries are taken too, in the same LCBFU order.
    """

    def __init__(
        self, max_entries: int | None = None, max_bytes: int | None = None, min_entries_per_prompt: int = 0
    ) -> None:
        self.max_entries = _check_limit("max_entries", max_entries, allow_none=True, minimum=1)
        self.max_bytes = _check_limit("max_bytes", max_bytes, allow_none=True, minimum=1)
        self.min_entries_per_prompt = _check_limit(
            "min_entries_per_prompt", min_entries_per_prompt, allow_none=False, minimum=0
        )

    def __repr__(self) -> str:
        return (
            f"LCBFUPolicy(max_entries={self.max_entries}, max_bytes={self.max_bytes}, "
            f"min_entries_per_prompt={self.min_entries_per_prompt})"
        )

    def over_budget(self, entries: int, nbytes: int) -> bool:
        """Whether a cache holding ``entries`` latents of ``nbytes`` bytes in total exceeds a limit."""
        return (self.max_entries is not None and entries > self.max_entries) or (
            self.max_bytes is not None and nbytes > self.max_bytes
        )

    def victims(
        self, entries: Iterable[EntryStats], incoming_entries: int = 0, incoming_bytes: int = 0
    ) -> list[EntryStats]:
        """Entries to evict so that the cache plus the incoming entries fits the budget, in eviction order.

        Victims are taken in :func:`eviction_order` and the taking stops as soon as the budget is met, so no more are
        returned than needed for that order ([] when already within budget). First pass: only entries whose prompt
        keeps more than ``min_entries_per_prompt`` entries. Second pass, only if that was not enough: the protected
        entries, in the same order. The result does not depend on the order of ``entries``.

        Raises BudgetInfeasible when the incoming entries alone exceed the budget (check with
        ``over_budget(incoming_entries, incoming_bytes)`` before admitting).
        """
        if incoming_entries < 0 or incoming_bytes < 0:
            raise ValueError(f"incoming sizes must be >= 0, got entries={incoming_entries}, bytes={incoming_bytes}")
        if self.over_budget(incoming_entries, incoming_bytes):
            raise BudgetInfeasible(
                f"incoming {incoming_entries} entries / {incoming_bytes} bytes exceed the budget "
                f"(max_entries={self.max_entries}, max_bytes={self.max_bytes})"
            )
        ordered = sorted(entries, key=eviction_order)
        count = len(ordered) + incoming_entries
        nbytes = sum(e.nbytes for e in ordered) + incoming_bytes
        if not self.over_budget(count, nbytes):
            return []

        remaining = Counter(e.prompt_id for e in ordered)
        chosen: list[EntryStats] = []
        protected: list[EntryStats] = []
        for entry in ordered:
            # Entries of one prompt come in their own LCBFU order, so this keeps each prompt's best entries.
            if remaining[entry.prompt_id] <= self.min_entries_per_prompt:
                protected.append(entry)
                continue
            remaining[entry.prompt_id] -= 1
            chosen.append(entry)
            count, nbytes = count - 1, nbytes - entry.nbytes
            if not self.over_budget(count, nbytes):
                return chosen
        for entry in protected:
            chosen.append(entry)
            count, nbytes = count - 1, nbytes - entry.nbytes
            if not self.over_budget(count, nbytes):
                return chosen
        raise AssertionError("unreachable: evicting every entry meets any budget the incoming entries fit")


def emptied_prompts(entries: Iterable[EntryStats], victims: Iterable[EntryStats]) -> set[int]:
    """Prompts all of whose latents are among ``victims``: the caller removes them from the vector index."""
    evicted = {(v.prompt_id, v.k) for v in victims}
    left = {e.prompt_id for e in entries if (e.prompt_id, e.k) not in evicted}
    return {prompt_id for prompt_id, _ in evicted} - left


def _check_limit(field: str, value: int | None, *, allow_none: bool, minimum: int) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise InvalidBudget(f"{field} must be {expected}, got {value!r}")
    return value
