"""Which cached prompt a lookup considers: the nearest candidates, and a random one among the near-equal best.

Candidates come from the in-process mirror or, with `search.backend = "milvus"`, from Milvus itself; a row Milvus
finds that the mirror does not hold yet (admitted by another replica since the last refresh) is adopted into it.
With `near_equal_margin` > 0 the match is drawn at random among the best `near_equal_candidates` within that margin
of the best similarity: which cached prompt serves a request is then not a deterministic function of the query,
which blunts prompt reconstruction and targeted poisoning of a shared cache (USENIX Security'26).
"""

from __future__ import annotations

import numpy as np

from nirvana.cache.mirror import Mirror
from nirvana.cache.records import PromptIndex, PromptRecord
from nirvana.cache.search import Match
from nirvana.config import CacheConfig


class Matcher:
    """The search half of `ApproximateCache.lookup`; `rng` is seedable for tests (default: fresh entropy)."""

    def __init__(self, config: CacheConfig, mirror: Mirror, rng: np.random.Generator | None = None) -> None:
        self.config, self.mirror = config, mirror
        self.rng = rng if rng is not None else np.random.default_rng()
        # Without a margin only the best match can be chosen: search for one candidate, not several
        self.top_k = config.near_equal_candidates if config.near_equal_margin > 0 else 1

    def best(self, index: PromptIndex, cache_key: str, partition: str, vector: np.ndarray) -> Match | None:
        """The match that serves this request: the best candidate, or a random near-equal one (see the module)."""
        return self.choose(self.candidates(index, cache_key, partition, vector))

    def candidates(self, index: PromptIndex, cache_key: str, partition: str, vector: np.ndarray) -> list[Match]:
        """Nearest cached prompts, best first: from the mirror, or (search.backend = "milvus") from Milvus (top-1)."""
        if self.config.search.backend == "milvus":
            found = index.search(np.asarray(vector, np.float32), cache_key, partition)
            return [] if found is None else [Match(*found)]
        return self.mirror.top((cache_key, partition), vector, self.top_k)

    def choose(self, matches: list[Match]) -> Match | None:
        if not matches:
            return None
        margin = self.config.near_equal_margin
        if margin <= 0 or len(matches) == 1:
            return matches[0]
        close = [m for m in matches if m.similarity >= matches[0].similarity - margin]
        return close[int(self.rng.integers(len(close)))]

    def record(self, index: PromptIndex, row_id: int) -> PromptRecord | None:
        """The matched row from the mirror; with search.backend = "milvus" one the mirror lacks is fetched into it."""
        record = self.mirror.get(row_id)
        if record is not None or self.config.search.backend != "milvus":
            return record
        found = index.fetch([row_id]).get(row_id)
        if found is None or not found.entries:
            return None
        with self.mirror.lock:
            if row_id not in self.mirror:
                self.mirror.add(found)
            return self.mirror.get(row_id)
