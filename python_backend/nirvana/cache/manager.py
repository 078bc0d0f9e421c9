"""ApproximateCache: the cache as the request path sees it — lookup, admit, evict.

Composes the parts, each one module: `index` (Milvus, store of record, write-behind), `search` (in-process
mirror for the request path), `latents` (blob store), `policy` (LCBFU), `selection` (similarity → K) and
`predictor` (skip retrieval for novel prompts).

Several replicas (processes) may share one cache: one Milvus server and one latent directory. Each mirrors Milvus
at open and refreshes its mirror every `refresh_interval_s` (`refresh`): prompts another replica admitted become
hits here, entries it evicted leave. Between refreshes a replica may serve an entry another one has just evicted:
its latent is gone, which is a miss and removes the entry (as for any missing latent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nirvana.cache.index import (
    EntryMeta,
    MilvusIndex,
    PromptRecord,
    RowChange,
    is_server_uri,
    merge_entries,
    record_id,
)
from nirvana.cache.latents import BlobCorrupt, BlobMissing, LatentStore
from nirvana.cache.policy import BudgetInfeasible, EntryStats, LCBFUPolicy
from nirvana.cache.predictor import HitPredictor
from nirvana.cache.probing import ProbeMonitor
from nirvana.cache.search import Match, PartitionedSearch
from nirvana.config import CacheConfig

log = logging.getLogger(__name__)

SHARED_TENANT = "*"  # the one partition used when tenant isolation is off
EVICTION_SLACK = 0.02  # evict 2% below the budget so eviction (a scan of all entries) runs rarely
# At close on a shared Milvus: wait flush_interval_s + this for racing flushes of other replicas to land, then check.
SETTLE_MARGIN_S, SETTLE_ROUNDS = 1.0, 3


@dataclass
class Lookup:
    """What the cache answered for one request."""

    hit: bool
    reason: str  # hit | empty | below-threshold | predicted-novel | blob-missing | blob-corrupt
    similarity: float | None = None  # of the best match, when a search ran
    k: int = 0  # steps skipped (0 on a miss)
    matched_prompt: str | None = None
    arrays: dict[str, np.ndarray] | None = None  # the ResumeState's arrays on a hit
    timings_ms: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # what admission stored beside the arrays (e.g. the negative prompt)


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    admitted: int = 0
    repaired: int = 0
    unavailable: int = 0  # requests served uncached because Milvus was unreachable


def blob_key(row_id: int, k: int) -> str:
    return f"{row_id:016x}-k{k}"


def _ahead(mine: EntryMeta, stored: EntryMeta) -> bool:
    """Whether some replica's count in `mine` is larger than in `stored` (a racing flush overwrote it)."""
    return any(n > stored.replica_hits.get(replica, 0) for replica, n in mine.replica_hits.items())


def _row_of(key: str) -> int:
    """The row id in a blob key (-1 for a key that is not one of ours: no row refers to it)."""
    try:
        return int(key.split("-k")[0], 16)
    except ValueError:
        return -1


