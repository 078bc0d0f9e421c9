"""`CacheClient`: what the request path needs of a cache, wherever the cache lives.

In process it is `ApproximateCache` itself (`factory.open_cache`); served, the `nirvana` orchestrator instances
reach the one `cache` model that owns the state through BLS (`nirvana.runtime.cache_client.BlsCache`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from nirvana.cache.outcome import Lookup
from nirvana.k_choice import KSelector


class CacheClient(Protocol):
    selector: KSelector  # which Ks a generated request captures for admission

    def lookup(self, vector: np.ndarray, cache_key: str, tenant: str, num_steps: int) -> Lookup:
        """The best cached latent for this request (prompt embedding `vector` float32 [dim]), its hit counted."""
        ...

    def admit(
        self,
        prompt: str,
        vector: np.ndarray,
        cache_key: str,
        tenant: str,
        states: dict[int, dict[str, np.ndarray]],
        replace: bool = False,
        meta: dict | None = None,
    ) -> int:
        """Save a generated request's latents (K → ResumeState arrays); returns how many were written."""
        ...

    def invalidate(self, entry_id: str, tenant: str) -> bool:
        """Remove the entry that served a hit (`Lookup.entry_id`) whose latent turned out unusable (e.g. the UNet made
        NaN from it); False when it is gone already."""
        ...

    def close(self) -> None: ...
