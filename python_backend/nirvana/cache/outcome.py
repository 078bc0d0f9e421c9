"""What the cache answered for one request: `Lookup`, and why it hit or missed: `Reason`."""

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
    BLOB_CORRUPT = "blob-corrupt"  # the entry's latent is damaged: entry removed
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
