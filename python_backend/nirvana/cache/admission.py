"""Admission: how a generated request's latents enter the cache — checked, made room for, written bound, recorded.

The order is the safety argument. The row and its latents are validated before anything is written (`check`): a
row Milvus would refuse must not reach the write-behind buffer, where it would block every later flush, and a
non-finite latent must never be cached. Room is then made inside the tenant's budget and the global one
(`budget.Budget`), before any latent is written. Each latent is written bound to its row, cache key, tenant
partition and K (`latents.Binding`), so a lookup refuses a blob that is not the one its row refers to. Only latents
that were written enter the mirror and the store of record's queue (`record`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from nirvana.cache.budget import Budget
from nirvana.cache.latents import Binding, LatentStore
from nirvana.cache.mirror import Mirror
from nirvana.cache.outcome import CacheCounters
from nirvana.cache.policy import BudgetInfeasible
from nirvana.cache.records import EntryMeta, PromptIndex, PromptRecord, blob_key, record_id
from nirvana.cache.validation import InvalidLatent, InvalidRow, check_latents, check_record

log = logging.getLogger(__name__)


class Admission:
    """The write side of one `ApproximateCache`, sharing its mirror (and the mirror's lock), latents and counters.
    `drop_entry(row_id, k)` removes an evicted entry everywhere (the cache's: lookups remove entries too)."""

    def __init__(
        self,
        mirror: Mirror,
        latents: LatentStore,
        budget: Budget,
        counters: CacheCounters,
        clock: Callable[[], float],
        drop_entry: Callable[[int, int], None],
    ) -> None:
        self.mirror, self.latents, self.budget, self.counters = mirror, latents, budget, counters
        self._clock, self._drop_entry = clock, drop_entry
        self._lock: threading.RLock = mirror.lock

    def admit(
        self,
        index: PromptIndex,
        prompt: str,
        vector: np.ndarray,
        cache_key: str,
        partition: str,
        states: dict[int, dict[str, np.ndarray]],
        replace: bool,
        meta: dict | None,
    ) -> int:
        """`ApproximateCache.admit` once the tenant is mapped to its partition: returns how many latents were written.
        Raises InvalidRow / InvalidLatent (counted in `rejected`) before anything is written."""
        row_id = record_id(cache_key, partition, prompt)
        self.check(row_id, prompt, vector, cache_key, partition, states)
        with self._lock:
            existing = self.mirror.get(row_id)
            have = set(existing.entries) if existing else set()
        ks = sorted(states) if replace else [k for k in sorted(states) if k not in have]
        if not ks:
            return 0
        blob_meta = {k: {**(meta or {}), "k": k} for k in ks}
        bindings = {k: Binding(row_id, cache_key, partition, k) for k in ks}
        new_ks = [k for k in ks if k not in have]  # a rewrite (refresh) takes no more entries
        try:  # encoded once, for the budget and for the write
            blobs = {k: self.latents.encode(states[k], blob_meta[k], bindings[k]) for k in ks}
        except (TypeError, ValueError) as err:  # e.g. fp16 overflow: the image is served, the admission dropped
            log.warning("admission of %r dropped: %s", prompt[:80], err)
            return 0
        incoming = sum(len(blobs[k]) for k in new_ks)
        try:
            self.evict(partition, len(new_ks), incoming)
        except BudgetInfeasible as err:
            log.warning("not admitting %r: %s", prompt[:80], err)
            return 0
        written: dict[int, int] = {}
        try:
            for k in ks:
                written[k] = self.latents.put_encoded(blob_key(row_id, k), blobs[k])
        except Exception as err:  # e.g. disk full, fp16 overflow: the image is served, the admission dropped
            for k in set(written) - have:
                self.latents.delete(blob_key(row_id, k))
            log.warning("admission of %r dropped: %s", prompt[:80], err)
            return 0
        self.record(index, row_id, prompt, vector, cache_key, partition, written)
        return len(written)

    def check(
        self,
        row_id: int,
        prompt: str,
        vector: np.ndarray,
        cache_key: str,
        partition: str,
        states: dict[int, dict[str, np.ndarray]],
    ) -> None:
        """InvalidRow / InvalidLatent, counted in `rejected`, for a row or latents that must not be cached."""
        try:
            entries = {k: EntryMeta() for k in states}
            record = PromptRecord(row_id, prompt, cache_key, partition, np.asarray(vector), self._clock(), entries)
            check_record(record, self.mirror.dim)
            for arrays in states.values():
                check_latents(arrays)
        except (InvalidRow, InvalidLatent):
            with self._lock:
                self.counters.rejected += 1
            raise

    def evict(self, partition: str, incoming_entries: int, incoming_bytes: int) -> None:
        """Make room: inside the tenant's budget first, then the global one. BudgetInfeasible if it cannot fit."""
        victims = self.budget.victims(
            self.mirror, self.latents.total_bytes, partition, incoming_entries, incoming_bytes
        )
        for victim in victims:
            self._drop_entry(victim.prompt_id, victim.k)
        with self._lock:
            self.counters.evictions += len(victims)

    def record(
        self,
        index: PromptIndex,
        row_id: int,
        prompt: str,
        vector: np.ndarray,
        cache_key: str,
        partition: str,
        written: dict[int, int],
    ) -> None:
        """Enter written latents (K → bytes on disk) in the mirror and queue them for the store of record."""
        now = self._clock()
        with self._lock:
            record = self.mirror.get(row_id)
            if record is None:
                record = PromptRecord(row_id, prompt, cache_key, partition, np.asarray(vector, np.float32), now)
                self.mirror.add(record)
            for k, nbytes in written.items():
                old = record.entries.get(k)
                hits = dict(old.replica_hits) if old else {}  # a rewrite (refresh) keeps the hit counts
                self.mirror.put_entry(record, k, EntryMeta(last_access=now, nbytes=nbytes, replica_hits=hits))
            index.put(self.mirror.stored(record), added=written)
            self.counters.admitted += len(written)
