"""Two ApproximateCache replicas on one collection and one latent directory: admissions, hits and evictions of one
are seen by the other after a mirror refresh, and per-replica hit counts add up in Milvus.

A Milvus server is what replicas share in production (tests/integration/test_two_servers_one_cache.py starts
one); here the two caches are two clients of one milvus-lite file in one process, which exercises the same merge
and refresh code.
"""

import concurrent.futures

import numpy as np
import pytest

from nirvana.cache.factory import open_cache
from nirvana.cache.index import MilvusIndex
from nirvana.cache.manager import ApproximateCache
from nirvana.cache.records import blob_key
from nirvana.config import CacheConfig, PredictorConfig, SearchConfig

DIM, STEPS, KEY = 16, 50, "key"


def _vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    return v


def _states(ks=(5, 25)) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {k: {"latent": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for k in ks}


@pytest.fixture
def replicas(tmp_path):
    base = CacheConfig(
        dir=tmp_path / "cache",
        flush_interval_s=3600,
        predictor=PredictorConfig(enabled=False),
        min_entries_per_prompt=0,
    )
    a = open_cache(base.model_copy(update={"replica_id": "a"}), DIM)
    b = open_cache(base.model_copy(update={"replica_id": "b"}), DIM)
    yield a, b
    a.close(), b.close()


def _stored(cache: ApproximateCache, prompt: str) -> dict:
    row = next(r for r in cache.index.load_all() if r.prompt == prompt)
    return {k: e.replica_hits for k, e in row.entries.items()}


def test_admitted_through_a_is_a_hit_through_b_after_refresh(replicas) -> None:
    a, b = replicas
    a.admit("a red fox", _vec(0), KEY, "t", _states())
    a.flush()
    assert b.lookup(_vec(0), KEY, "t", STEPS).reason == "empty"  # B's mirror was loaded before the admission
    assert b.refresh()["added"] == 1
    hit = b.lookup(_vec(0), KEY, "t", STEPS)
    assert hit.hit and hit.k == 25 and hit.matched_prompt == "a red fox"
    b.flush()
    assert _stored(a, "a red fox") == {5: {}, 25: {"b": 1}}


def test_concurrent_hits_on_both_replicas_all_counted(replicas) -> None:
    a, b = replicas
    a.admit("a red fox", _vec(0), KEY, "t", _states())
    a.flush()
    b.refresh()

    def hit(cache: ApproximateCache) -> bool:
        return cache.lookup(_vec(0), KEY, "t", STEPS).hit

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(hit, [a, b] * 20))
        for _ in range(3):  # flushes while hits keep coming, on both sides
            list(pool.map(lambda c: c.flush(), [a, b]))
        results += list(pool.map(hit, [a, b] * 10))
    a.flush(), b.flush()
    assert all(results) and len(results) == 60
    assert _stored(a, "a red fox")[25] == {"a": 30, "b": 30}
    a.refresh(), b.refresh()  # each mirror now holds the other's count too
    assert a.record(KEY, "t", "a red fox").entries[25].hits == b.record(KEY, "t", "a red fox").entries[25].hits == 60


def test_a_count_overwritten_by_a_racing_flush_is_rewritten_at_refresh(replicas, monkeypatch) -> None:
    a, b = replicas
    a.admit("a red fox", _vec(0), KEY, "t", _states())
    a.flush()
    b.refresh()
    stale = b.index.fetch([a.record(KEY, "t", "a red fox").id])  # B reads the row ...
    for _ in range(2):
        a.lookup(_vec(0), KEY, "t", STEPS)
    a.flush()  # ... A writes its 2 hits ...
    b.lookup(_vec(0), KEY, "t", STEPS)
    monkeypatch.setattr(b.index, "fetch", lambda ids, vectors=True: stale)
    b.flush()  # ... and B writes its merge of the row it read before: A's count is overwritten (Milvus has no CAS)
    monkeypatch.undo()
    assert _stored(a, "a red fox")[25] == {"b": 1}
    assert a.refresh()["rewritten"] == 1  # A sees its count behind its own and queues the row again
    a.flush()
    assert _stored(a, "a red fox")[25] == {"a": 2, "b": 1}


