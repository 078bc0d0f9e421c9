"""Mirror snapshot: the mirror's vectors and IVF trainings, kept in the cache directory so that the next open reads
neither every vector back from Milvus nor trains the search again.

At 100k prompts on a 2-core machine, reading the vectors from milvus-lite takes 5-8 s (about 50 µs per row in the
server however the reads are paged, plus the conversion of each page) and training the IVF of a 100k partition
6-9 s; loading a snapshot takes a fraction of a second. Milvus stays the store of record: a snapshot vector is used
only for a row whose id and `created` match the row Milvus holds (a row's vector never changes; a prompt admitted
again after its row was removed gets a new `created`), the rows it does not cover are read from Milvus, and a
missing, damaged or foreign snapshot (another dimension) is ignored. A training is reused while its partition has
not doubled since (as `search` would retrain it).

Written at close and, when the open had to read many vectors from Milvus, at open: a crash costs at most the rows
admitted since. One file per collection, written to a temporary name and renamed into place. Replicas sharing a
cache (a Milvus server, one latent volume) share the file: each writes it whole, the last rename wins, and since a
vector is used only where its row still matches Milvus, an older replica's snapshot only costs reads. A new replica
gains most: on a Milvus 2.3 server a vector read costs about 1 ms (20k prompts: 21 s to open without it).

Format 2 (written since the mirror's records carry no vectors) holds the whole mirror: every record with its
entries and each search partition with its serialized IVF (`mirror_image`). An open with it fills the mirror
before Milvus has answered and catches up with Milvus after (`reconcile`). A format-1 file (vectors at float16 or
float32 and IVF trainings, of an earlier version) still spares the vector reads of the open that reads Milvus first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nirvana.cache import mirror_image
from nirvana.cache.mirror import Mirror
from nirvana.cache.mirror_image import MirrorImage
from nirvana.cache.search import PartitionKey, Trained

log = logging.getLogger(__name__)

SUFFIX = ".npz"
STALE_TEMP_AGE_S = 3600.0


def snapshot_path(cache_dir: Path, collection: str) -> Path:
    return cache_dir / f"mirror-{collection}{SUFFIX}"


@dataclass
class Snapshot:
    """Vectors by (id, created), sorted by id, and the IVF training of each partition that had one."""

    ids: np.ndarray  # [n] int64, ascending
    created: np.ndarray  # [n] float64
    vectors: np.ndarray  # [n, dim] float16 (float32 in a snapshot of an earlier version)
    trained: dict[PartitionKey, Trained] = field(default_factory=dict)

    @classmethod
    def empty(cls, dim: int) -> Snapshot:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros((0, dim), np.float32))

    def positions(self, ids: np.ndarray, created: np.ndarray) -> np.ndarray:
        """For each (id, created): the row of `vectors` holding its vector, or -1 if the snapshot lacks it."""
        if len(self.ids) == 0:
            return np.full(len(ids), -1, np.int64)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        same = (self.ids[at] == ids) & (self.created[at] == created)
        return np.where(same, at, -1)


def _remove_stale_temps(path: Path) -> None:
    for temp in path.parent.glob(f".{path.name}.*.tmp"):  # left by a crash during a save
        # an hour old at least: a younger one may be another replica's save in progress (the file is shared)
        with contextlib.suppress(FileNotFoundError):
            if temp.stat().st_mtime < time.time() - STALE_TEMP_AGE_S:
                temp.unlink()


def load_snapshot(path: Path, dim: int) -> MirrorImage | Snapshot:
    """The snapshot at `path`: the whole mirror (format 2), or the vectors and trainings of a format-1 file; an
    empty `Snapshot` if there is none or it cannot be used (logged)."""
    _remove_stale_temps(path)
    if not path.is_file():
        return Snapshot.empty(dim)
    try:
        with np.load(path, allow_pickle=False) as data:
            return mirror_image.decode(data, dim) if "format" in data.files else _format1(data, dim)
    except Exception as err:  # a damaged or foreign file costs a slower open, never a failed one
        log.warning("mirror snapshot %s ignored (%s): the mirror is read from Milvus", path, err)
        return Snapshot.empty(dim)


def _format1(data: Mapping[str, np.ndarray], dim: int) -> Snapshot:
    ids, created, vectors = data["ids"], data["created"], data["vectors"]
    partitions = json.loads(str(data["partitions"]))
    trained = {
        (key, tenant): Trained(data[f"centroids_{i}"], int(rows), data[f"ids_{i}"], data[f"lists_{i}"])
        for i, (key, tenant, rows) in enumerate(partitions)
    }
    ok = ids.dtype == np.int64 and vectors.dtype in (np.float16, np.float32) and vectors.shape == (len(ids), dim)
    if not ok or created.shape != ids.shape or np.any(np.diff(ids) <= 0):
        raise ValueError(f"unexpected contents (vectors {vectors.dtype} {vectors.shape}, dim {dim})")
    if not all(_valid_training(t, dim) for t in trained.values()):
        raise ValueError("unexpected search training")
    return Snapshot(ids, created.astype(np.float64), vectors, trained)


def _valid_training(t: Trained, dim: int) -> bool:
    """faiss trusts the list numbers it is given (`search._add_assigned`): check them before it sees them."""
    nlist = len(t.centroids)
    shapes = t.centroids.dtype == np.float32 and t.centroids.shape == (nlist, dim) and nlist > 0
    shapes = shapes and t.ids.dtype == np.int64 and t.lists.dtype == np.int64 and t.ids.shape == t.lists.shape
    if not shapes or np.any(np.diff(t.ids) <= 0):
        return False
    return len(t.lists) == 0 or (int(t.lists.min()) >= 0 and int(t.lists.max()) < nlist)


def save_snapshot(path: Path, mirror: Mirror) -> int:
    """Write the whole mirror to `path` (format 2, atomically); returns the prompts written."""
    with mirror.lock:
        records = mirror.records()
        arrays = mirror_image.encode(records, mirror.search.states())
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return len(records)
