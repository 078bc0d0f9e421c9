"""In-process nearest-prompt search, partitioned by (cache key, tenant).

Milvus is the store of record; this is the request path's copy of its vectors. Measured on a 2-core machine
(100k rows × 384 dims, filtered top-1), milvus-lite cannot give both ≤ 5 ms and recall ≥ 0.99, so:

* a partition holds only the rows a request may match (same cache key, same tenant), so the filter is free;
* small partitions (≤ `exact_max_rows`) are searched exactly with one matrix-vector product;
* large partitions use a faiss IVF index (inner product on unit vectors = cosine) trained on the partition,
  plus an exact "tail" of rows added since the last build; the tail is merged into the IVF lists when it
  grows past `tail_max_rows`, and the IVF is retrained when the partition has doubled since training.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

PartitionKey = tuple[str, str]  # (cache_key, tenant)


@dataclass(frozen=True)
class Match:
    id: int
    similarity: float


class _ExactRows:
    """Growable matrix of rows with O(1) delete (swap with last)."""

    def __init__(self, dim: int) -> None:
        self.vectors = np.zeros((64, dim), np.float32)
        self.ids = np.zeros(64, np.int64)
        self.pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.pos)

    def add(self, row_id: int, vector: np.ndarray) -> None:
        n = len(self.pos)
        if n == len(self.ids):
            self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
            self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])
        self.vectors[n] = vector
        self.ids[n] = row_id
        self.pos[row_id] = n

    def remove(self, row_id: int) -> bool:
        at = self.pos.pop(row_id, None)
        if at is None:
            return False
        last = len(self.pos)
        if at != last:
            self.vectors[at] = self.vectors[last]
            self.ids[at] = self.ids[last]
            self.pos[int(self.ids[at])] = at
        return True

    def top(self, query: np.ndarray, k: int) -> list[Match]:
        n = len(self.pos)
        if n == 0:
            return []
        scores = self.vectors[:n] @ query
        at = [int(np.argmax(scores))] if k == 1 else np.argpartition(-scores, min(k, n) - 1)[:k]
        return [Match(int(self.ids[i]), float(scores[i])) for i in at]

    def take_all(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.pos)
        return self.ids[:n].copy(), self.vectors[:n].copy()


class _Partition:
    def __init__(self, dim: int, exact_max_rows: int, nprobe: int, tail_max_rows: int) -> None:
        self.dim = dim
        self.exact_max_rows = exact_max_rows
        self.nprobe = nprobe
        self.tail_max_rows = tail_max_rows
        self.tail = _ExactRows(dim)  # every row while the partition is small; recent rows after that
        self.ivf: faiss.IndexIVFFlat | None = None
        self.ivf_ids: set[int] = set()
        self.trained_at = 0

    def __len__(self) -> int:
        return len(self.tail) + len(self.ivf_ids)

    def add(self, row_id: int, vector: np.ndarray) -> None:
        self.tail.add(row_id, vector)
        if self.ivf is None and len(self) > self.exact_max_rows:
            self._build(self.tail.take_all())
        elif self.ivf is not None and len(self) >= 2 * self.trained_at:
            self._build(self._all_rows())
        elif self.ivf is not None and len(self.tail) > self.tail_max_rows:
            ids, vectors = self.tail.take_all()
            self.ivf.add_with_ids(vectors, ids)
            self.ivf_ids.update(ids.tolist())
            self.tail = _ExactRows(self.dim)

    def remove(self, row_id: int) -> None:
        if self.tail.remove(row_id):
            return
        if row_id in self.ivf_ids and self.ivf is not None:
            self.ivf.remove_ids(np.array([row_id], np.int64))
            self.ivf_ids.discard(row_id)

    def top(self, query: np.ndarray, k: int) -> list[Match]:
        found = self.tail.top(query, k)
        if self.ivf is not None and self.ivf_ids:
            scores, ids = self.ivf.search(query[None, :], k)
            found += [Match(int(i), float(d)) for d, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        return sorted(found, key=lambda m: -m.similarity)[:k]

    def _all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = self.tail.take_all()
        if self.ivf is not None and self.ivf_ids:
            ivf_ids = np.fromiter(self.ivf_ids, np.int64, len(self.ivf_ids))
            ivf_vectors = np.stack([self.ivf.reconstruct(int(i)) for i in ivf_ids])
            ids, vectors = np.concatenate([ivf_ids, ids]), np.concatenate([ivf_vectors, vectors])
        return ids, vectors

    def _build(self, rows: tuple[np.ndarray, np.ndarray]) -> None:
        ids, vectors = rows
        # 4·sqrt(n) lists (faiss guideline), but at least ~40 training points per list
        nlist = int(np.clip(min(4 * np.sqrt(len(ids)), len(ids) / 40), 16, 4096))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if len(vectors) > 64 * nlist:
            sample = vectors[np.random.default_rng(0).choice(len(vectors), 64 * nlist, replace=False)]
        ivf.train(sample)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct() and cheap remove_ids() by id
        ivf.add_with_ids(vectors, ids)
        ivf.nprobe = min(self.nprobe, nlist)
        self.ivf, self.ivf_ids, self.trained_at = ivf, set(ids.tolist()), len(ids)
        self.tail = _ExactRows(self.dim)


class PartitionedSearch:
    """Top-1 inner-product search over unit vectors, one partition per (cache key, tenant). Thread-safe."""

    def __init__(self, dim: int, exact_max_rows: int = 8192, nprobe: int = 48, tail_max_rows: int = 4096) -> None:
        self.dim = dim
        self._params = (exact_max_rows, nprobe, tail_max_rows)
        self._partitions: dict[PartitionKey, _Partition] = {}
        self._where: dict[int, PartitionKey] = {}
        self._lock = threading.Lock()
        faiss.omp_set_num_threads(1)  # one query at a time; threads would only contend with the UNet

    def __len__(self) -> int:
        return len(self._where)

    def add(self, partition: PartitionKey, row_id: int, vector: np.ndarray) -> None:
        vector = np.ascontiguousarray(vector, np.float32)
        with self._lock:
            if row_id in self._where:
                self._partitions[self._where[row_id]].remove(row_id)
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = _Partition(self.dim, *self._params)
            part.add(row_id, vector)
            self._where[row_id] = partition

    def add_many(self, partition: PartitionKey, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Bulk load of new ids (startup): one index build instead of one per doubling."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        with self._lock:
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = _Partition(self.dim, *self._params)
            if len(part) == 0 and len(row_ids) > part.exact_max_rows:
                part._build((np.asarray(row_ids, np.int64), vectors))
            else:
                for row_id, vector in zip(row_ids, vectors, strict=True):
                    part.add(int(row_id), vector)
            self._where.update(dict.fromkeys((int(i) for i in row_ids), partition))

    def remove(self, row_id: int) -> None:
        with self._lock:
            partition = self._where.pop(row_id, None)
            if partition is not None:
                self._partitions[partition].remove(row_id)

    def top(self, partition: PartitionKey, query: np.ndarray, k: int = 1) -> list[Match]:
        """Up to `k` nearest rows of the partition, most similar first."""
        query = np.ascontiguousarray(query, np.float32)
        with self._lock:
            part = self._partitions.get(partition)
            return [] if part is None else part.top(query, k)

    def best(self, partition: PartitionKey, query: np.ndarray) -> Match | None:
        found = self.top(partition, query, 1)
        return found[0] if found else None

    def partition_sizes(self) -> dict[PartitionKey, int]:
        with self._lock:
            return {key: len(part) for key, part in self._partitions.items()}