def test_eviction_by_a_reaches_b(replicas) -> None:
    a, b = replicas
    a.admit("a red fox", _vec(0), KEY, "t", _states(ks=(25,)))
    a.flush()
    b.refresh()
    row_id = a.record(KEY, "t", "a red fox").id
    a._drop_entry(row_id, 25)  # what LCBFU eviction does: latent and entry go
    # before B refreshes, its mirror still has the entry: the latent is gone, so a miss that drops the entry
    missed = b.lookup(_vec(0), KEY, "t", STEPS)
    assert not missed.hit and missed.reason == "blob-missing" and b.record(KEY, "t", "a red fox") is None
    a.admit("a blue fox", _vec(1), KEY, "t", _states(ks=(25,)))
    a.flush()
    b.refresh()
    a._drop_entry(a.record(KEY, "t", "a blue fox").id, 25)
    a.flush()
    assert b.refresh()["removed"] == 1 and b.record(KEY, "t", "a blue fox") is None and b.entries == 0
    assert b.lookup(_vec(1), KEY, "t", STEPS).reason == "empty"
    b.flush()
    assert a.index.count() == 0


def test_a_row_missing_from_a_scan_is_kept_when_a_read_by_id_finds_it(replicas, monkeypatch) -> None:
    a, b = replicas
    a.admit("a red fox", _vec(0), KEY, "t", _states())
    a.flush()
    b.refresh()
    monkeypatch.setattr(b.index, "scan_entries", dict)  # Milvus 2.3's iterator can skip rows during a handoff
    assert b.refresh()["removed"] == 0 and b.lookup(_vec(0), KEY, "t", STEPS).hit


def test_milvus_search_backend_hits_before_any_refresh(replicas) -> None:
    a, _ = replicas
    # Opened with the backend set: the parts of a cache (here its `matching.Matcher`) take the config at open
    update = {"replica_id": "c", "search": SearchConfig(backend="milvus")}
    c = open_cache(a.config.model_copy(update=update), DIM)
    try:
        a.admit("a red fox", _vec(0), KEY, "t", _states())
        a.flush()
        hit = c.lookup(_vec(0), KEY, "t", STEPS)  # found in Milvus, fetched into C's mirror on the spot
        assert hit.hit and hit.k == 25 and c.entries == 2
    finally:
        c.close()


def test_unflushed_admission_survives_a_refresh(replicas) -> None:
    a, b = replicas
    b.admit("a red fox", _vec(0), KEY, "t", _states())  # still queued in B's write-behind
    a.admit("a blue fox", _vec(1), KEY, "t", _states())
    a.flush()
    b.refresh()
    assert b.lookup(_vec(0), KEY, "t", STEPS).hit and b.lookup(_vec(1), KEY, "t", STEPS).hit
    assert b.entries == 4


def test_shared_cache_removes_orphan_latents_only_after_a_grace_period(tmp_path, monkeypatch) -> None:
    """On a Milvus server another replica may have written a latent whose row is not flushed yet."""
    monkeypatch.setattr(MilvusIndex, "shared", property(lambda self: True))
    config = CacheConfig(dir=tmp_path / "cache", flush_interval_s=0.1, predictor=PredictorConfig(enabled=False))
    cache = open_cache(config, DIM)
    cache.latents.put(blob_key(0xDEAD, 10), _states(ks=(10,))[10])  # no row refers to it
    cache.close()
    reopened = open_cache(config, DIM)
    reopened.refresh()
    assert blob_key(0xDEAD, 10) in reopened.latents  # within the grace period: maybe another replica's
    reopened.replicas.reconciler.opened_at -= 3600
    reopened.refresh()
    assert blob_key(0xDEAD, 10) not in reopened.latents and reopened.counters.repaired == 1
    reopened.close()
