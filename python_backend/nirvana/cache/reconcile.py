"""Reconciliation of the store of record with the latent directory, at open and (shared cache) shortly after.

A crash can leave a row whose latent was never written or already deleted (dangling entry), or a latent whose row
was never flushed (orphan). At open the cache mirrors Milvus and drops dangling entries, and removes orphan latents.
On a shared cache (a Milvus server, several replicas) a latent no row refers to may be another replica's whose row
is not flushed yet: such candidates are removed only after a grace period (`remove_orphans`, run by the replicas'
mirror refresh), and only if a read by id confirms no row refers to them.
"""

from __future__ import annotations

import logging
import time

from nirvana.cache.index import MilvusIndex
from nirvana.cache.latents import LatentStore
from nirvana.cache.manager import CacheCounters
from nirvana.cache.mirror import Mirror
from nirvana.cache.records import PromptRecord, blob_key, row_of
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)

MIN_ORPHAN_GRACE_S = 10.0


class Reconciler:
    """Loads Milvus into the mirror (`load`) and removes latents no row refers to (`load`, `remove_orphans`)."""

    def __init__(self, config: CacheConfig, mirror: Mirror, latents: LatentStore, counters: CacheCounters) -> None:
        self.config, self.mirror, self.latents, self.counters = config, mirror, latents, counters
        self.opened_at = time.monotonic()
        self._orphan_candidates: set[str] = set()  # unreferenced at open, on a shared cache

    def load(self, index: MilvusIndex) -> None:
        """Mirror Milvus in memory; drop entries whose blob is gone and blobs no entry refers to."""
        dangling = 0
        records: list[PromptRecord] = []
        for record in index.load_all():
            missing = [k for k in record.entries if blob_key(record.id, k) not in self.latents]
            for k in missing:
                del record.entries[k]
            dangling += len(missing)
            if missing:
                index.put(record, removed=missing)  # merged at flush: what another replica added stays
            if record.entries:
                records.append(record)
        self.mirror.add_many(records)
        unreferenced = sorted(set(self.latents.keys()) - self.mirror.blob_keys())
        if index.shared:  # another replica may have written a latent whose row it has not flushed yet
            self._orphan_candidates, unreferenced = set(unreferenced), []
        orphans = sum(self.latents.delete(key) > 0 for key in unreferenced)
        if dangling or orphans:
            log.warning(
                "cache reconciled: %d entries without a latent dropped, %d orphan latents removed", dangling, orphans
            )
        with self.mirror.lock:
            self.counters.repaired += dangling + orphans
        log.info(
            "cache open: %d prompts, %d latents, %d bytes",
            len(self.mirror),
            self.mirror.entries,
            self.latents.total_bytes,
        )

    def remove_orphans(self, index: MilvusIndex) -> None:
        """Latents no row referred to at open, and still none now that other replicas had time to flush theirs."""
        grace = max(MIN_ORPHAN_GRACE_S, 3 * self.config.flush_interval_s)
        if not self._orphan_candidates or time.monotonic() - self.opened_at < grace:
            return
        candidates = self._orphan_candidates - self.mirror.blob_keys()
        stored = index.fetch({row_of(key) for key in candidates})  # confirmed by id: a scan can miss rows
        wanted = {blob_key(row_id, k) for row_id, r in stored.items() for k in r.entries}
        orphans = sum(self.latents.delete(key) > 0 for key in candidates - wanted)
        self._orphan_candidates = set()
        if orphans:
            log.warning("cache reconciled: %d orphan latents removed", orphans)
            with self.mirror.lock:
                self.counters.repaired += orphans
