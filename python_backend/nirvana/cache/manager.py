"""ApproximateCache: the cache as the request path sees it — lookup, admit, evict.

The parts are passed in (`factory.open_cache` builds the production composition from a `CacheConfig`): the store of
record (`records.PromptIndex`; Milvus in production, written behind), the in-process `mirror` of it that lookups
search, and the `latents` blob store. The cache builds the pure in-memory parts from the config: `policy` (LCBFU),
`selection` (similarity → K), `predictor` (skip retrieval for novel prompts) and `probing`. It delegates the
search (`matching`: candidates and the random choice among near-equal ones), the write path (`admission`: checks,
budgets, bound writes) and what a served latent must be (`integrity`: verified loads, entry ids for `invalidate`).

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
from typing import TYPE_CHECKING

import numpy as np

from nirvana.cache.admission import Admission
from nirvana.cache.budget import Budget
from nirvana.cache.integrity import entry_id, load_checked, parse_entry_id, still_served
from nirvana.cache.latents import BlobCorrupt, BlobMissing, LatentStore
from nirvana.cache.matching import Matcher
from nirvana.cache.mirror import Mirror
from nirvana.cache.outcome import CacheCounters, Lookup, Reason
from nirvana.cache.predictor import HitPredictor
from nirvana.cache.probing import ProbeMonitor
from nirvana.cache.records import PromptIndex, PromptRecord, blob_key, record_id
from nirvana.cache.validation import InvalidLatent, InvalidRow
from nirvana.config import CacheConfig

if TYPE_CHECKING:
    from nirvana.cache.replicas import ReplicaSync

__all__ = ["ApproximateCache", "CacheCounters", "InvalidLatent", "InvalidRow", "Lookup", "Reason", "blob_key"]

log = logging.getLogger(__name__)

SHARED_TENANT = "*"  # the one partition used when tenant isolation is off


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
        if mirror.order.keep_per_prompt != config.min_entries_per_prompt:
            raise ValueError(
                f"mirror keeps {mirror.order.keep_per_prompt} entries per prompt in its eviction order, config "
                f"min_entries_per_prompt={config.min_entries_per_prompt}: build it with Mirror(..., keep_per_prompt=)"
            )
        # At close, before the index closes (a milvus-lite file stays locked meanwhile): the mirror snapshot
        self._on_close = on_close
        self.open_timings = open_timings if open_timings is not None else {}  # phases of the open, in seconds
        self.replica = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.selector = config.selection.selector()
        self.budget = Budget(config)
        self.policy = self.budget.policy
        self.counters = counters or CacheCounters()
        self.replicas = replicas
        if replicas is not None:
            replicas.replica = self.replica  # never retired by its own refresh
        self.predictor = HitPredictor(**config.predictor.model_dump())
        self.probes = ProbeMonitor()
        self.matcher = Matcher(config, mirror)
        self._admission = Admission(mirror, latents, self.budget, self.counters, clock, self._drop_entry)
        self._lock = mirror.lock  # one lock for the mirror and the counters
        self.closed = threading.Event()  # background parts (reconnect, refresh) stop when it is set
        # Set once the mirror agrees with the store of record (`open_cache` replaces it: a large restart from the
        # snapshot is published before it has caught up with Milvus)
        self.caught_up = threading.Event()
        self.caught_up.set()
        self.index: PromptIndex | None = None  # None while unreachable: requests are served uncached
        if index is not None:
            self.attach(index)

    def attach(self, index: PromptIndex) -> bool:
        """Start using the store of record, once the mirror holds what it stores. False if the cache was closed
        meanwhile (the caller then closes the index)."""
        self.predictor.maybe_refit(len(self.mirror), self._predictor_sample)
        with self._lock:
            if self.closed.is_set():
                return False
            self.index = index  # published last: lookups start using the cache only once it is complete
        return True

    def detach(self) -> None:
        """Stop using the store of record (the latent directory turned out unreadable): requests are served uncached;
        the index is closed."""
        with self._lock:
            index, self.index = self.index, None
        if index is not None:
            index.close()

    def _predictor_sample(self) -> np.ndarray:
        """The hit predictor's training sample, drawn by the mirror (not every vector: a million is 3 GB)."""
        return self.mirror.vectors(self.predictor.max_fit_samples)

    @property
    def available(self) -> bool:
        return self.index is not None

    # -- lookup ----------------------------------------------------------------------------------------
    def tenant_partition(self, tenant: str) -> str:
        return tenant if self.config.tenant_isolation else SHARED_TENANT

    def lookup(
        self,
        vector: np.ndarray,
        cache_key: str,
        tenant: str,
        num_steps: int,
        expected_shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> Lookup:
        """Find the best cached latent for this request, load it, and count the hit. `expected_shapes` (array name
        → shape, e.g. {"latent": (1, 4, 64, 64)}): a cached latent shaped otherwise is removed and the lookup
        misses, as for a non-finite or damaged one."""
        timings: dict[str, float] = {}
        index = self.index
        if index is None:
            with self._lock:
                self.counters.unavailable += 1
            return self._miss(Lookup(False, Reason.CACHE_UNAVAILABLE, timings_ms=timings))
        t0 = time.perf_counter()
        novel = self.predictor.is_novel(vector)
        if novel and not self.predictor.should_shadow():
            return self._miss(Lookup(False, Reason.PREDICTED_NOVEL, timings_ms=timings))
        match = self.matcher.best(index, cache_key, self.tenant_partition(tenant), vector)
        t1 = time.perf_counter()
        timings["search_ms"] = (t1 - t0) * 1e3
        if match is None:
            return self._miss(Lookup(False, Reason.EMPTY, timings_ms=timings))
        record = self.matcher.record(index, match.id)
        with self._lock:
            k = self.selector.choose(match.similarity, record.entries, num_steps) if record else None
        timings["select_ms"] = (time.perf_counter() - t1) * 1e3
        if novel:  # a shadow check: the predictor said novel; was it right?
            self.predictor.record_shadow(would_hit=k is not None)
            return self._miss(Lookup(False, Reason.PREDICTED_NOVEL, match.similarity, timings_ms=timings))
        if record is None or k is None:
            self.probes.observe(tenant, match.similarity, self.selector.thresholds[-1][0])
            return self._miss(Lookup(False, Reason.BELOW_THRESHOLD, match.similarity, timings_ms=timings))
        return self._load_hit(record, k, match.similarity, timings, expected_shapes)

    def _load_hit(
        self,
        record: PromptRecord,
        k: int,
        similarity: float,
        timings: dict[str, float],
        expected_shapes: dict[str, tuple[int, ...]] | None,
    ) -> Lookup:
        t0 = time.perf_counter()
        try:
            blob = load_checked(self.latents, record, k, expected_shapes)
        except (BlobMissing, BlobCorrupt, InvalidLatent) as err:
            reason = Reason.BLOB_MISSING if isinstance(err, BlobMissing) else Reason.BLOB_CORRUPT
            log.warning("cached latent %s unusable (%s): served as a miss, entry removed", blob_key(record.id, k), err)
            self._drop_entry(record.id, k)
            with self._lock:
                self.counters.repaired += 1
                self.counters.invalidated += not isinstance(err, BlobMissing)
            return self._miss(Lookup(False, reason, similarity, timings_ms=timings))
        timings["latent_load_ms"] = (time.perf_counter() - t0) * 1e3
        with self._lock:
            if k in record.entries:
                self.mirror.count_hit(record, k, self.replica, self._clock())
                self._put_quietly(record)
            self.counters.hits += 1
        served_by = entry_id(record.id, k, blob)
        return Lookup(True, Reason.HIT, similarity, k, record.prompt, blob.tensors, timings, blob.meta, served_by)

    def _put_quietly(self, record: PromptRecord, removed: list[int] | None = None) -> None:
        """Queue a hit count or removal; a row the store refuses (one stored by an earlier version, say) is logged,
        never the request's failure."""
        try:
            self.index.put(self.mirror.stored(record), removed=removed or ())
        except InvalidRow as err:
            log.warning("cache row %016x not written back: %s", record.id, err)

    def invalidate(self, entry_id: str, tenant: str | None = None) -> bool:
        """Remove the entry that served a hit (`Lookup.entry_id`) because its latent turned out unusable (e.g. the
        UNet produced NaN from it): from the mirror, Milvus and disk, counted in `invalidated`. With `tenant`, only
        an entry of that tenant's partition. False if there is no such entry, or it was rewritten since that hit
        (a refresh: the new latent is not the one that failed). ValueError for an id no lookup gives."""
        ref = parse_entry_id(entry_id)
        with self._lock:
            record = self.mirror.get(ref.row_id)
            if record is None or ref.k not in record.entries:
                return False
            if tenant is not None and record.tenant != self.tenant_partition(tenant):
                return False
        if not still_served(self.latents, ref):
            return False
        log.warning("cache entry %s invalidated: its latent was unusable", ref.key)
        self._drop_entry(ref.row_id, ref.k)
        with self._lock:
            self.counters.invalidated += 1
        return True

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
        """Save a generated request's latents (K → ResumeState arrays). Returns how many were written; raises
        InvalidRow / InvalidLatent (counted in `rejected`), before writing anything, for ones that must not be cached.

        Ks the prompt already has are kept unless `replace` (CACHE_MODE=refresh), which rewrites their latents
        and keeps their hit counts. `meta` (small, JSON) is stored with each latent and returned on a hit."""
        index = self.index
        if index is None:
            return 0  # nothing is admitted while Milvus, the store of record, is unreachable
        partition = self.tenant_partition(tenant)
        written = self._admission.admit(index, prompt, vector, cache_key, partition, states, replace, meta)
        if written:
            self._refit_predictor()
        return written

    def _refit_predictor(self) -> None:
        self.predictor.refit_in_background(lambda: len(self.mirror), self._predictor_sample)

    def _drop_entry(self, row_id: int, k: int) -> None:
        """Remove one latent; the prompt leaves the index with its last latent."""
        self.latents.delete(blob_key(row_id, k))
        with self._lock:
            record = self.mirror.pop_entry(row_id, k)
            if record is not None:
                self._put_quietly(record, removed=[k])  # the row goes at flush if no replica holds another K of it

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
            "dropped_rows": getattr(self.index, "dropped_rows", 0),  # rows Milvus refused at a flush (`index`)
            "tenants": len(self.mirror.tenants()),
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
