"""The store of record's data model: one row per cached prompt, its entries (one per cached K) and their LCBFU
state, how concurrent writers' changes merge, and `PromptIndex`, what the request path needs of the store.

`index.MilvusIndex` is the production store; tests stand an in-memory one in for it (tests/cache/conftest.py).
Hit counts are a G-counter: each entry keeps one count per replica (`replica_hits`), only that replica increases
its own count, and a merge takes the larger value of each count (see the `index` module docstring for why).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

UNATTRIBUTED = "_"  # replica id of hits stored before hits were counted per replica, and of retired replicas
# A retired replica's count is folded into UNATTRIBUTED and its key kept as a tombstone (-retired_at, in seconds)
# so that a merge with a copy still holding the count cannot bring it back (counting it twice); tombstones go after:
TOMBSTONE_TTL_S = 30 * 86400.0

log = logging.getLogger(__name__)


class EntryMeta:
    """One cached latent of a prompt (the latent after K steps): hits per replica, last access (s), bytes on disk."""

    __slots__ = ("last_access", "nbytes", "replica_hits")

    def __init__(
        self, hits: int = 0, last_access: float = 0.0, nbytes: int = 0, replica_hits: dict[str, int] | None = None
    ) -> None:
        if replica_hits is None:
            replica_hits = {UNATTRIBUTED: hits} if hits else {}
        self.replica_hits = {r: int(n) for r, n in replica_hits.items()}
        self.last_access, self.nbytes = float(last_access), int(nbytes)

    @property
    def hits(self) -> int:
        return sum(n for n in self.replica_hits.values() if n > 0)

    def retire(self, replicas: set[str], now: float) -> bool:
        """Fold the counts of `replicas` (gone for good) into UNATTRIBUTED, leaving tombstones; drop expired
        tombstones. Returns whether anything changed."""
        changed = False
        for replica in replicas & self.replica_hits.keys():
            n = self.replica_hits[replica]
            if n >= 0 and replica != UNATTRIBUTED:
                self.replica_hits[UNATTRIBUTED] = self.replica_hits.get(UNATTRIBUTED, 0) + n
                self.replica_hits[replica] = -max(1, int(now))
                changed = True
        expired = [r for r, n in self.replica_hits.items() if n < 0 and -n < now - TOMBSTONE_TTL_S]
        for replica in expired:
            del self.replica_hits[replica]
        return changed or bool(expired)

    def count_hit(self, replica: str, when: float) -> None:
        self.replica_hits[replica] = self.replica_hits.get(replica, 0) + 1
        self.last_access = max(self.last_access, when)

    def copy(self) -> EntryMeta:
        return EntryMeta(last_access=self.last_access, nbytes=self.nbytes, replica_hits=self.replica_hits)

    def merged_with(self, other: EntryMeta) -> EntryMeta:
        """Each replica's count is only ever increased by that replica: the larger value is the newer one."""
        counts = dict(self.replica_hits)
        for replica, n in other.replica_hits.items():
            mine = counts.get(replica)
            # a tombstone (negative) wins over a count: the count is in UNATTRIBUTED already
            counts[replica] = n if mine is None else min(mine, n) if min(mine, n) < 0 else max(mine, n)
        cutoff = time.time() - TOMBSTONE_TTL_S
        counts = {r: n for r, n in counts.items() if not (n < 0 and -n < cutoff)}
        return EntryMeta(last_access=max(self.last_access, other.last_access), nbytes=other.nbytes, replica_hits=counts)

    def to_json(self) -> dict:
        return {
            "hits": self.hits,
            "last_access": self.last_access,
            "nbytes": self.nbytes,
            "replica_hits": self.replica_hits,
        }

    @classmethod
    def from_json(cls, data: dict) -> EntryMeta:
        return cls(data.get("hits", 0), data.get("last_access", 0.0), data.get("nbytes", 0), data.get("replica_hits"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntryMeta) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return (
            f"EntryMeta(hits={self.hits}, last_access={self.last_access}, nbytes={self.nbytes}, by={self.replica_hits})"
        )


@dataclass
class PromptRecord:
    id: int
    prompt: str
    cache_key: str
    tenant: str
    vector: np.ndarray | None  # [dim] float32, unit norm; None once the mirror holds the record (`Mirror.stored`)
    created: float
    entries: dict[int, EntryMeta] = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return sum(e.hits for e in self.entries.values())

    @property
    def score(self) -> float:
        return float(sum(e.hits * k for k, e in self.entries.items()))

    @property
    def last_access(self) -> float:
        return max((e.last_access for e in self.entries.values()), default=self.created)

    def snapshot(self) -> PromptRecord:
        """A copy whose entries later hits do not change (the vector is shared: it never changes)."""
        entries = {k: e.copy() for k, e in self.entries.items()}
        return PromptRecord(self.id, self.prompt, self.cache_key, self.tenant, self.vector, self.created, entries)

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "vector": self.vector.astype(np.float32).tolist(),
            "prompt": self.prompt,
            "cache_key": self.cache_key,
            "tenant": self.tenant,
            "entries": {str(k): e.to_json() for k, e in sorted(self.entries.items())},
            "hits": self.hits,
            "score": self.score,
            "last_access": self.last_access,
            "created": self.created,
        }

    @classmethod
    def from_row(cls, row: dict) -> PromptRecord:
        return cls(
            id=int(row["id"]),
            prompt=row["prompt"],
            cache_key=row["cache_key"],
            tenant=row["tenant"],
            vector=np.asarray(row["vector"], np.float32),
            created=float(row["created"]),
            entries=entries_from_json(row["entries"]),
        )


