"""Cache test helpers: an in-memory store of record, so the request path is tested without milvus-lite."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

from nirvana.cache.latents import LatentStore
from nirvana.cache.manager import ApproximateCache
from nirvana.cache.mirror import Mirror
from nirvana.cache.records import PromptRecord, RowChange, merge_entries
from nirvana.config import CacheConfig, PredictorConfig


class InMemoryIndex:
    """`records.PromptIndex` in a dict, standing for Milvus: each write lands at once, merged as a Milvus flush
    merges it (`merge_entries`), and a row with no entries left is deleted."""

    shared = False

    def __init__(self) -> None:
        self.rows: dict[int, PromptRecord] = {}
        self.closed = False

    def put(self, record: PromptRecord, added: Iterable[int] = (), removed: Iterable[int] = ()) -> None:
        change = RowChange(record.snapshot(), set(added), set(removed))
        old = self.rows.get(record.id)
        entries = merge_entries(old.entries if old else None, change.record.entries, change)
        if entries:
            change.record.entries = entries
            self.rows[record.id] = change.record
        else:
            self.rows.pop(record.id, None)

    def fetch(self, ids: Iterable[int]) -> dict[int, PromptRecord]:
        return {row_id: self.rows[row_id].snapshot() for row_id in ids if row_id in self.rows}

    def search(self, vector: np.ndarray, cache_key: str, tenant: str | None) -> tuple[int, float] | None:
        rows = [r for r in self.rows.values() if r.cache_key == cache_key and tenant in (None, r.tenant)]
        if not rows:
            return None
        best = max(rows, key=lambda r: float(r.vector @ vector))
        return best.id, float(best.vector @ vector)

    def flush(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


MemoryCacheFactory = Callable[..., ApproximateCache]


@pytest.fixture
def memory_cache(tmp_path: Path) -> MemoryCacheFactory:
    """Builds an ApproximateCache over an InMemoryIndex and a latent directory under tmp_path: `memory_cache(dim,
    clock=..., **config fields)`; the predictor is off and no entries are protected unless the fields say so."""

    def make(dim: int, clock: Callable[[], float] | None = None, **fields: object) -> ApproximateCache:
        defaults = {"predictor": PredictorConfig(enabled=False), "min_entries_per_prompt": 0}
        config = CacheConfig(dir=tmp_path / "cache", **{**defaults, **fields})
        latents = LatentStore(config.latent_dir, dtype=config.latent_dtype)
        extra = {} if clock is None else {"clock": clock}
        return ApproximateCache(
            config, Mirror(dim, config.search, config.min_entries_per_prompt), latents, InMemoryIndex(), **extra
        )

    return make