class ApproximateCache:
    """Thread-safe; one instance per process. Processes share a cache only through a Milvus server (a milvus-lite
    file admits one process); each then needs its own `replica_id` (default: host name and process id)."""

    def __init__(self, config: CacheConfig, dim: int, clock: Callable[[], float] = time.time) -> None:
        self.config, self.dim, self._clock = config, dim, clock
        self.replica = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.selector = config.selection.selector()
        self.policy = LCBFUPolicy(config.max_entries, config.max_bytes, config.min_entries_per_prompt)
        self.counters = CacheCounters()
        s, p = config.search, config.predictor
        self._search = PartitionedSearch(dim, s.exact_max_rows, s.nprobe, s.tail_max_rows)
        self.predictor = HitPredictor(
            enabled=p.enabled,
            min_samples=p.min_samples,
            refit_growth=p.refit_growth,
            nu=p.nu,
            max_fit_samples=p.max_fit_samples,
            shadow_rate=p.shadow_rate,
        )
        self.probes = ProbeMonitor()
        self._top_k = config.near_equal_candidates if config.near_equal_margin > 0 else 1
        self._rng = np.random.default_rng()
        self._records: dict[int, PromptRecord] = {}
        self._entries = 0
        self._lock = threading.RLock()
        self._refitting = threading.Event()
        config.dir.mkdir(parents=True, exist_ok=True)
        self.latents = LatentStore(config.latent_dir, dtype=config.latent_dtype)
        self.index: MilvusIndex | None = None  # None while Milvus is unreachable: requests are served uncached
        self._closed = threading.Event()
        self._orphan_candidates: set[str] = set()  # latents unreferenced at open, on a shared cache (see refresh)
        self._opened_at = self._last_refresh_at = time.monotonic()
        if not self._connect():
            threading.Thread(target=self._reconnect_loop, name="milvus-reconnect", daemon=True).start()
        if is_server_uri(config.resolved_milvus_uri) and config.refresh_interval_s > 0:
            threading.Thread(target=self._refresh_loop, name="cache-refresh", daemon=True).start()

    # -- startup -------------------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Open Milvus and mirror it; on failure log, stay uncached, and let the caller retry."""
        uri = self.config.resolved_milvus_uri
        index = None
        try:
            index = MilvusIndex(
                uri, self.config.collection, self.dim, self.config.flush_interval_s, self.config.rpc_timeout_s
            )
            self._load_and_reconcile(index)
        except Exception as err:
            if index is not None:
                with contextlib.suppress(Exception):
                    index.close()
            self._reset_mirror()
            log.warning(
                "Milvus at %s unavailable (%s): serving uncached, retrying (at most every %.0f s)",
                uri,
                err,
                self.config.reconnect_interval_s,
            )
            return False
        with self._lock:
            if self._closed.is_set():  # close() ran while we were connecting: do not leak the client
                index.close()
                return True
            self.index = index  # published last: lookups start using the cache only once it is complete
        return True

    def _reset_mirror(self) -> None:
        s = self.config.search
        with self._lock:
            self._records, self._entries = {}, 0
            self._search = PartitionedSearch(self.dim, s.exact_max_rows, s.nprobe, s.tail_max_rows)

    def _reconnect_loop(self) -> None:
        # Back off from half a second: right after a restart the previous process may hold milvus-lite's lock
        # for a moment, and requests are served uncached until we get in.
        delay = min(0.5, self.config.reconnect_interval_s)
        while not self._closed.wait(delay):
            if self._connect():
                log.warning("Milvus at %s is back: caching resumed", self.config.resolved_milvus_uri)
                return
            delay = min(delay * 2, self.config.reconnect_interval_s)

    @property
    def available(self) -> bool:
        return self.index is not None

    def _load_and_reconcile(self, index: MilvusIndex) -> None:
        """Mirror Milvus in memory; drop entries whose blob is gone and blobs no entry refers to."""
        wanted: set[str] = set()
        dangling = 0
        by_partition: dict[tuple[str, str], list[PromptRecord]] = {}
        for record in index.load_all():
            missing = [k for k in record.entries if blob_key(record.id, k) not in self.latents]
            for k in missing:
                del record.entries[k]
            dangling += len(missing)
            if missing:
                index.put(record, removed=missing)  # merged at flush: what another replica added stays
            if not record.entries:
                continue
            wanted.update(blob_key(record.id, k) for k in record.entries)
            self._records[record.id] = record
            self._entries += len(record.entries)
            by_partition.setdefault((record.cache_key, record.tenant), []).append(record)
        for partition, records in by_partition.items():
            ids = np.array([r.id for r in records], np.int64)
            self._search.add_many(partition, ids, np.stack([r.vector for r in records]))
        unreferenced = sorted(set(self.latents.keys()) - wanted)
        if index.shared:  # another replica may have written a latent whose row it has not flushed yet
            self._orphan_candidates, unreferenced = set(unreferenced), []
        orphans = sum(self.latents.delete(key) > 0 for key in unreferenced)
        if dangling or orphans:
            log.warning(
                "cache reconciled: %d entries without a latent dropped, %d orphan latents removed", dangling, orphans
            )
        self.counters.repaired += dangling + orphans
        log.info("cache open: %d prompts, %d latents, %d bytes", len(self._records), self._entries, self.total_bytes)
        self.predictor.maybe_refit(len(self._records), self._all_vectors)

    # -- replicas ------------------------------------------------------------------------------------
    def _refresh_loop(self) -> None:
        while not self._closed.wait(self.config.refresh_interval_s):
            if self.index is None:
                continue
            try:
                self.refresh()
            except Exception as err:  # Milvus down or closing: the mirror stays as it is until the next try
                if not self._closed.is_set():
                    log.warning("cache mirror refresh failed: %s", err)

    def refresh(self) -> dict[str, int]:
        """Bring the mirror up to date with Milvus, which other replicas write too. Returns counts of prompts
        added, removed and updated, and of rows queued for a rewrite.

        Held under the index's flush lock, so each of this process's changes is seen once: still queued, or
        already stored. A row in which Milvus holds a lower count (of any replica) than this mirror has seen
        (a racing flush overwrote it) is queued again: that is what makes the per-replica counts converge.
        Cost: one scan of every row's id and entries (no vectors) plus a fetch of the rows new to this replica.
        """
        index = self.index
        if index is None:
            return {}
        counts = dict.fromkeys(("added", "removed", "updated", "rewritten"), 0)
        with index.flush_lock:
            self._last_refresh_at = time.monotonic()
            stored = index.scan_entries()
            with self._lock:
                new_ids = [row_id for row_id in stored if row_id not in self._records]
                unseen = [row_id for row_id in self._records if row_id not in stored]
            fetched = index.fetch(new_ids) if new_ids else {}
            # A scan can miss rows (measured: Milvus 2.3.5's query iterator right after a bulk insert returned
            # 6,677 of 8,000 rows): a row is gone only if a read by id does not find it either.
            stored.update((row_id, r.entries) for row_id, r in (index.fetch(unseen) if unseen else {}).items())
            with self._lock:
                pending = index.pending_changes()
                for row_id in set(stored) | set(self._records):
                    self._refresh_row(row_id, stored.get(row_id), fetched.get(row_id), pending.get(row_id), counts)
            self._remove_orphans(index)
        if any(counts.values()):
            log.info("cache mirror refreshed: %s", counts)
        return counts

    def _refresh_row(
        self,
        row_id: int,
        stored: dict[int, EntryMeta] | None,
        fetched: PromptRecord | None,
        change: RowChange | None,
        counts: dict[str, int],
    ) -> None:
        """One row of `refresh`, under the cache lock."""
        local = self._records.get(row_id)
        merged = merge_entries(stored, local.entries if local else {}, change)
        if local is None:
            if merged and fetched is not None:  # fetched is None: deleted between the scan and the fetch
                fetched.entries = merged
                self._add_record(fetched)
                counts["added"] += 1
            return
        self._entries += len(merged) - len(local.entries)
        if not merged:
            del self._records[row_id]
            self._search.remove(row_id)
            counts["removed"] += 1
            return
        if merged != local.entries:
            counts["updated"] += 1
        local.entries = merged
        if stored is not None and any(_ahead(e, stored[k]) for k, e in merged.items() if k in stored):
            self.index.put(local)  # Milvus holds a count lower than one we have seen: write the larger one back
            counts["rewritten"] += 1

    def _adopt(self, row_id: int) -> PromptRecord | None:
        """Fetch one row into the mirror (search.backend = "milvus" found an id the mirror does not hold yet)."""
        found = self.index.fetch([row_id]).get(row_id) if self.index is not None else None
        if found is None or not found.entries:
            return None
        with self._lock:
            if row_id not in self._records:
                self._add_record(found)
            return self._records[row_id]

    def _remove_orphans(self, index: MilvusIndex) -> None:
        """Latents no row referred to at open, and still none now that other replicas had time to flush theirs."""
        grace = max(10.0, 3 * self.config.flush_interval_s)
        if not self._orphan_candidates or time.monotonic() - self._opened_at < grace:
            return
        with self._lock:
            wanted = {blob_key(r.id, k) for r in self._records.values() for k in r.entries}
        candidates = self._orphan_candidates - wanted
        stored = index.fetch({_row_of(key) for key in candidates})  # confirmed by id, as in refresh
        wanted = {blob_key(row_id, k) for row_id, r in stored.items() for k in r.entries}
        orphans = sum(self.latents.delete(key) > 0 for key in candidates - wanted)
        self._orphan_candidates = set()
        if orphans:
            log.warning("cache reconciled: %d orphan latents removed", orphans)
            self.counters.repaired += orphans

    def _add_record(self, record: PromptRecord) -> None:
        self._records[record.id] = record
        self._entries += len(record.entries)
        self._search.add((record.cache_key, record.tenant), record.id, record.vector)

    def _all_vectors(self) -> np.ndarray:
        with self._lock:
            rows = [r.vector for r in self._records.values()]
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    # -- request path -------------------------------------------------------------------------------
    def tenant_partition(self, tenant: str) -> str:
        return tenant if self.config.tenant_isolation else SHARED_TENANT

    def lookup(self, vector: np.ndarray, cache_key: str, tenant: str, num_steps: int) -> Lookup:
        """Find the best cached latent for this request, load it, and count the hit."""
        timings: dict[str, float] = {}
        if self.index is None:
            with self._lock:
                self.counters.unavailable += 1
            return self._miss(Lookup(False, "cache-unavailable", timings_ms=timings))
        t0 = time.perf_counter()
        novel = self.predictor.is_novel(vector)
        if novel and not self.predictor.should_shadow():
            return self._miss(Lookup(False, "predicted-novel", timings_ms=timings))
        match = self._choose_match(self._candidates(cache_key, self.tenant_partition(tenant), vector))
        t1 = time.perf_counter()
        timings["search_ms"] = (t1 - t0) * 1e3
        if match is None:
            return self._miss(Lookup(False, "empty", timings_ms=timings))
        with self._lock:
            record = self._records.get(match.id)
        if record is None and self.config.search.backend == "milvus":
            record = self._adopt(match.id)  # found in Milvus, admitted by another replica since our last refresh
        with self._lock:
            k = self.selector.choose(match.similarity, record.entries, num_steps) if record else None
        timings["select_ms"] = (time.perf_counter() - t1) * 1e3
        if novel:  # a shadow check: the predictor said novel; was it right?
            self.predictor.record_shadow(would_hit=k is not None)
            return self._miss(Lookup(False, "predicted-novel", match.similarity, timings_ms=timings))
        if record is None or k is None:
            self.probes.observe(tenant, match.similarity, self.selector.thresholds[-1][0])
            return self._miss(Lookup(False, "below-threshold", match.similarity, timings_ms=timings))
        return self._load_hit(record, k, match.similarity, timings)

    def _candidates(self, cache_key: str, partition: str, vector: np.ndarray) -> list[Match]:
        """Nearest cached prompts: from the in-process mirror, or (search.backend = "milvus") from Milvus itself."""
        if self.config.search.backend == "milvus" and self.index is not None:
            found = self.index.search(np.asarray(vector, np.float32), cache_key, partition)
            return [] if found is None else [Match(*found)]
        return self._search.top((cache_key, partition), vector, self._top_k)

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

    def _load_hit(self, record: PromptRecord, k: int, similarity: float, timings: dict[str, float]) -> Lookup:
        t0 = time.perf_counter()
        try:
            blob = self.latents.get(blob_key(record.id, k))
        except (BlobMissing, BlobCorrupt) as err:
            reason = "blob-missing" if isinstance(err, BlobMissing) else "blob-corrupt"
            log.warning("cached latent %s unusable (%s): served as a miss, entry removed", blob_key(record.id, k), err)
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
        return Lookup(True, "hit", similarity, k, record.prompt, blob.tensors, timings, blob.meta)

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
            existing = self._records.get(row_id)
            have = set(existing.entries) if existing else set()
        ks = sorted(states) if replace else [k for k in sorted(states) if k not in have]
        if not ks:
            return 0
        incoming = sum(_stored_nbytes(states[k], self.config.latent_dtype) for k in ks if k not in have)
        try:
            self._evict(len([k for k in ks if k not in have]), incoming)
        except BudgetInfeasible as err:
            log.warning("not admitting %r: %s", prompt[:80], err)
            return 0
        now = self._clock()
        written: dict[int, int] = {}
        try:
            for k in ks:
                written[k] = self.latents.put(blob_key(row_id, k), states[k], {**(meta or {}), "k": k})
        except Exception as err:  # e.g. disk full, fp16 overflow: the image is served, the admission dropped
            for k in written:
                if k not in have:
                    self.latents.delete(blob_key(row_id, k))
            log.warning("admission of %r dropped: %s", prompt[:80], err)
            return 0
        with self._lock:
            record = self._records.get(row_id)
            if record is None:
                record = PromptRecord(row_id, prompt, cache_key, tenant, np.asarray(vector, np.float32), now)
                self._add_record(record)
            for k, nbytes in written.items():
                old = record.entries.get(k)
                self._entries += old is None
                hits = dict(old.replica_hits) if old else {}  # a rewrite (refresh) keeps the hit counts
                record.entries[k] = EntryMeta(last_access=now, nbytes=nbytes, replica_hits=hits)
            self.index.put(record, added=written)
            self.counters.admitted += len(written)
        self._refit_predictor()
        return len(written)

    def _refit_predictor(self) -> None:
        """Refit the hit predictor off the request path (a fit on 4k vectors takes about a second)."""
        if self._refitting.is_set() or not self.config.predictor.enabled:
            return
        self._refitting.set()

        def run() -> None:
            try:
                self.predictor.maybe_refit(len(self._records), self._all_vectors)
            finally:
                self._refitting.clear()

        threading.Thread(target=run, name="predictor-refit", daemon=True).start()

    def _evict(self, incoming_entries: int, incoming_bytes: int) -> None:
        if not self.policy.over_budget(self._entries + incoming_entries, self.total_bytes + incoming_bytes):
            return
        slack_entries = int((self.config.max_entries or 0) * EVICTION_SLACK)
        slack_bytes = int((self.config.max_bytes or 0) * EVICTION_SLACK)
        with self._lock:
            stats = [
                EntryStats(r.id, k, e.hits, e.last_access, e.nbytes)
                for r in self._records.values()
                for k, e in r.entries.items()
            ]
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
            record = self._records.get(row_id)
            if record is None or record.entries.pop(k, None) is None:
                return
            self._entries -= 1
            self.index.put(record, removed=[k])  # the row goes at flush if no replica holds another K of it
            if not record.entries:
                del self._records[row_id]
                self._search.remove(row_id)

    # -- introspection ------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self.latents.total_bytes

    @property
    def entries(self) -> int:
        return self._entries

    def __len__(self) -> int:
        return len(self._records)

    def record(self, cache_key: str, tenant: str, prompt: str) -> PromptRecord | None:
        return self._records.get(record_id(cache_key, self.tenant_partition(tenant), prompt))

    def stats(self) -> dict:
        return {
            "prompts": len(self._records),
            "entries": self._entries,
            "bytes": self.total_bytes,
            **vars(self.counters),
            "predictor": vars(self.predictor.stats()),
            "near_misses": self.probes.near_misses,
            "probing_suspects": self.probes.suspects(),
        }

    def flush(self) -> None:
        if self.index is not None:
            self.index.flush()

    def close(self) -> None:
        """Flush and disconnect. On a shared Milvus, `_settle` first (about flush_interval_s + 1 s): once this
        replica exits, nobody else can restore a count of it that a racing flush of another replica overwrote."""
        with self._lock:
            self._closed.set()
            index = self.index
        if index is None:
            return
        if index.shared:
            try:
                self._settle(index)
            except Exception as err:
                log.warning("last cache mirror refresh failed (hit counts may be behind): %s", err)
        index.close()

    def _settle(self, index: MilvusIndex, rounds: int = SETTLE_ROUNDS) -> None:
        """Flush; wait longer than another replica's flush takes from its read to its write (one that read a row
        before our write may land after it); re-read the rows we wrote since shortly before our last refresh (it
        repaired earlier ones) and write back any count Milvus lost; repeat until nothing was lost."""
        wait_s = self.config.flush_interval_s + SETTLE_MARGIN_S
        since = self._last_refresh_at - wait_s
        index.flush()
        for _ in range(rounds):
            time.sleep(wait_s)
            if not self._rewrite_lost_counts(index, index.written_since(since)):
                return
            index.flush()

    def _rewrite_lost_counts(self, index: MilvusIndex, row_ids: list[int]) -> int:
        """Queue the rows among `row_ids` in which Milvus holds a lower count than the mirror; returns how many."""
        stored = index.fetch(row_ids) if row_ids else {}
        queued = 0
        with self._lock:
            for row_id, row in stored.items():
                local = self._records.get(row_id)
                if local and any(_ahead(e, row.entries[k]) for k, e in local.entries.items() if k in row.entries):
                    index.put(local)
                    queued += 1
        return queued


def _stored_nbytes(arrays: dict[str, np.ndarray], dtype: str) -> int:
    """Upper bound of a blob's size before compression (floats at the stored dtype)."""
    width = np.dtype(dtype).itemsize
    return sum(a.size * width if a.dtype.kind == "f" else a.nbytes for a in arrays.values())