def entries_from_json(data: dict | None) -> dict[int, EntryMeta]:
    """The entries of a stored row; an entry that does not parse is left out (logged), so one absurd value
    written by anything else cannot make every read or flush of the row fail."""
    entries: dict[int, EntryMeta] = {}
    for k, value in (data or {}).items() if isinstance(data, dict) else ():
        try:
            entries[int(k)] = EntryMeta.from_json(value)
        except (TypeError, ValueError, AttributeError) as err:
            log.warning("stored cache entry K=%r ignored: %s", str(k)[:20], err)
    return entries


@dataclass
class RowChange:
    """What this process changed in one row since the last flush: the row as it sees it, Ks added, Ks removed."""

    record: PromptRecord | None  # None: delete the whole row, whatever it holds
    added: set[int] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)

    def after(self, older: RowChange) -> RowChange:
        """This change applied on top of an older one that was not written (a failed flush)."""
        if self.record is None or older.record is None:
            return self
        added = (older.added - self.removed) | self.added
        removed = (older.removed - self.added) | self.removed
        return RowChange(self.record, added, removed)


def merge_entries(
    stored: dict[int, EntryMeta] | None, local: dict[int, EntryMeta], change: RowChange | None
) -> dict[int, EntryMeta]:
    """The entries a row should hold: what Milvus stores, with this process's view and changes merged in.

    Ks this process removed go; Ks it added come in; a K it holds that is no longer stored (and that it did not
    add) was removed by another replica and stays gone; for a K both hold, each replica's hit count takes the
    larger value.
    """
    added = change.added if change else set()
    removed = change.removed if change else set()
    merged = {k: e for k, e in (stored or {}).items() if k not in removed}
    for k, mine in local.items():
        if k in merged:
            merged[k] = merged[k].merged_with(mine)
        elif k in added:
            merged[k] = mine.copy()
    return merged


def is_server_uri(uri: str) -> bool:
    """A Milvus server, which other processes (replicas) may write too; a milvus-lite file admits one process."""
    return uri.startswith(("http://", "https://", "tcp://"))


def record_id(cache_key: str, tenant: str, prompt: str) -> int:
    """Stable 63-bit id, so the same prompt admitted again (or by another replica) lands on the same row."""
    digest = hashlib.blake2b(f"{cache_key}\0{tenant}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def blob_key(row_id: int, k: int) -> str:
    """The latent store key of a row's entry at K."""
    return f"{row_id:016x}-k{k}"


def row_of(key: str) -> int:
    """The row id in a blob key (-1 for a key that is not one of ours: no row refers to it)."""
    try:
        return int(key.split("-k")[0], 16)
    except ValueError:
        return -1


class PromptIndex(Protocol):
    """The store of record as the request path uses it; `index.MilvusIndex` is the production one.

    Writes may be deferred (write-behind) but must merge as `merge_entries` does, so that what another writer
    added to a row is kept; `fetch` and `search` see every write `flush` has completed.
    """

    @property
    def shared(self) -> bool:
        """Whether other processes (replicas) write this store too."""
        ...

    def put(self, record: PromptRecord, added: Iterable[int] = (), removed: Iterable[int] = ()) -> None:
        """Record the row as this process sees it; `added`/`removed`: the Ks it has just admitted/dropped."""
        ...

    def fetch(self, ids: Iterable[int]) -> dict[int, PromptRecord]:
        """The stored rows with these ids (absent ids are left out)."""
        ...

    def search(self, vector: np.ndarray, cache_key: str, tenant: str | None) -> tuple[int, float] | None:
        """(row id, cosine similarity) of the nearest stored prompt under this cache key (and tenant)."""
        ...

    def flush(self) -> int:
        """Write deferred changes now; returns the rows changed."""
        ...

    def close(self) -> None:
        """Flush and release; safe to call twice."""
        ...
