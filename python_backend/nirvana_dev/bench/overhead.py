"""`nirvana bench overhead`: what the cache path costs at 10k and N cached prompts (up to a million).

Cache contents: real MiniLM embeddings of template prompts, carried into the served embedder's dimension (`dim`:
768 for SD 1.5's CLIP, 1280 for SDXL's pooled projection) by an orthonormal map, which keeps every cosine, and
spread into `size` distinct vectors (each a real embedding plus noise, cosine ≈ 0.9 to it), each with one
SD-1.5-sized latent in the blob store and a row in Milvus. The cache is then closed and reopened, so search runs on
what startup rebuilt from Milvus. Opening is timed twice, with its phases: the first open after the bulk import (no
mirror snapshot yet: every vector is read from Milvus and the search trained), in this process, and the reopen
after its close (a restart: from the snapshot) in a fresh process, which also reports the cache owner's memory and
admissions below and at capacity (`scale`).
Queries: near-duplicates of cached rows (cosine ≈ 0.97, which hit at K=25). Recall@1 compares the search's
top-1 with exact search (numpy over all vectors of the partition); `recall_at_1_cos085` (after the restart) does
the same for queries further away (cosine ≈ 0.85 to a cached row, the K=10–15 band), search only.
Latents are written straight to the blob store (not through `admit`, too slow for 100k rows) but bound to their row
as `admit` binds them: a lookup refuses an unbound blob. Lookups keep the default `near_equal_margin` (a random pick
within 0.005 of the best similarity): each query is ≈ 0.97 to its row and below 0.9 to any other, so the pick is
always the top-1 and recall_at_1 still measures the search.
"""

from __future__ import annotations

import itertools
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nirvana.cache.factory import open_cache
from nirvana.cache.latents import Binding
from nirvana.cache.manager import ApproximateCache
from nirvana.cache.reconcile import BESIDE
from nirvana.cache.records import EntryMeta, PromptRecord, blob_key, record_id
from nirvana.config import CacheConfig, PredictorConfig
from nirvana.embed import make_embedder
from nirvana_dev.bench.scale import disk_usage, machine_memory, restart_and_admit, timed_lookups

CACHE_KEY, TENANT, STEPS, K = "bench", "default", 50, 25

SUBJECTS = [
    "a red fox",
    "an old lighthouse",
    "a bowl of ramen",
    "a cyberpunk city",
    "a portrait of a knight",
    "a mountain lake",
    "a vintage car",
    "a cat wearing a hat",
    "a dragon",
    "a sailing ship",
    "a robot",
    "a forest cabin",
    "an astronaut",
    "a field of sunflowers",
    "a steampunk airship",
    "a koi pond",
]
SCENES = [
    "in the snow",
    "at sunset",
    "under the stars",
    "in the rain",
    "on a beach",
    "in a misty forest",
    "in a neon-lit alley",
    "on the moon",
    "in a desert",
    "by a river",
]
STYLES = [
    "photograph",
    "oil painting",
    "watercolor",
    "concept art, artstation",
    "pixel art",
    "studio lighting, 8k",
    "by greg rutkowski",
    "ukiyo-e woodcut",
    "pencil sketch",
    "3d render, octane",
]


def template_prompts() -> list[str]:
    return [f"{s} {c}, {t}" for s, c, t in itertools.product(SUBJECTS, SCENES, STYLES)]


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 4), "p99": round(float(np.percentile(values, 99)), 4)}


