"""faiss IVF helpers of the search (`search`): a new inner-product IVF with float16 lists, list assignment, adding
rows at known lists, and bulk builds on every core."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import faiss
import numpy as np


def new_ivf(quantizer: faiss.Index, dim: int, nlist: int) -> faiss.IndexIVF:
    """Inner-product IVF whose lists store float16 codes (training it only trains the quantizer: fp16 has no
    parameters, so an IVF given earlier centroids is ready to add to)."""
    return faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )


def assign(ivf: faiss.IndexIVF, vectors: np.ndarray) -> np.ndarray:
    """The IVF list of each vector (its nearest centroid). Reads the quantizer only: safe beside searches."""
    return ivf.quantizer.assign(np.ascontiguousarray(vectors, np.float32), 1)[:, 0]


def add_assigned(ivf: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
    """Add rows whose list is known (-1: not known, assigned here) without searching the quantizer for them."""
    unknown = lists < 0
    if np.any(unknown):
        lists[unknown] = ivf.quantizer.assign(np.ascontiguousarray(vectors[unknown]), 1)[:, 0]
    # faiss reads through these pointers during the call: keep the arrays referenced until it returns
    vectors, ids, lists = (np.ascontiguousarray(a) for a in (vectors, np.asarray(ids, np.int64), lists))
    ivf.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """faiss on every core for a bulk build at open (a first open of a million rows spent 86 s building the
    mirror and its search on 2 cores), back after: serving searches one query at a time
    beside the UNet. OMP_NUM_THREADS, when set (a pod's CPU limit), caps it. The setting is the calling thread's:
    the one that opens the cache."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(usable_cores())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def usable_cores() -> int:
    configured = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
