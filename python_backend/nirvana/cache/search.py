"""In-process nearest-prompt search, partitioned by (cache key, tenant).

Milvus is the store of record; this is the request path's copy of its vectors. Measured on a 2-core machine
(100k rows × 384 dims, filtered top-1), milvus-lite cannot give both ≤ 5 ms and recall ≥ 0.99, so:

* a partition holds only the rows a request may match (same cache key, same tenant), so the filter is free;
* small partitions (≤ `exact_max_rows`) are searched exactly with one matrix-vector product;
* large partitions use a faiss IVF index (inner product on unit vectors = cosine) trained on the partition,
  plus an exact "tail" of rows added since the last build; the tail is merged into the IVF lists when it
  grows past `tail_max_rows`, and the IVF is retrained when the partition has doubled since training.
* the IVF lists hold each vector at float16 (`IndexIVFScalarQuantizer`, QT_fp16): half the bytes of float32 and,
  measured at 100k × 768 on 2 cores, a search of 0.42 ms against 0.87 ms; the similarity it returns differs from
  float32's by about 1e-4, far below the K table's steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import faiss
import numpy as np

from nirvana.cache.exact_rows import ExactRows, Match
from nirvana.cache.ivf import add_assigned, assign, every_core, new_ivf

PartitionKey = tuple[str, str]  # (cache_key, tenant)


TRAIN_POINTS_PER_LIST = 40  # k-means sample per IVF list; faiss warns below 39 (64 took 9 s at 100k rows, 2 cores)


@dataclass(frozen=True)
class Trained:
    """A partition's IVF training: its centroids ([nlist, dim]), the partition's size when trained, and which
    list each indexed row was in (`ids` ascending, `lists` aligned), so a rebuild need not assign them again."""

    centroids: np.ndarray
    rows: int
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lists: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def lists_of(self, ids: np.ndarray) -> np.ndarray:
        """The list of each of `ids` (-1 where unknown)."""
        if len(self.ids) == 0:
            return np.full(len(ids), -1, np.int64)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[at] == ids, self.lists[at], -1).astype(np.int64)


@dataclass(frozen=True)
class PartitionState:
    """What a partition holds, for the mirror snapshot: its exact rows (ids, float16 vectors) and its IVF, serialized
    by faiss (lists, centroids and direct map: restoring it needs no k-means and no assignment), with its ids."""

    tail_ids: np.ndarray
    tail_vectors: np.ndarray
    ivf: np.ndarray | None  # uint8, `faiss.serialize_index`
    ivf_ids: np.ndarray
    trained_at: int


class _Partition:
    def __init__(self, dim: int, exact_max_rows: int, nprobe: int, tail_max_rows: int) -> None:
        self.dim = dim
        self.exact_max_rows = exact_max_rows
        self.nprobe = nprobe
        self.tail_max_rows = tail_max_rows
        self.tail = ExactRows(dim)  # every row while the partition is small; recent rows after that
        self.ivf: faiss.IndexIVF | None = None
        self.ivf_ids: set[int] = set()
        self.trained_at = 0
        self.merging = False  # a tail merge is being assigned (outside the search's lock)

    def __len__(self) -> int:
        return len(self.tail) + len(self.ivf_ids)

    def add(self, row_id: int, vector: np.ndarray) -> bool:
        """Add a row to the tail (building the IVF when the partition outgrows exact search or doubles); returns
        whether the tail is due to move into the IVF (`merge_assigned`), which no other call is doing."""
        self.tail.add(row_id, vector)
        if self.ivf is None and len(self) > self.exact_max_rows:
            self._build(self.tail.take_all())
        elif self.ivf is not None and len(self) >= 2 * self.trained_at:
            self._build(self._all_rows())
        return self.ivf is not None and len(self.tail) > self.tail_max_rows and not self.merging

    def merge_assigned(self, ivf: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
        """Move the rows of `ids` (with these vectors) that are still in the tail into `ivf`, at the lists they were
        assigned, if `ivf` is still this partition's (a rebuild took every row)."""
        self.merging = False
        if ivf is not self.ivf:
            return
        # still there with the same vector (not removed, nor removed and added again meanwhile)
        at = [self.tail.pos.get(i) for i in ids.tolist()]
        same = (p is not None and np.array_equal(self.tail.vectors[p], v) for p, v in zip(at, vectors, strict=True))
        keep = np.fromiter(same, bool, len(ids))
        add_assigned(ivf, ids[keep], vectors[keep], lists[keep])
        self.ivf_ids.update(ids[keep].tolist())
        for row_id in ids[keep].tolist():
            self.tail.remove(row_id)

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

    def vector(self, row_id: int) -> np.ndarray | None:
        found = self.tail.vector(row_id)
        if found is None and self.ivf is not None and row_id in self.ivf_ids:
            found = self.ivf.reconstruct(row_id)  # the float16 code: within 1e-4 of the vector added
        return found

    def state(self) -> PartitionState:
        ids, vectors = self.tail.take_all()
        blob = faiss.serialize_index(self.ivf) if self.ivf is not None else None
        ivf_ids = np.sort(np.fromiter(self.ivf_ids, np.int64, len(self.ivf_ids)))
        return PartitionState(ids, vectors.astype(np.float16), blob, ivf_ids, self.trained_at)

    def restore(self, state: PartitionState) -> None:
        """Take the rows and IVF of `state` (an empty partition only)."""
        if state.ivf is not None:
            ivf = faiss.deserialize_index(state.ivf)
            if not isinstance(ivf, faiss.IndexIVF) or ivf.d != self.dim or ivf.ntotal != len(state.ivf_ids):
                raise ValueError(f"snapshot IVF of {ivf.ntotal} rows × {ivf.d} does not fit {len(state.ivf_ids)} ids")
            ivf.nprobe = min(self.nprobe, ivf.nlist)
            self.ivf, self.ivf_ids, self.trained_at = ivf, set(state.ivf_ids.tolist()), state.trained_at
        self.tail.add_many(state.tail_ids, state.tail_vectors.astype(np.float32))

    def _all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = self.tail.take_all()
        if self.ivf is not None and self.ivf_ids:
            ivf_ids = np.fromiter(self.ivf_ids, np.int64, len(self.ivf_ids))
            ivf_vectors = np.stack([self.ivf.reconstruct(int(i)) for i in ivf_ids])
            ids, vectors = np.concatenate([ivf_ids, ids]), np.concatenate([ivf_vectors, vectors])
        return ids, vectors

    def _build(self, rows: tuple[np.ndarray, np.ndarray], trained: Trained | None = None) -> None:
        """Index `rows` in a new IVF, trained on them, or on the centroids of an earlier training (`trained`)."""
        ids, vectors = rows
        quantizer = faiss.IndexFlatIP(self.dim)
        if trained is not None:
            nlist = len(trained.centroids)
            ivf = new_ivf(quantizer, self.dim, nlist)
            quantizer.add(np.ascontiguousarray(trained.centroids, np.float32))
            ivf.is_trained = True
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            add_assigned(ivf, ids, vectors, trained.lists_of(ids))
        else:
            # 4·sqrt(n) lists (faiss guideline), but at least ~40 training points per list
            nlist = int(np.clip(min(4 * np.sqrt(len(ids)), len(ids) / 40), 16, 4096))
            ivf = new_ivf(quantizer, self.dim, nlist)
            sample = vectors
            if len(vectors) > TRAIN_POINTS_PER_LIST * nlist:
                picked = np.random.default_rng(0).choice(len(vectors), TRAIN_POINTS_PER_LIST * nlist, replace=False)
                sample = vectors[picked]
            ivf.train(sample)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct() and cheap remove_ids() by id
            ivf.add_with_ids(vectors, ids)
        ivf.nprobe = min(self.nprobe, nlist)
        self.ivf, self.ivf_ids = ivf, set(ids.tolist())
        self.trained_at = trained.rows if trained is not None else len(ids)
        self.tail = ExactRows(self.dim)

    def trained(self) -> Trained | None:
        """The IVF's centroids and the rows it was trained on (None while the partition is searched exactly)."""
        if self.ivf is None:
            return None
        ids, lists = [], []
        for i in range(self.ivf.nlist):
            if size := self.ivf.invlists.list_size(i):
                ids.append(faiss.rev_swig_ptr(self.ivf.invlists.get_ids(i), size).copy())
                lists.append(np.full(size, i, np.int64))
        ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        lists_all = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        order = np.argsort(ids_all)
        centroids = self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)
        return Trained(centroids, self.trained_at, ids_all[order], lists_all[order])


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
                self._remove_from(self._where[row_id], row_id)
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = _Partition(self.dim, *self._params)
            merge = part.add(row_id, vector)
            self._where[row_id] = partition
            if merge:
                part.merging = True
                ivf, (ids, vectors) = part.ivf, part.tail.take_all()
        if merge:  # the rows' lists are found without the lock (4,096 rows at 4,000 lists: about a second)
            lists = None
            try:
                lists = assign(ivf, vectors)
            finally:
                with self._lock:
                    if lists is None:
                        part.merging = False
                    else:
                        part.merge_assigned(ivf, ids, vectors, lists)

    def add_many(
        self, partition: PartitionKey, row_ids: np.ndarray, vectors: np.ndarray, trained: Trained | None = None
    ) -> None:
        """Bulk load of new ids (startup): one index build instead of one per doubling. `trained`: an earlier
        training of this partition (`trained()`), reused (no k-means) while the partition has not doubled since."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        with self._lock:
            part = self._partitions.get(partition)
            if part is None:
                part = self._partitions[partition] = _Partition(self.dim, *self._params)
            if len(part) == 0 and len(row_ids) > part.exact_max_rows:
                usable = trained is not None and trained.centroids.shape[1:] == (self.dim,)
                usable = usable and 0 < len(trained.centroids) <= len(row_ids) < 2 * trained.rows
                with every_core():
                    part._build((np.asarray(row_ids, np.int64), vectors), trained if usable else None)
            else:
                for row_id, vector in zip(row_ids, vectors, strict=True):
                    if part.add(int(row_id), vector):
                        ivf, (ids, tail) = part.ivf, part.tail.take_all()
                        part.merge_assigned(ivf, ids, tail, assign(ivf, tail))
            self._where.update(dict.fromkeys((int(i) for i in row_ids), partition))

    def remove(self, row_id: int) -> None:
        with self._lock:
            partition = self._where.pop(row_id, None)
            if partition is not None:
                self._remove_from(partition, row_id)

    def _remove_from(self, partition: PartitionKey, row_id: int) -> None:
        """Remove a row; a partition leaves with its last row (each holds ~100 KB even empty)."""
        part = self._partitions[partition]
        part.remove(row_id)
        if len(part) == 0:
            del self._partitions[partition]

    def top(self, partition: PartitionKey, query: np.ndarray, k: int = 1) -> list[Match]:
        """Up to `k` nearest rows of the partition, most similar first."""
        query = np.ascontiguousarray(query, np.float32)
        with self._lock:
            part = self._partitions.get(partition)
            return [] if part is None else part.top(query, k)

    def best(self, partition: PartitionKey, query: np.ndarray) -> Match | None:
        found = self.top(partition, query, 1)
        return found[0] if found else None

    def vector(self, row_id: int) -> np.ndarray | None:
        """The row's vector ([dim] float32; an IVF row's is its float16 code), or None if not held."""
        with self._lock:
            partition = self._where.get(row_id)
            return None if partition is None else self._partitions[partition].vector(row_id)

    def sample_vectors(self, limit: int, rng: np.random.Generator) -> np.ndarray:
        """[≤ limit, dim] float32: the vectors of up to `limit` rows drawn at random (the hit predictor's fit)."""
        with self._lock:
            ids = np.fromiter(self._where, np.int64, len(self._where))
            picked = ids if len(ids) <= limit else rng.choice(ids, limit, replace=False)
            rows = [self._partitions[self._where[int(i)]].vector(int(i)) for i in picked]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)

    def states(self) -> dict[PartitionKey, PartitionState]:
        """Every partition's rows and IVF (the mirror snapshot; `restore` takes them back)."""
        with self._lock:
            return {key: part.state() for key, part in self._partitions.items()}

    def restore(self, states: dict[PartitionKey, PartitionState]) -> None:
        """Load `states` into this empty search."""
        with self._lock:
            if self._where:
                raise RuntimeError("restore into a search that holds rows")
            for key, state in states.items():
                part = self._partitions[key] = _Partition(self.dim, *self._params)
                part.restore(state)
                ids = np.concatenate([state.tail_ids, state.ivf_ids]).tolist()
                self._where.update(dict.fromkeys(ids, key))

    def trained(self) -> dict[PartitionKey, Trained]:
        """The IVF training of each partition that has one (kept across restarts: `add_many`)."""
        with self._lock:
            found = {key: part.trained() for key, part in self._partitions.items()}
        return {key: t for key, t in found.items() if t is not None}

    def partition_sizes(self) -> dict[PartitionKey, int]:
        with self._lock:
            return {key: len(part) for key, part in self._partitions.items()}
