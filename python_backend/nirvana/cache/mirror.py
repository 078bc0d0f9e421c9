"""The in-process mirror of the store of record: the prompt records the request path reads, and their vectors.

Milvus (`index`) is the store of record; a lookup must not wait on it, so each process keeps every row (records by
id, entries with their LCBFU state) and searches their vectors in a `PartitionedSearch`, one partition per
(cache key, tenant). `reconcile` fills the mirror at open, the request path (`manager`) changes it on admission,
hit and eviction, and `replicas` brings it up to date with what other processes wrote.

A record's vector lives only in the search (float16 IVF codes, or the exact rows of a small partition or tail):
the record itself drops it once the mirror holds it, and `stored` gives it back for a write to Milvus. At a million
prompts of 768 dims the record's own float16 copy was 1.5 KB of the 6.3 KB a prompt the cache owner held (2.15× the
raw float32 vectors; docs/caching.md, "A million prompts"). What leaves the mirror (rows written to Milvus, the
snapshot, the predictor's sample) carries the float16 values: a cosine change of about 1e-4.

One reentrant lock, `lock`, guards the mirror; callers hold it too when they read or change a record's entries,
so a hit count and the entry count never disagree.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np

from nirvana.cache.eviction_order import EvictionOrder
from nirvana.cache.policy import EntryStats
from nirvana.cache.records import EntryMeta, PromptRecord, blob_key
from nirvana.cache.search import Match, PartitionedSearch, PartitionKey, PartitionState, Trained
from nirvana.config import SearchConfig

log = logging.getLogger(__name__)

KEYS_CHUNK = 10_000


class Mirror:
    """Prompt records by id, a search over their vectors ([dim], unit norm) and their entries in eviction
    order (`keep_per_prompt`: the policy's `min_entries_per_prompt`)."""

    def __init__(self, dim: int, search: SearchConfig | None = None, keep_per_prompt: int = 1) -> None:
        self.dim = dim
        self.order = EvictionOrder(keep_per_prompt)
        self._search_config = search or SearchConfig()
        self.lock = threading.RLock()
        self._records: dict[int, PromptRecord] = {}
        self._entries = 0
        # Per tenant partition: entries and bytes (the per-tenant budget); a tenant leaves with its last entry
        self._tenant_entries: Counter[str] = Counter()
        self._tenant_bytes: Counter[str] = Counter()
        self.search = self._new_search()
        self._rng = np.random.default_rng(0)

    def _new_search(self) -> PartitionedSearch:
        s = self._search_config
        return PartitionedSearch(self.dim, s.exact_max_rows, s.nprobe, s.tail_max_rows)

    def reset(self) -> None:
        """Forget everything (a failed load at open)."""
        with self.lock:
            self._records, self._entries, self.search = {}, 0, self._new_search()
            self._tenant_entries, self._tenant_bytes = Counter(), Counter()
            self.order.clear()

    # -- reading -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._records

    @property
    def entries(self) -> int:
        """Cached latents over all prompts."""
        return self._entries

    def get(self, row_id: int) -> PromptRecord | None:
        return self._records.get(row_id)

    def records(self) -> list[PromptRecord]:
        with self.lock:
            return list(self._records.values())

    def ids(self) -> set[int]:
        with self.lock:
            return set(self._records)

    def top(self, partition: PartitionKey, vector: np.ndarray, k: int) -> list[Match]:
        """The `k` nearest prompts of the partition, best first."""
        return self.search.top(partition, vector, k)

    def vectors(self, limit: int) -> np.ndarray:
        """[≤ limit, dim] float32: the vectors of up to `limit` prompts drawn at random (the hit predictor's fit)."""
        return self.search.sample_vectors(limit, self._rng)

    def vector_of(self, row_id: int) -> np.ndarray | None:
        """A held prompt's vector ([dim] float32), from the search."""
        return self.search.vector(row_id)

    def stored(self, record: PromptRecord) -> PromptRecord:
        """A copy of a held record to write to the store of record: with its vector (the mirror's records have
        none) and entries that later hits do not change."""
        copy = record.snapshot()
        if copy.vector is None:
            copy.vector = self.vector_of(record.id)
        return copy

    def in_eviction_order(self, tenant: str | None = None) -> Iterator[EntryStats]:
        """Entries (of one tenant partition's prompts, if given), the first to evict first (`EvictionOrder`).
        The caller holds `lock` until it stops iterating."""
        for prompt_id, k in self.order.first(tenant):
            record = self._records.get(prompt_id)
            entry = record.entries.get(k) if record is not None else None
            if entry is None:  # never expected (the order follows every change); an admission must not fail on it
                log.error("eviction order holds entry %s that the mirror does not: skipped", blob_key(prompt_id, k))
                continue
            yield EntryStats(prompt_id, k, entry.hits, entry.last_access, entry.nbytes)

    @property
    def entry_bytes(self) -> int:
        """Bytes of the latents the mirror's entries refer to (what evicting all of them would free)."""
        with self.lock:
            return sum(self._tenant_bytes.values())

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """(entries, bytes) the tenant partition holds."""
        with self.lock:
            return self._tenant_entries[tenant], self._tenant_bytes[tenant]

    def tenants(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) of every tenant partition that holds an entry."""
        with self.lock:
            return {t: (n, self._tenant_bytes[t]) for t, n in self._tenant_entries.items()}

    def _account(self, record: PromptRecord, sign: int) -> None:
        """Add (+1) or take away (-1) a record's entries from the per-tenant totals."""
        tenant = record.tenant
        self._tenant_entries[tenant] += sign * len(record.entries)
        self._tenant_bytes[tenant] += sign * sum(e.nbytes for e in record.entries.values())
        if self._tenant_entries[tenant] <= 0:
            del self._tenant_entries[tenant]
            self._tenant_bytes.pop(tenant, None)

    def blob_keys(self) -> set[str]:
        """The latent store keys every entry refers to. The lock is taken per `KEYS_CHUNK` prompts (a million keys
        in one hold stopped lookups for a second): an entry added meanwhile to a prompt already read is left out."""
        records = self.records()
        keys: set[str] = set()
        for start in range(0, len(records), KEYS_CHUNK):
            with self.lock:
                keys.update(blob_key(r.id, k) for r in records[start : start + KEYS_CHUNK] for k in r.entries)
        return keys

    # -- changing ------------------------------------------------------------------------------------
    def add(self, record: PromptRecord) -> None:
        """A prompt new to the mirror, with its entries."""
        with self.lock:
            self._records[record.id] = record
            self._entries += len(record.entries)
            self._account(record, +1)
            self.order.replace(record.tenant, record.id, record.entries)
            self.search.add((record.cache_key, record.tenant), record.id, record.vector)
            record.vector = None  # the search holds it

    def add_many(self, records: list[PromptRecord], trained: dict[PartitionKey, Trained] | None = None) -> None:
        """Prompts new to the mirror, in bulk (at open: one index build per partition, not one per row);
        `trained`: earlier IVF trainings by partition, reused where still valid (`PartitionedSearch.add_many`)."""
        by_partition: dict[PartitionKey, list[PromptRecord]] = {}
        for record in records:
            by_partition.setdefault((record.cache_key, record.tenant), []).append(record)
        with self.lock:
            self.order.put_many((r.tenant, r.id, r.entries) for r in records)
            for partition, group in by_partition.items():
                self._records.update((r.id, r) for r in group)
                self._entries += sum(len(r.entries) for r in group)
                for record in group:
                    self._account(record, +1)
                ids = np.fromiter((r.id for r in group), np.int64, len(group))
                vectors = np.stack([r.vector for r in group])
                self.search.add_many(partition, ids, vectors, (trained or {}).get(partition))
                for record in group:
                    record.vector = None  # the search holds it

    def restore(self, records: list[PromptRecord], states: dict[PartitionKey, PartitionState]) -> None:
        """Fill an empty mirror from a snapshot: the records (without vectors) and the search's partitions."""
        with self.lock:
            if self._records:
                raise RuntimeError("restore into a mirror that holds prompts")
            self.search.restore(states)
            self.order.put_many((r.tenant, r.id, r.entries) for r in records)
            self._records = {r.id: r for r in records}
            self._entries = sum(len(r.entries) for r in records)
            for record in records:
                self._account(record, +1)

    def put_entry(self, record: PromptRecord, k: int, entry: EntryMeta) -> None:
        """Set one entry of a prompt the mirror holds (a new K, or a rewritten one)."""
        with self.lock:
            self._account(record, -1)
            self._entries += k not in record.entries
            record.entries[k] = entry
            self._account(record, +1)
            self.order.put(record.tenant, record.id, k, entry)

    def set_entries(self, record: PromptRecord, entries: dict[int, EntryMeta]) -> None:
        """Replace a held prompt's entries; with none left, the prompt leaves the mirror."""
        with self.lock:
            self._account(record, -1)
            self._entries += len(entries) - len(record.entries)
            record.entries = entries
            self._account(record, +1)
            self.order.replace(record.tenant, record.id, entries)
            if not entries:
                self._remove(record.id)

    def pop_entry(self, row_id: int, k: int) -> PromptRecord | None:
        """Remove one entry; the prompt leaves the mirror with its last entry. Returns the prompt's record, or None
        if the mirror did not hold that entry."""
        with self.lock:
            record = self._records.get(row_id)
            if record is None or k not in record.entries:
                return None
            self._account(record, -1)
            del record.entries[k]
            self.order.remove(row_id, k)
            self._account(record, +1)
            self._entries -= 1
            if not record.entries:
                self._remove(row_id)
            return record

    def count_hit(self, record: PromptRecord, k: int, replica: str, when: float) -> None:
        """A hit on one of a held prompt's entries: its count and last access, and so its place in the order."""
        with self.lock:
            entry = record.entries.get(k)
            if entry is not None:
                entry.count_hit(replica, when)
                if self._records.get(record.id) is record:  # not a record the mirror has let go of since
                    self.order.put(record.tenant, record.id, k, entry)

    def _remove(self, row_id: int) -> None:
        record = self._records.pop(row_id)
        for k in record.entries:
            self.order.remove(row_id, k)
        self.search.remove(row_id)