def _spread(base: np.ndarray, size: int, rng: np.random.Generator, cosine: float) -> np.ndarray:
    """`size` unit vectors, each a random base row plus isotropic noise giving about `cosine` to that row."""
    rows = base[rng.integers(0, len(base), size)]
    sigma = np.sqrt((1 / cosine**2 - 1) / base.shape[1])
    out = rows + sigma * rng.standard_normal(rows.shape).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _to_dim(base: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """`base` rows in `dim` dimensions through a random orthonormal map (cosines unchanged)."""
    if dim == base.shape[1]:
        return base
    if dim < base.shape[1]:
        raise ValueError(f"dim={dim}: below the MiniLM embeddings' {base.shape[1]}")
    basis, _ = np.linalg.qr(rng.standard_normal((dim, base.shape[1])))
    return (base @ basis.T).astype(np.float32)


def _exact_top1(queries: np.ndarray, vectors: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Index of each query's most similar vector, in chunks (500 × 1M scores at once would be 2 GB)."""
    best = np.full(len(queries), -np.inf, np.float32)
    where = np.zeros(len(queries), np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ vectors[start : start + chunk].T
        at = np.argmax(scores, axis=1)
        value = scores[np.arange(len(queries)), at]
        better = value > best
        best[better], where[better] = value[better], at[better] + start
    return where


def _fill(config: CacheConfig, vectors: np.ndarray, latent_shape: tuple[int, ...], rng: np.random.Generator) -> None:
    cache = open_cache(config, vectors.shape[1])
    latent = rng.standard_normal((1, *latent_shape)).astype(np.float32)
    now = time.time()
    records = []
    for i, vector in enumerate(vectors):
        prompt = f"bench prompt {i}"
        records.append(PromptRecord(record_id(CACHE_KEY, TENANT, prompt), prompt, CACHE_KEY, TENANT, vector, now))

    def put(record: PromptRecord) -> None:
        # Bound to its row as `ApproximateCache.admit` binds it: a lookup refuses (and removes) an unbound blob.
        binding = Binding(record.id, CACHE_KEY, TENANT, K)
        nbytes = cache.latents.put(blob_key(record.id, K), {"latent": latent}, {"k": K}, binding)
        record.entries[K] = EntryMeta(hits=0, last_access=now, nbytes=nbytes)

    with ThreadPoolExecutor(8) as pool:  # each put ends in an fsync: more threads than cores
        list(tqdm(pool.map(put, records), total=len(records), desc="latents", unit="blob"))
    for start in tqdm(range(0, len(records), 10_000), desc="milvus", unit="10k rows"):
        cache.index.insert_now(records[start : start + 10_000])
    cache.close()


def _open(config: CacheConfig, dim: int) -> tuple[ApproximateCache, dict[str, float]]:
    """Open the cache; returns it and the open's phases in seconds: total, the reconciliation's phases
    (`Reconciler.timings`, with the latent directory walk that ran beside them), and `milvus_open_s`, the rest
    (client, milvus-lite server start, load_collection)."""
    t0 = time.perf_counter()
    cache = open_cache(config, dim)
    total = time.perf_counter() - t0
    phases = dict(cache.open_timings)
    # the walk and the snapshot's preload ran beside the rest (their waits are phases of their own): not in the sum
    phases["milvus_open_s"] = total - sum(v for name, v in phases.items() if name not in BESIDE)
    return cache, {"total_s": round(total, 2), **{name: round(value, 2) for name, value in phases.items()}}


def _measure(config: CacheConfig, vectors: np.ndarray, queries: np.ndarray) -> dict:
    # The first open after the bulk import has no mirror snapshot: every vector comes from Milvus and the search
    # is trained. Queries then run on it; the restart (`scale`) opens from the snapshot written at its close.
    cache, first_open = _open(config, vectors.shape[1])
    try:
        stages, found = timed_lookups(cache, queries, _exact_top1(queries, vectors), CACHE_KEY, TENANT, STEPS)
        hit_rate = cache.counters.hits / len(queries)
    finally:
        cache.close()
    out = {name: _percentiles(values) for name, values in stages.items()}
    out.update({"recall_at_1": found / len(queries), "hit_rate": hit_rate, "open_first_s": first_open})
    return out


def _fill_and_measure(job: dict) -> dict:
    """A spawned process: the cache's rows, the fill, the first open and the queries. Its milvus-lite server goes
    with it, so the restart that follows (another process) can open the same file."""
    size, n_queries, config, latent_shape = job["size"], job["queries"], job["config"], job["latent_shape"]
    rng = np.random.default_rng(job["seed"])
    vectors = _spread(job["base"], size, rng, cosine=0.9)
    queries = _spread(vectors[rng.integers(0, size, n_queries)], n_queries, rng, cosine=0.97)
    far_queries = _spread(vectors[rng.integers(0, size, n_queries)], n_queries, rng, cosine=0.85)
    t = time.perf_counter()
    _fill(config, vectors, latent_shape, rng)
    figures = {"fill_s": round(time.perf_counter() - t, 1)}
    figures.update(_measure(config, vectors, queries))
    return {
        "figures": figures,
        "queries": queries,
        "exact": _exact_top1(queries, vectors),
        "far_queries": far_queries,
        "far_exact": _exact_top1(far_queries, vectors),
    }


def _one_size(config: CacheConfig, job: dict, admissions: int) -> dict:
    """Fill and query (one process), restart and admit (another), then disk bytes per entry."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        filled = pool.submit(_fill_and_measure, {**job, "config": config}).result()
    size, dim = job["size"], job["base"].shape[1]
    figures = filled["figures"]
    queries = {name: filled[name] for name in ("queries", "exact", "far_queries", "far_exact")}
    restart = restart_and_admit(config, dim, size, queries, job["latent_shape"], admissions, (CACHE_KEY, TENANT, K))
    latent_bytes = disk_usage(config.latent_dir)
    milvus_bytes = disk_usage(config.dir) - latent_bytes
    entries = restart["at_capacity"]["entries_after"]
    raw = size * dim * 4  # float32
    figures.update(
        {
            "restart": restart,
            "raw_vectors_mib": round(raw / 2**20, 1),
            "cache_owner_rss_over_raw_vectors": round(restart["cache_owner_rss_mib"] * 2**20 / raw, 2),
            "disk_bytes_per_entry": {
                "latents": round(latent_bytes / entries),
                "milvus_and_snapshot": round(milvus_bytes / entries),
            },
            "machine_memory_at_end": machine_memory(),
        }
    )
    return figures


def run_overhead(
    sizes: list[int],
    n_queries: int,
    latent_shape: tuple[int, ...],
    work_dir: Path | None,
    dim: int = 768,
    latent_dtype: str = "q6",
    admissions: int = 2000,
) -> dict:
    rng = np.random.default_rng(0)
    embedder = make_embedder("minilm")
    prompts = template_prompts()
    base = _to_dim(embedder.embed(prompts), dim, rng)
    embed_ms = []
    for prompt in prompts[:200]:
        t = time.perf_counter()
        embedder.embed_one(prompt + " (variant)")
        embed_ms.append((time.perf_counter() - t) * 1e3)
    report: dict = {
        "latent_shape": list(latent_shape),
        "latent_dtype": latent_dtype,
        "dim": dim,
        "queries": n_queries,
        "embed_ms": _percentiles(embed_ms),
        "entries": {},
    }
    for size in sizes:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            # predictor off: every query is a near-duplicate, so it only adds its own (reported) cost. No budget,
            # the per-tenant one included: all `size` rows are one tenant's, over its default cap.
            config = CacheConfig(
                dir=Path(tmp),
                max_entries=None,
                max_bytes=None,
                max_entries_per_tenant=None,
                max_bytes_per_tenant=None,
                latent_dtype=latent_dtype,
                predictor=PredictorConfig(enabled=False),
            )
            job = {"size": size, "queries": n_queries, "base": base, "latent_shape": latent_shape, "seed": size}
            report["entries"][str(size)] = _one_size(config, job, admissions)
    return report
