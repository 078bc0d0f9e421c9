"""`nirvana bench overhead`'s restart, memory, admission and eviction figures, measured in a fresh process.

The restart is a child process (spawned: no memory inherited from the bench) that opens the cache the bench filled,
as a restarted pod does, and reports:
- the open's phases and the process's RSS once open (the cache owner: mirror, search, latent directory state), and
  that of the milvus-lite server it started (a child of its own);
- for a restart from the snapshot that is ready before it has caught up with Milvus (`reconcile`): the cache path
  of lookups served meanwhile, and how long after the open it had caught up;
- recall@1 of queries at cosine ≈ 0.85 after the restart;
- admissions through `ApproximateCache.admit` (the admission queue's writer calls the same), each a new prompt with
  one latent, first below capacity, then at capacity (`max_entries` = the entries held once the first ones are in),
  where each admission evicts in LCBFU order: admissions/s, their latency, the worst one, and entries held at the
  end against the capacity; the RSS again after them. The flush of the queued rows to Milvus is timed with them.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from nirvana.cache.factory import open_cache
from nirvana.cache.records import record_id
from nirvana.config import CacheConfig

CATCH_UP_TIMEOUT_S = 1800.0  # a restart not caught up with Milvus by then reports None


def _mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def _tree_rss(process: psutil.Process) -> dict[str, float]:
    """RSS (MiB) of `process` and of its children (milvus-lite's server), separately."""
    children = 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:
            continue
    return {"cache_owner_rss_mib": _mib(process.memory_info().rss), "milvus_lite_rss_mib": _mib(children)}


def _latencies(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "max_ms": round(float(np.max(values)), 1),
    }


def _admit_run(cache, vectors: np.ndarray, start: int, latent: np.ndarray, key: str, tenant: str, k: int) -> dict:
    """Admit one new prompt per vector (ids from `start`); their latency, and admissions/s including the flush."""
    times = []
    t0 = time.perf_counter()
    for i, vector in enumerate(vectors, start):
        t = time.perf_counter()
        cache.admit(f"admitted prompt {i}", vector, key, tenant, {k: {"latent": latent}})
        times.append((time.perf_counter() - t) * 1e3)
    t_flush = time.perf_counter()
    cache.flush()
    elapsed = time.perf_counter() - t0
    return {
        "admissions": len(vectors),
        "per_s": round(len(vectors) / elapsed, 1),
        "flush_s": round(time.perf_counter() - t_flush, 2),
        **_latencies(times),
    }


def timed_lookups(
    cache, queries: np.ndarray, exact: np.ndarray, key: str, tenant: str, steps: int
) -> tuple[dict[str, list[float]], int]:
    """Each query's cache path (`cache_path_ms`: search, K choice, latent load) and its stages in ms, and how many
    matched their nearest bench prompt (`exact`: its index, from exact search)."""
    stages: dict[str, list[float]] = {"search_ms": [], "select_ms": [], "latent_load_ms": [], "cache_path_ms": []}
    found = 0
    for query, want in zip(queries, exact, strict=True):
        t = time.perf_counter()
        lookup = cache.lookup(query, key, tenant, steps)
        stages["cache_path_ms"].append((time.perf_counter() - t) * 1e3)
        for name in ("search_ms", "select_ms", "latent_load_ms"):
            stages[name].append(lookup.timings_ms.get(name, 0.0))
        record = cache.record(key, tenant, lookup.matched_prompt) if lookup.matched_prompt else None
        found += record is not None and record.id == record_id(key, tenant, f"bench prompt {want}")
    return stages, found


def _lookups(cache, queries: np.ndarray, exact: np.ndarray, key: str, tenant: str) -> dict:
    """The cache path of near-duplicate queries on the restarted cache, and recall@1 against exact search."""
    stages, found = timed_lookups(cache, queries, exact, key, tenant, 50)
    out = {
        f"after_restart_{name}": _latencies(stages[name]) for name in ("search_ms", "latent_load_ms", "cache_path_ms")
    }
    return {**out, "after_restart_recall_at_1": found / len(queries)}


def _restarted(job: dict) -> dict:
    """The child process: open, measure, admit below and at capacity, close (see the module docstring)."""
    n = job["admissions"]
    # Capacity: what is held once the first `n` are in; every admission after that must evict (LCBFU) to fit
    config: CacheConfig = job["config"].model_copy(update={"max_entries": job["entries"] + n})
    before = psutil.Process().memory_info().rss  # the interpreter and the libraries, before the cache exists
    t0 = time.perf_counter()
    cache = open_cache(config, job["dim"])
    open_s = time.perf_counter() - t0
    try:
        return _measure_restarted(cache, job, config, open_s, before)
    finally:
        cache.close()


def _measure_restarted(cache, job: dict, config: CacheConfig, open_s: float, before: int) -> dict:
    key, tenant, k = job["cache_key"], job["tenant"], job["k"]
    n = job["admissions"]
    opened_at = time.perf_counter()
    out: dict = {"open_s": round(open_s, 2), "rss_before_open_mib": _mib(before)}
    out.update(_tree_rss(psutil.Process()))
    out["entries_at_open"] = cache.mirror.entries
    # A large restart from the snapshot is ready before it has caught up with Milvus (`reconcile`): lookups served
    # meanwhile, then the time until it had, and the steady-state figures after
    if not cache.caught_up.is_set():
        stages, _ = timed_lookups(cache, job["queries"][:200], job["exact"][:200], key, tenant, 50)
        out["during_catch_up_cache_path_ms"] = _latencies(stages["cache_path_ms"])
    caught_up = cache.caught_up.wait(CATCH_UP_TIMEOUT_S)
    out["caught_up_after_open_s"] = round(time.perf_counter() - opened_at, 2) if caught_up else None
    out["open_phases_s"] = {name: round(value, 2) for name, value in cache.open_timings.items()}
    out.update({f"{name}_caught_up": value for name, value in _tree_rss(psutil.Process()).items()})
    out.update(_lookups(cache, job["queries"], job["exact"], key, tenant))
    found = 0
    for query, want in zip(job["far_queries"], job["far_exact"], strict=True):
        match = cache.mirror.search.best((key, tenant), query)
        found += match is not None and match.id == record_id(key, tenant, f"bench prompt {want}")
    out["recall_at_1_cos085"] = found / len(job["far_queries"])
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((1, *job["latent_shape"])).astype(np.float32)
    new = rng.standard_normal((2 * n, job["dim"])).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    first = job.get("first_admitted", 0)  # another restart of the same cache admits prompts of its own
    out["below_capacity"] = _admit_run(cache, new[:n], first, latent, key, tenant, k)
    out["at_capacity"] = _admit_run(cache, new[n:], first + n, latent, key, tenant, k)
    out["at_capacity"].update(
        capacity=config.max_entries, entries_after=cache.mirror.entries, evictions=cache.counters.evictions
    )
    out.update({f"{name}_after_admissions": value for name, value in _tree_rss(psutil.Process()).items()})
    return out


def restart_and_admit(
    config: CacheConfig,
    dim: int,
    entries: int,
    queries: dict[str, np.ndarray],
    latent_shape: tuple[int, ...],
    admissions: int,
    names: tuple[str, str, int],
    first_admitted: int = 0,
) -> dict:
    """Run `_restarted` in a spawned process on the bench's cache of `entries` rows, one entry each; `queries`:
    near (`queries`, `exact`) and far (`far_queries`, `far_exact`) ones with their nearest rows; `names`: (cache
    key, tenant, K) of the rows; `first_admitted`: the number of its first admitted prompt ("admitted prompt N")."""
    key, tenant, k = names
    job = {
        "config": config,
        "dim": dim,
        "entries": entries,
        **queries,
        "latent_shape": latent_shape,
        "admissions": admissions,
        "cache_key": key,
        "tenant": tenant,
        "k": k,
        "first_admitted": first_admitted,
    }
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_restarted, job).result()


def disk_usage(root: Path) -> int:
    """Bytes of the files under `root` (the latent directory, Milvus's files)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total


def machine_memory() -> dict[str, float]:
    memory = psutil.virtual_memory()
    return {"total_mib": _mib(memory.total), "used_mib": _mib(memory.used), "available_mib": _mib(memory.available)}
