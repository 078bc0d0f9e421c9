"""Milvus: the store of record for cached prompts, their vectors and the LCBFU state.

One row per cached prompt (per cache key and tenant). The LCBFU state lives in the row's fields: `entries`
(JSON: K → hits, last access, bytes), and the roll-ups `hits`, `score` (Σ hits × K) and `last_access`, so it
survives a restart and other tools can query it. Writes are **write-behind**: the request path only marks a
row dirty; a background thread upserts dirty rows every `flush_interval_s` (a milvus-lite upsert costs
10–130 ms, far too much for the request path). A crash loses at most one flush interval of hit counts;
`close()` flushes everything.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# milvus-lite 2.5 imports pkg_resources (deprecated, harmless); pymilvus' iterator warns on every milvus-lite scan.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
from pymilvus import DataType, MilvusClient  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("pymilvus.orm.iterator").setLevel(logging.ERROR)

MAX_PROMPT_BYTES = 8192
RPC_TIMEOUT_S = 30.0  # default per call: a Milvus that stopped answering must not hang a flush (or a shutdown)
_BATCH = 1000  # milvus-lite 2.5 slows down sharply for single inserts of > ~4,800 rows of 384 dims


@dataclass
class EntryMeta:
    """One cached latent of a prompt: the latent after K steps."""

    hits: int = 0
    last_access: float = 0.0
    nbytes: int = 0


@dataclass
class PromptRecord:
    id: int
    prompt: str
    cache_key: str
    tenant: str
    vector: np.ndarray  # [dim] float32, unit norm
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

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "vector": self.vector.astype(np.float32).tolist(),
            "prompt": self.prompt,
            "cache_key": self.cache_key,
            "tenant": self.tenant,
            "entries": {str(k): vars(e) for k, e in sorted(self.entries.items())},
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
            entries={int(k): EntryMeta(**v) for k, v in (row["entries"] or {}).items()},
        )


def record_id(cache_key: str, tenant: str, prompt: str) -> int:
    """Stable 63-bit id, so the same prompt admitted again (or by another replica) lands on the same row."""
    digest = hashlib.blake2b(f"{cache_key}\0{tenant}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class MilvusIndex:
    """pymilvus client over one collection; milvus-lite file path or a server URI."""

    def __init__(
        self, uri: str, collection: str, dim: int, flush_interval_s: float = 1.0, rpc_timeout_s: float = RPC_TIMEOUT_S
    ) -> None:
        self.uri, self.collection, self.dim, self.rpc_timeout_s = uri, collection, dim, rpc_timeout_s
        self._client = MilvusClient(uri, timeout=min(rpc_timeout_s, 10.0))
        self._client_lock = threading.Lock()  # one client call at a time (milvus-lite is a single local server)
        self._pending: dict[int, dict | None] = {}  # id → row to upsert, or None to delete; latest write wins
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self._ensure_collection()
        except Exception:
            self._client.close()  # release the milvus-lite file lock
            raise
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval_s,), daemon=True)
        self._flusher.start()

    def _ensure_collection(self) -> None:
        if self._client.has_collection(self.collection):
            fields = self._client.describe_collection(self.collection)["fields"]
            dims = [f["params"].get("dim") for f in fields if f["name"] == "vector"]
            if dims and int(dims[0]) != self.dim:
                raise ValueError(
                    f"collection {self.collection!r} at {self.uri!r} holds {dims[0]}-dim vectors but the embedder "
                    f"gives {self.dim}: use another cache dir/collection or the matching embedder"
                )
            self._client.load_collection(self.collection)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("prompt", DataType.VARCHAR, max_length=MAX_PROMPT_BYTES)
        schema.add_field("cache_key", DataType.VARCHAR, max_length=64)
        schema.add_field("tenant", DataType.VARCHAR, max_length=512)
        schema.add_field("entries", DataType.JSON)  # JSON, not ARRAY: milvus-lite 2.5 fails on empty ARRAY results
        schema.add_field("hits", DataType.INT64)
        schema.add_field("score", DataType.DOUBLE)
        schema.add_field("last_access", DataType.DOUBLE)
        schema.add_field("created", DataType.DOUBLE)
        index = self._client.prepare_index_params()
        index.add_index(
            "vector", index_type="FLAT", metric_type="IP"
        )  # exact; milvus-lite loses growing raw data with AUTOINDEX
        self._client.create_collection(self.collection, schema=schema, index_params=index)

    def load_all(self) -> Iterator[PromptRecord]:
        """Every row, in batches (startup: builds the in-process mirror)."""
        with self._client_lock:
            iterator = self._client.query_iterator(self.collection, batch_size=_BATCH, filter="", output_fields=["*"])
            try:
                while batch := iterator.next():
                    yield from (PromptRecord.from_row(row) for row in batch)
            finally:
                iterator.close()

    def insert_now(self, records: list[PromptRecord]) -> None:
        """Synchronous bulk insert (benchmarks and imports), in batches Milvus handles well."""
        for start in range(0, len(records), _BATCH):
            rows = [r.to_row() for r in records[start : start + _BATCH]]
            with self._client_lock:
                self._client.insert(self.collection, rows, timeout=self.rpc_timeout_s)

    def put(self, record: PromptRecord) -> None:
        """Queue an upsert of the record's current state (write-behind)."""
        row = record.to_row()
        with self._pending_lock:
            self._pending[record.id] = row

    def delete(self, row_id: int) -> None:
        with self._pending_lock:
            self._pending[row_id] = None

    def pending(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write every queued change now; on failure the changes stay queued. Returns rows written."""
        with self._pending_lock:
            batch, self._pending = self._pending, {}
        upserts = [row for row in batch.values() if row is not None]
        deletes = [row_id for row_id, row in batch.items() if row is None]
        try:
            with self._client_lock:
                for start in range(0, len(upserts), _BATCH):
                    self._client.upsert(self.collection, upserts[start : start + _BATCH], timeout=self.rpc_timeout_s)
                if deletes:
                    self._client.delete(self.collection, ids=deletes, timeout=self.rpc_timeout_s)
        except Exception:
            with self._pending_lock:  # keep newer changes made while we were writing
                self._pending = {**batch, **self._pending}
            raise
        return len(batch)

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception as err:  # Milvus down: keep the queue, retry next interval
                log.warning("milvus flush failed, %d changes kept for retry: %s", self.pending(), err)

    def search(self, vector: np.ndarray, cache_key: str, tenant: str | None) -> tuple[int, float] | None:
        """Top-1 search in Milvus itself, filtered by cache key (and tenant)."""
        expr = f"cache_key == {_quote(cache_key)}" + ("" if tenant is None else f" and tenant == {_quote(tenant)}")
        with self._client_lock:
            result = self._client.search(
                self.collection, data=[vector.tolist()], limit=1, filter=expr, timeout=self.rpc_timeout_s
            )
        if not result or not result[0]:
            return None
        return int(result[0][0]["id"]), float(result[0][0]["distance"])

    def count(self) -> int:
        with self._client_lock:
            return int(self._client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def close(self) -> None:
        """Flush and release the client; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._flusher.join(timeout=10)
        self.flush()
        with self._client_lock:
            self._client.close()


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
