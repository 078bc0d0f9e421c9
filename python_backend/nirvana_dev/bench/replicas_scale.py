"""`nirvana bench replicas`: N cache replicas, each its own process, on one Milvus server and one latent directory.

The Milvus server is the embedded Milvus 2.3 server (`nirvana_dev.milvus_server`). Replica 0 admits `prompts`
prompts (one latent each, 768-d vectors by default); every replica then waits until its mirror holds them (its
background refresh reads what replica 0 flushed), and reports its RSS and how long that took. All replicas then hit
the same hot prompts concurrently, `hits` lookups each, counting locally what they hit; they flush and close one
after the other (a rolling stop). The LCBFU count error is Milvus's stored hits of each entry against the hits the
replicas counted. Finally a new replica opens the cache as a pod added to the deployment would: its open time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from nirvana.cache.factory import open_cache
from nirvana.cache.index import MilvusIndex
from nirvana.cache.records import record_id
from nirvana.config import CacheConfig, PredictorConfig
from nirvana_dev.milvus_server import embedded_milvus_server

KEY, TENANT, K, STEPS, HOT = "bench", "default", 25, 50, 64


def _vectors(count: int, dim: int) -> np.ndarray:
    vectors = np.random.default_rng(7).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _replica(index: int, job: dict, barrier, results) -> None:
    """One replica's process (see the module docstring); puts its figures, or its error, on `results`."""
    try:
        results.put(_replica_run(index, job, barrier))
    except BaseException as err:
        barrier.abort()  # the others stop waiting for this one
        results.put({"replica": index, "error": repr(err)})


def _replica_run(index: int, job: dict, barrier) -> dict:
    config: CacheConfig = job["config"].model_copy(update={"replica_id": f"replica-{index}"})
    vectors = _vectors(job["prompts"], job["dim"])
    latent = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    out: dict = {"replica": index}
    cache = open_cache(config, job["dim"])
    try:
        if index == 0:
            t = time.perf_counter()
            for i, vector in enumerate(vectors):
                cache.admit(f"prompt {i}", vector, KEY, TENANT, {K: {"latent": latent}})
            cache.flush()
            out["admitted_per_s"] = round(len(vectors) / (time.perf_counter() - t), 1)
        barrier.wait()
        t, deadline = time.perf_counter(), time.monotonic() + 600
        while cache.mirror.entries < len(vectors) and time.monotonic() < deadline:
            time.sleep(0.1)
        out.update(synced_s=round(time.perf_counter() - t, 2), entries=cache.mirror.entries)
        out["rss_mib"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        barrier.wait()
        counted: Counter[int] = Counter()
        rng = np.random.default_rng(index)
        for _ in range(job["hits"]):
            found = cache.lookup(vectors[int(rng.integers(0, HOT))], KEY, TENANT, STEPS)
            if found.hit:
                counted[cache.record(KEY, TENANT, found.matched_prompt).id] += 1
        out["hits"] = dict(counted)
        barrier.wait()  # every replica's hits are in its mirror: now stop, one after the other
        time.sleep(0.5 * index)
    finally:
        cache.close()
    return out


def _stored_hits(uri: str, collection: str, dim: int, rows: list[int]) -> dict[int, int]:
    """Milvus's hits of each of `rows`, read by id (a scan can miss rows: `replicas.ReplicaSync.refresh`)."""
    index = MilvusIndex(uri, collection, dim, flush_interval_s=3600)
    try:
        return {row_id: r.entries[K].hits for row_id, r in index.fetch(rows).items() if K in r.entries}
    finally:
        index.close()


def run_replicas(
    replicas: int, prompts: int, hits: int, dim: int, work_dir: Path | None, milvus_uri: str | None = None
) -> dict:
    """The figures of the module docstring; `milvus_uri`: a running Milvus server to use (default: start the
    embedded one). The latent directory is a temporary folder under `work_dir`."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp, contextlib.ExitStack() as stack:
        uri = milvus_uri or stack.enter_context(embedded_milvus_server(Path(tmp) / "milvus"))
        config = CacheConfig(
            dir=Path(tmp) / "cache",
            milvus_uri=uri,
            collection=f"replicas_{uuid.uuid4().hex}",
            flush_interval_s=0.5,
            refresh_interval_s=1.0,
            max_entries=None,
            max_entries_per_tenant=None,
            latent_dtype="q6",
            predictor=PredictorConfig(enabled=False),
        )
        figures = _run_processes(replicas, {"config": config, "prompts": prompts, "hits": hits, "dim": dim})
        counted: Counter[int] = Counter()
        for figure in figures:
            counted.update(figure.pop("hits"))
        # Every bench row: hits stored on a row nobody counted are an error too
        rows = [record_id(KEY, TENANT, f"prompt {i}") for i in range(prompts)]
        stored = _stored_hits(uri, config.collection, dim, rows)
        errors = [abs(stored.get(row, 0) - counted.get(row, 0)) for row in rows]
        t = time.perf_counter()
        late = open_cache(config.model_copy(update={"replica_id": "late"}), dim)
        late_open_s, late_entries = time.perf_counter() - t, late.mirror.entries
        late.close()
    return {
        "dim": dim,
        "replicas": figures,
        "hits_counted": sum(counted.values()),
        "hits_stored": sum(stored.get(row, 0) for row in counted),
        "entries_hit": len(counted),
        "count_error": {"total": sum(errors), "max_per_entry": max(errors, default=0)},
        "new_replica_open_s": round(late_open_s, 2),
        "new_replica_entries": late_entries,
    }


def _run_processes(replicas: int, job: dict) -> list[dict]:
    """Start the replicas, wait for each one's figures (bounded: 30 min), in replica order."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(replicas, timeout=900), context.Queue()
    workers = [context.Process(target=_replica, args=(i, job, barrier, results)) for i in range(replicas)]
    for worker in workers:
        worker.start()
    try:
        figures = [results.get(timeout=1800) for _ in workers]
        failed = [f for f in figures if "error" in f]
        if failed:
            raise RuntimeError(f"replica processes failed: {failed}")
    finally:
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
    return sorted(figures, key=lambda f: f["replica"])
