"""What the cache answered for one request: `Lookup`, and why it hit or missed: `Reason`; what it did overall:
`CacheCounters` (here, not in `manager`, so that the parts `manager` composes can count without importing it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Reason(StrEnum):
    """Why a request hit or missed. The values appear in JSON reports, metrics and CLI output: keep them stable."""

    HIT = "hit"
    EMPTY = "empty"  # no cached prompt under this cache key and tenant
    BELOW_THRESHOLD = "below-threshold"  # the nearest cached prompt is too far for any K
    PREDICTED_NOVEL = "predicted-novel"  # the hit predictor skipped the search
    BLOB_MISSING = "blob-missing"  # the entry's latent is gone (e.g. evicted by another replica): entry removed
    BLOB_CORRUPT = "blob-corrupt"  # the entry's latent is damaged, not bound to its row, or unusable: entry removed
    CACHE_UNAVAILABLE = "cache-unavailable"  # Milvus, the store of record, is unreachable: served uncached
    BYPASS = "bypass"  # CACHE_MODE=bypass: no lookup, no admission
    REFRESH = "refresh"  # CACHE_MODE=refresh: no lookup, latents re-admitted
    NON_FINITE = "non-finite"  # a hit produced NaN/inf: the request was run again in full, uncached


@dataclass
class Lookup:
    """What the cache answered for one request."""

    hit: bool
    reason: Reason
    similarity: float | None = None  # of the best match, when a search ran
    k: int = 0  # steps skipped (0 on a miss)
    matched_prompt: str | None = None
    arrays: dict[str, np.ndarray] | None = None  # the ResumeState's arrays on a hit
    timings_ms: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # what admission stored beside the arrays (e.g. the negative prompt)
    # On a hit: names the cached entry that served it (opaque; `ApproximateCache.invalidate(entry_id)` removes it
    # when its latent turns out unusable later in the request, e.g. the UNet produced NaN from it)
    entry_id: str | None = None


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    admitted: int = 0
    repaired: int = 0
    unavailable: int = 0  # requests served uncached because Milvus was unreachable
    invalidated: int = 0  # entries removed because their latent was unusable (at load, or `invalidate`)
    rejected: int = 0  # admissions refused because their row or latents were invalid (InvalidRow, InvalidLatent)
