"""ApproximateCache: the cache as the request path sees it — lookup, admit, evict.

The parts are passed in (`factory.open_cache` builds the production composition from a `CacheConfig`): the store of
record (`records.PromptIndex`; Milvus in production, written behind), the in-process `mirror` of it that lookups
search, and the `latents` blob store. The cache builds the pure in-memory parts from the config: `policy` (LCBFU),
`selection` (similarity → K), `predictor` (skip retrieval for novel prompts) and `probing`.

While the store of record is unreachable (`index` is None) requests are served uncached and nothing is admitted;
`attach` publishes the index once the mirror holds what it stores (`connection`). Several replicas (processes) may
share one cache; `replicas.ReplicaSync` keeps this one's mirror up to date. Between refreshes a replica may serve an
entry another one has just evicted: its latent is gone, which is a miss and removes the entry (as for any missing
latent).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nirvana.cache.latents import BlobCorrupt, BlobMissing, LatentStore
from nirvana.cache.mirror import Mirror
from nirvana.cache.outcome import Lookup, Reason
from nirvana.cache.policy import BudgetInfeasible, LCBFUPolicy
from nirvana.cache.predictor import HitPredictor
from nirvana.cache.probing import ProbeMonitor
from nirvana.cache.records import EntryMeta, PromptIndex, PromptRecord, blob_key, record_id
from nirvana.cache.search import Match
from nirvana.config import CacheConfig

if TYPE_CHECKING:
    from nirvana.cache.replicas import ReplicaSync

__all__ = ["ApproximateCache", "CacheCounters", "Lookup", "Reason", "blob_key"]

log = logging.getLogger(__name__)

SHARED_TENANT = "*"  # the one partition used when tenant isolation is off
EVICTION_SLACK = 0.02  # evict 2% below the budget so eviction (a scan of all entries) runs rarely


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    admitted: int = 0
    repaired: int = 0
    unavailable: int = 0  # requests served uncached because Milvus was unreachable


class ApproximateCache:
    """Thread-safe; one instance per process. Processes share a cache only through a Milvus server (a milvus-lite
    file admits one process); each then needs its own `replica_id` (default: host name and process id)."""

    def __init__(
        self,
        config: CacheConfig,
        mirror: Mirror,
        latents: LatentStore,
        index: PromptIndex | None = None,
        *,
        counters: CacheCounters | None = None,
        replicas: ReplicaSync | None = None,
        clock: Callable[[], float] = time.time,
        on_close: Callable[[], None] | None = None,
        open_timings: dict[str, float] | None = None,
    ) -> None:
        self.config, self.mirror, self.latents, self._clock = config, mirror, latents, clock
        # At close, before the index closes (a milvus-lite file stays locked meanwhile): the mirror snapshot
        self._on_close = on_close
        self.open_timings = open_timings if open_timings is not None else {}  # phases of the open, in seconds
        self.replica = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.selector = config.selection.selector()
        self.policy = LCBFUPolicy(config.max_entries, config.max_bytes, config.min_entries_per_prompt)
        self.counters = counters or CacheCounters()
        self.replicas = replicas
        self.predictor = HitPredictor(**config.predictor.model_dump())
        self.probes = ProbeMonitor()
        self._top_k = config.near_equal_candidates if config.near_equal_margin > 0 else 1
        self._rng = np.random.default_rng()
        self._lock = mirror.lock  # one lock for the mirror and the counters
        self.closed = threading.Event()  # background parts (reconnect, refresh) stop when it is set
        self.index: PromptIndex | None = None  # None while unreachable: requests are served uncached
        if index is not None:
            self.attach(index)

    def attach(self, index: PromptIndex) -> bool:
        """Start using the store of record, once the mirror holds what it stores. False if the cache was closed
        meanwhile (the caller then closes the index)."""
        self.predictor.maybe_refit(len(self.mirror), self.mirror.vectors)
        with self._lock:
            if self.closed.is_set():
                return False
            self.index = index  # published last: lookups start using the cache only once it is complete
        return True

    @property
    def available(self) -> bool:
        return self.index is not None

    # -- lookup ----------------------------------------------------------------------------------------
    def tenant_partition(self, tenant: str) -> str:
        return tenant if self.config.tenant_isolation else SHARED_TENANT

    def lookup(self, vector: np.ndarray, cache_key: str, tenant: str, num_steps: int) -> Lookup:
        """Find the best cached latent for this request, load it, and count the hit."""
        timings: dict[str, float] = {}
        if self.index is None:
            with self._lock:
                self.counters.unavailable += 1
            return self._miss(Lookup(False, Reason.CACHE_UNAVAILABLE, timings_ms=timings))
        t0 = time.perf_counter()
        novel = self.predictor.is_novel(vector)
        if novel and not self.predictor.should_shadow():
            return self._miss(Lookup(False, Reason.PREDICTED_NOVEL, timings_ms=timings))
        match = self._choose_match(self._candidates(cache_key, self.tenant_partition(tenant), vector))
        t1 = time.perf_counter()
        timings["search_ms"] = (t1 - t0) * 1e3
        if match is None:
            return self._miss(Lookup(False, Reason.EMPTY, timings_ms=timings))
        record = self.mirror.get(match.id)
        if record is None and self.config.search.backend == "milvus":
            record = self._adopt(match.id)  # found in Milvus, admitted by another replica since our last refresh
        with self._lock:
            k = self.selector.choose(match.similarity, record.entries, num_steps) if record else None
        timings["select_ms"] = (time.perf_counter() - t1) * 1e3
        if novel:  # a shadow check: the predictor said novel; was it right?
            self.predictor.record_shadow(would_hit=k is not None)
            return self._miss(Lookup(False, Reason.PREDICTED_NOVEL, match.similarity, timings_ms=timings))
        if record is None or k is None:
            self.probes.observe(tenant, match.similarity, self.selector.thresholds[-1][0])
            return self._miss(Lookup(False, Reason.BELOW_THRESHOLD, match.similarity, timings_ms=timings))
        return self._load_hit(record, k, match.similarity, timings)

    def _candidates(self, cache_key: str, partition: str, vector: np.ndarray) -> list[Match]:
        """Nearest cached prompts: from the in-process mirror, or (search.backend = "milvus") from Milvus itself."""
        if self.config.search.backend == "milvus" and self.index is not None:
            found = self.index.search(np.asarray(vector, np.float32), cache_key, partition)
            return [] if found is None else [Match(*found)]
        return self.mirror.top((cache_key, partition), vector, self._top_k)

    def _choose_match(self, matches: list[Match]) -> Match | None:
        """The best match, or with `near_equal_margin` > 0 a random one among those within the margin of the best:
        which cached prompt serves a request is then not a deterministic function of the query, which blunts
        prompt-reconstruction and targeted poisoning of a shared cache (USENIX Security'26)."""
        if not matches:
            return None
        margin = self.config.near_equal_margin
        if margin <= 0 or len(matches) == 1:
            return matches[0]
        close = [m for m in matches if m.similarity >= matches[0].similarity - margin]
        return close[int(self._rng.integers(len(close)))]

    def _adopt(self, row_id: int) -> PromptRecord | None:
        """Fetch one row into the mirror (search.backend = "milvus" found an id the mirror does not hold yet)."""
        found = self.index.fetch([row_id]).get(row_id) if self.index is not None else None
        if found is None or not found.entries:
            return None
        with self._lock:
            if row_id not in self.mirror:
                self.mirror.add(found)
            return self.mirror.get(row_id)

    def _load_hit(self, record: PromptRecord, k: int, similarity: float, timings: dict[str, float]) -> Lookup:
        t0 = time.perf_counter()
        key = blob_key(record.id, k)
        try:
            blob = self.latents.get(key)
        except (BlobMissing, BlobCorrupt) as err:
            reason = Reason.BLOB_MISSING if isinstance(err, BlobMissing) else Reason.BLOB_CORRUPT
            log.warning("cached latent %s unusable (%s): served as a miss, entry removed", key, err)
            self._drop_entry(record.id, k)
            with self._lock:
                self.counters.repaired += 1
            return self._miss(Lookup(False, reason, similarity, timings_ms=timings))
        timings["latent_load_ms"] = (time.perf_counter() - t0) * 1e3
        with self._lock:
            meta = record.entries.get(k)
            if meta is not None:
                meta.count_hit(self.replica, self._clock())
                self.index.put(record)
            self.counters.hits += 1
        return Lookup(True, Reason.HIT, similarity, k, record.prompt, blob.tensors, timings, blob.meta)

    def _miss(self, lookup: Lookup) -> Lookup:
        with self._lock:
            self.counters.misses += 1
        return lookup

    # -- admission and eviction ---------------------------------------------------------------------
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
        """Save a generated request's latents (K → ResumeState arrays). Returns how many were written.

        Ks the prompt already has are kept unless `replace` (CACHE_MODE=refresh), which rewrites their latents
        and keeps their hit counts. `meta` (small, JSON) is stored with each latent and returned on a hit.
        """
        if self.index is None:
            return 0  # nothing is admitted while Milvus, the store of record, is unreachable
        tenant = self.tenant_partition(tenant)
        row_id = record_id(cache_key, tenant, prompt)
        with self._lock:
            existing = self.mirror.get(row_id)
            have = set(existing.entries) if existing else set()
        ks = sorted(states) if replace else [k for k in sorted(states) if k not in have]
        if not ks:
            return 0
        blob_meta = {k: {**(meta or {}), "k": k} for k in ks}
        new_ks = [k for k in ks if k not in have]
        incoming = sum(self.latents.encoded_size(states[k], blob_meta[k]) for k in new_ks)
        try:
            self._evict(len(new_ks), incoming)
        except BudgetInfeasible as err:
            log.warning("not admitting %r: %s", prompt[:80], err)
            return 0
        written: dict[int, int] = {}
        try:
            for k in ks:
                written[k] = self.latents.put(blob_key(row_id, k), states[k], blob_meta[k])
        except Exception as err:  # e.g. disk full, fp16 overflow: the image is served, the admission dropped
            for k in set(written) - have:
                self.latents.delete(blob_key(row_id, k))
            log.warning("admission of %r dropped: %s", prompt[:80], err)
            return 0
        self._record_admission(row_id, prompt, vector, cache_key, tenant, written)
        self._refit_predictor()
        return len(written)

    def _record_admission(
        self, row_id: int, prompt: str, vector: np.ndarray, cache_key: str, tenant: str, written: dict[int, int]
    ) -> None:
        """Enter written latents (K → bytes on disk) in the mirror and queue them for the store of record."""
        now = self._clock()
        with self._lock:
            record = self.mirror.get(row_id)
            if record is None:
                record = PromptRecord(row_id, prompt, cache_key, tenant, np.asarray(vector, np.float32), now)
                self.mirror.add(record)
            for k, nbytes in written.items():
                old = record.entries.get(k)
                hits = dict(old.replica_hits) if old else {}  # a rewrite (refresh) keeps the hit counts
                self.mirror.put_entry(record, k, EntryMeta(last_access=now, nbytes=nbytes, replica_hits=hits))
            self.index.put(record, added=written)
            self.counters.admitted += len(written)

    def _refit_predictor(self) -> None:
        self.predictor.refit_in_background(lambda: len(self.mirror), self.mirror.vectors)

    def _evict(self, incoming_entries: int, incoming_bytes: int) -> None:
        if not self.policy.over_budget(self.mirror.entries + incoming_entries, self.total_bytes + incoming_bytes):
            return
        slack_entries = int((self.config.max_entries or 0) * EVICTION_SLACK)
        slack_bytes = int((self.config.max_bytes or 0) * EVICTION_SLACK)
        stats = self.mirror.entry_stats()
        try:
            victims = self.policy.victims(stats, incoming_entries + slack_entries, incoming_bytes + slack_bytes)
        except BudgetInfeasible:  # the slack does not fit a tiny budget: evict just enough
            victims = self.policy.victims(stats, incoming_entries, incoming_bytes)
        for victim in victims:
            self._drop_entry(victim.prompt_id, victim.k)
        with self._lock:
            self.counters.evictions += len(victims)

    def _drop_entry(self, row_id: int, k: int) -> None:
        """Remove one latent; the prompt leaves the index with its last latent."""
        self.latents.delete(blob_key(row_id, k))
        with self._lock:
            record = self.mirror.pop_entry(row_id, k)
            if record is not None:
                self.index.put(record, removed=[k])  # the row goes at flush if no replica holds another K of it

    # -- introspection ------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.latents.total_bytes

    @property
    def entries(self) -> int:
        return self.mirror.entries

    def __len__(self) -> int:
        return len(self.mirror)

    def record(self, cache_key: str, tenant: str, prompt: str) -> PromptRecord | None:
        return self.mirror.get(record_id(cache_key, self.tenant_partition(tenant), prompt))

    def stats(self) -> dict:
        return {
            "prompts": len(self.mirror),
            "entries": self.mirror.entries,
            "bytes": self.total_bytes,
            **vars(self.counters),
            "predictor": vars(self.predictor.stats()),
            "near_misses": self.probes.near_misses,
            "probing_suspects": self.probes.suspects(),
        }

    # -- lifecycle ----------------------------------------------------------------------------------
    def refresh(self) -> dict[str, int]:
        """Bring the mirror up to date with what other replicas wrote (see `ReplicaSync.refresh`); {} without."""
        index = self.index
        if self.replicas is None or index is None:
            return {}
        return self.replicas.refresh(index)

    def flush(self) -> None:
        if self.index is not None:
            self.index.flush()

    def close(self) -> None:
        """Stop background work, flush and disconnect. On a shared store, settle replica counts first
        (`ReplicaSync.settle`, about flush_interval_s + 1 s)."""
        with self._lock:
            self.closed.set()
            index = self.index
        if index is None:
            return
        if index.shared and self.replicas is not None:
            try:
                self.replicas.settle(index)
            except Exception as err:
                log.warning("last cache mirror refresh failed (hit counts may be behind): %s", err)
        if self._on_close is not None:
            self._on_close()
        index.close()
