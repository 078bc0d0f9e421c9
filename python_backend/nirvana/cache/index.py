"""Milvus: the store of record for cached prompts, their vectors and the LCBFU state.

One row per cached prompt (per cache key and tenant). The LCBFU state lives in the row's fields: `entries`
(JSON: K → hits, last access, bytes, and the hits counted by each replica), and the roll-ups `hits`, `score`
(Σ hits × K) and `last_access`, so it survives a restart and other tools can query it. The rows' data model, and
the `PromptIndex` protocol this class implements, are in `records`; the collection's schema in `milvus_schema`.

Writes are **write-behind**: the request path only records what changed in a row (Ks admitted, Ks removed, hits);
a background thread flushes every `flush_interval_s` (an upsert costs 5–130 ms, far too much for the request path).
A crash loses at most one flush interval of hit counts; `close()` flushes everything.

**Several replicas, one collection.** A flush re-reads each changed row and merges this replica's changes into what
is stored (`merge_entries`), so a K admitted or a hit counted by another replica is kept. Hit counts are a
G-counter: each entry keeps one count per replica (`replica_hits`), only that replica increases its own count, and
a merge takes the larger value of each count; `hits` is their sum. Milvus has no atomic increment or
compare-and-set, so two replicas flushing the same row at the same moment can still overwrite each other's count
(read, read, write, write); at its next mirror refresh any replica that has seen the larger count writes it back
(see `replicas.ReplicaSync.refresh`), so counts converge while replicas run, and a stopping replica checks once more
after other replicas' in-flight flushes have landed (`replicas.ReplicaSync.settle`). What can still be lost: the last
increments of a replica that exited when another replica's flush, which had read the row before them, landed
later than that final check (a flush slower than `flush_interval_s` + 1 s from its read to its write).

**Bad rows never block a flush.** `put` refuses a row `validation.check_record` rejects (`InvalidRow`); when an
upsert still fails and Milvus answers otherwise, the rows are written one by one, and those Milvus refuses are
dropped, logged once each and counted (`dropped_rows`): the others land, and later flushes are not held up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

# milvus-lite 2.5 imports pkg_resources (deprecated, harmless); pymilvus' iterator warns on every milvus-lite scan.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
from pymilvus import MilvusClient  # noqa: E402

from nirvana.cache.milvus_schema import SCALAR_FIELDS, ensure_collection, partition_filter  # noqa: E402
from nirvana.cache.records import (  # noqa: E402
    EntryMeta,
    PromptRecord,
    RowChange,
    entries_from_json,
    is_server_uri,
    merge_entries,
)
from nirvana.cache.validation import check_record  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("pymilvus.orm.iterator").setLevel(logging.ERROR)

RPC_TIMEOUT_S = 30.0  # default per call: a Milvus that stopped answering must not hang a flush (or a shutdown)
_BATCH = 1000  # milvus-lite 2.5 slows down sharply for single inserts of > ~4,800 rows of 384 dims
_SCAN_BATCH = 10_000  # rows per page of a scan without vectors
_VECTOR_BATCH = 256  # rows per read of vectors: milvus-lite 2.5 costs more per row in larger pages (see scan_rows)
# Reads that a merge depends on must see every acknowledged write (a Milvus server defaults to "Bounded").
_CONSISTENCY = {"consistency_level": "Strong"}
# `written_since` looks back a few flush intervals: older write times are forgotten once this many are held
_WRITTEN_AT_MAX, _WRITTEN_AT_KEEP_S = 4096, 600.0
# Errors that mean "Milvus is not answering" (keep everything queued), not "Milvus refuses this row"
_OUTAGE_ERRORS = (ConnectionError, TimeoutError, OSError)


class MilvusIndex:
    """pymilvus client over one collection; milvus-lite file path or a server URI."""

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        flush_interval_s: float = 1.0,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        token: str | None = None,
    ) -> None:
        self.uri, self.collection, self.dim, self.rpc_timeout_s = uri, collection, dim, rpc_timeout_s
        # A connection of its own: two indexes on one URI in one process (tests, a reconnect) must not share one,
        # or closing either would close both. `token`: "user:password" or an API token (a server with auth on).
        auth = {} if token is None else {"token": token}
        alias = f"nirvana-index-{uuid.uuid4().hex}"
        self._client = MilvusClient(uri, timeout=min(rpc_timeout_s, 10.0), alias=alias, **auth)
        self._client_lock = threading.Lock()  # one client call at a time (milvus-lite is a single local server)
        self._pending: dict[int, RowChange] = {}
        self._pending_lock = threading.Lock()
        # Held for a whole flush (read, merge, write), so a reader holding it sees every change either still
        # pending or already stored, never in between (ReplicaSync.refresh).
        self.flush_lock = threading.Lock()
        self._written_at: dict[int, float] = {}  # row id → time.monotonic() of this process's last write of it
        self.dropped_rows = 0  # rows Milvus refused at a flush, dropped so that later flushes land
        self._dropped_logged: set[int] = set()  # logged once each (bounded: cleared when it grows large)
        self._stop = threading.Event()
        try:
            ensure_collection(self._client, self.collection, self.dim, self.uri)
        except Exception:
            self._client.close()  # release the milvus-lite file lock
            raise
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval_s,), daemon=True)
        self._flusher.start()

    @property
    def shared(self) -> bool:
        return is_server_uri(self.uri)

    def _scan(self, output_fields: list[str], batch_size: int = _BATCH) -> Iterator[dict]:
        with self._client_lock:
            iterator = self._client.query_iterator(
                self.collection, batch_size=batch_size, filter="", output_fields=output_fields, **_CONSISTENCY
            )
            try:
                while batch := iterator.next():
                    yield from batch
            finally:
                iterator.close()

    def load_all(self) -> Iterator[PromptRecord]:
        """Every row, with its vector, in batches."""
        yield from (PromptRecord.from_row(row) for row in self._scan(["*"]))

    def scan_rows(self) -> Iterator[dict]:
        """Every row without its vector (startup: `fetch_vectors` then reads only the vectors it needs). Without
        vectors a page of 10,000 rows costs about 70 ms on milvus-lite; with them, pages of more than ~300 rows
        get slower per row (1,000: 0.1 s, 2,000: 0.3 s), which is why vectors are read apart, in small pages."""
        yield from self._scan(SCALAR_FIELDS, batch_size=_SCAN_BATCH)

    def fetch_vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The vectors ([dim] float32) of the stored rows with these ids; absent ids are left out."""
        ids = list(ids)
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), _VECTOR_BATCH):
            with self._client_lock:
                rows = self._client.get(
                    self.collection,
                    ids=ids[start : start + _VECTOR_BATCH],
                    output_fields=["id", "vector"],
                    timeout=self.rpc_timeout_s,
                    strict_float32=True,  # one numpy array per page instead of a list of floats per row
                    **_CONSISTENCY,
                )
            found.update((int(row["id"]), np.asarray(row["vector"], np.float32)) for row in rows)
        return found

    def scan_entries(self) -> dict[int, dict[int, EntryMeta]]:
        """Every row's id and entries, without vectors (the mirror's periodic refresh, the catch-up after an open from
        the snapshot). In pages as large as `scan_rows`': milvus-lite answers each page of the query iterator in
        ~0.12 s however small (a million rows in pages of 1,000 took 137 s)."""
        rows = self._scan(["id", "entries"], batch_size=_SCAN_BATCH)
        return {int(row["id"]): entries_from_json(row["entries"]) for row in rows}

    def fetch(self, ids: Iterable[int], vectors: bool = True) -> dict[int, PromptRecord]:
        """The stored rows with these ids (absent ids are left out), read consistently with every acknowledged write.
        With `vectors` False the records' vectors are empty (reading vectors costs most of a read on milvus-lite)."""
        ids = list(ids)
        found: dict[int, PromptRecord] = {}
        fields = ["*"] if vectors else SCALAR_FIELDS
        for start in range(0, len(ids), _BATCH):
            with self._client_lock:
                rows = self._client.get(
                    self.collection,
                    ids=ids[start : start + _BATCH],
                    output_fields=fields,
                    timeout=self.rpc_timeout_s,
                    **_CONSISTENCY,
                )
            found.update(
                (int(row["id"]), PromptRecord.from_row(row if vectors else {**row, "vector": ()})) for row in rows
            )
        return found

    def insert_now(self, records: list[PromptRecord]) -> None:
        """Synchronous bulk insert (benchmarks and imports), in batches Milvus handles well."""
        for start in range(0, len(records), _BATCH):
            rows = [r.to_row() for r in records[start : start + _BATCH]]
            with self._client_lock:
                self._client.insert(self.collection, rows, timeout=self.rpc_timeout_s)

    def put(self, record: PromptRecord, added: Iterable[int] = (), removed: Iterable[int] = ()) -> None:
        """Queue a write of the record as this process sees it (write-behind): `added` are the Ks it has just
        admitted (or rewritten), `removed` the Ks it has just dropped; hits need no mention (they are merged)."""
        change = RowChange(record.snapshot(), set(added), set(removed))
        if change.record.entries:  # InvalidRow: refused here, before it can block a flush (no entries: a delete)
            check_record(change.record, self.dim)
        with self._pending_lock:
            older = self._pending.get(record.id)
            self._pending[record.id] = change if older is None else change.after(older)

    def delete(self, row_id: int) -> None:
        """Queue the removal of the whole row, whatever another replica added to it."""
        with self._pending_lock:
            self._pending[row_id] = RowChange(None)

    def pending(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def pending_changes(self) -> dict[int, RowChange]:
        with self._pending_lock:
            return dict(self._pending)

    def flush(self) -> int:
        """Merge every queued change into the stored row and write it now; on failure the changes stay queued.
        Returns the rows changed."""
        with self.flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                self._write(batch)
            except Exception:
                with self._pending_lock:  # keep newer changes made while we were writing
                    for row_id, older in batch.items():
                        newer = self._pending.get(row_id)
                        self._pending[row_id] = older if newer is None else newer.after(older)
                raise
        return len(batch)

    def _write(self, batch: dict[int, RowChange]) -> None:
        # Most flushed changes are hit counts: read the stored rows without their vectors (the vector of a row never
        # changes, and this process holds it), except for a row another replica re-created since (another `created`).
        stored = self.fetch((row_id for row_id, change in batch.items() if change.record is not None), vectors=False)
        # ... and of a row this process no longer holds (its last K removed) that another replica still fills
        recreated = [
            row_id
            for row_id, old in stored.items()
            if old.created != batch[row_id].record.created or batch[row_id].record.vector is None
        ]
        stored_vectors = self.fetch_vectors(recreated) if recreated else {}
        upserts, deletes = [], []
        for row_id, change in batch.items():
            old = stored.get(row_id)
            if change.record is None:
                deletes.append(row_id)
                continue
            entries = merge_entries(old.entries if old else None, change.record.entries, change)
            vector = stored_vectors.get(row_id, change.record.vector)
            if entries and vector is not None:
                base = old if old is not None else change.record
                merged = PromptRecord(base.id, base.prompt, base.cache_key, base.tenant, vector, base.created)
                merged.entries = entries
                upserts.append(merged.to_row())
            elif old is not None:
                deletes.append(row_id)
        with self._client_lock:
            dropped: set[int] = set()
            for start in range(0, len(upserts), _BATCH):
                dropped |= self._upsert(upserts[start : start + _BATCH])
            if deletes:
                self._client.delete(self.collection, ids=deletes, timeout=self.rpc_timeout_s)
        now = time.monotonic()
        self._written_at.update((row["id"], now) for row in upserts if row["id"] not in dropped)
        if len(self._written_at) > _WRITTEN_AT_MAX:
            self._written_at = {i: at for i, at in self._written_at.items() if at >= now - _WRITTEN_AT_KEEP_S}

    def _upsert(self, rows: list[dict]) -> set[int]:
        """Upsert `rows`; if Milvus refuses the batch while it answers, write them one by one and drop the ones it
        refuses. Returns the ids dropped. Raises (everything stays queued) when Milvus does not answer."""
        try:
            self._client.upsert(self.collection, rows, timeout=self.rpc_timeout_s)
            return set()
        except _OUTAGE_ERRORS:
            raise
        except Exception as err:
            self._client.has_collection(self.collection, timeout=self.rpc_timeout_s)  # raises when Milvus is down
            log.warning("milvus refused a batch of %d rows (%s): writing them one by one", len(rows), err)
        dropped = set()
        for row in rows:
            try:
                self._client.upsert(self.collection, [row], timeout=self.rpc_timeout_s)
            except _OUTAGE_ERRORS:
                raise
            except Exception as err:
                dropped.add(row["id"])
                self.dropped_rows += 1
                if row["id"] not in self._dropped_logged:
                    log.error("cache row %016x dropped: Milvus refuses it (%s)", row["id"], str(err)[:300])
                    self._dropped_logged = self._dropped_logged if len(self._dropped_logged) < 4096 else set()
                    self._dropped_logged.add(row["id"])
        return dropped

    def written_since(self, moment: float) -> list[int]:
        """Ids of the rows this process upserted at or after `moment` (time.monotonic())."""
        return [row_id for row_id, at in list(self._written_at.items()) if at >= moment]

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception as err:  # Milvus down: keep the queue, retry next interval
                log.warning("milvus flush failed, %d changes kept for retry: %s", self.pending(), err)

    def search(self, vector: np.ndarray, cache_key: str, tenant: str | None) -> tuple[int, float] | None:
        """Top-1 search in Milvus itself, filtered by cache key (and tenant)."""
        expr = partition_filter(cache_key, tenant)
        with self._client_lock:
            result = self._client.search(
                self.collection, data=[vector.tolist()], limit=1, filter=expr, timeout=self.rpc_timeout_s
            )
        if not result or not result[0]:
            return None
        return int(result[0][0]["id"]), float(result[0][0]["distance"])

    def count(self) -> int:
        with self._client_lock:
            rows = self._client.query(self.collection, filter="", output_fields=["count(*)"], **_CONSISTENCY)
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        """Flush and release the client; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._flusher.join(timeout=10)
        self.flush()
        with self._client_lock:
            self._client.close()
