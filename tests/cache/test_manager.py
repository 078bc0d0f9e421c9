"""ApproximateCache's request path over an in-memory store of record (no milvus-lite): hit, miss, admission, LCBFU
eviction and exact counts. tests/cache/test_factory.py runs the production composition over milvus-lite."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest

from nirvana.cache.outcome import Reason
from nirvana.cache.records import blob_key
from nirvana.config import SearchConfig

DIM, STEPS, KEY, TENANT = 16, 50, "key", "t"


def _vec(i: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[i % DIM]


def _states(ks=(5, 25), seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {k: {"latent": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for k in ks}


def _ticks():
    ticks = iter(range(1, 10_000))
    return lambda: float(next(ticks))


def test_miss_admit_hit_with_exact_counts(memory_cache) -> None:
    cache = memory_cache(DIM)
    empty = cache.lookup(_vec(0), KEY, TENANT, STEPS)
    assert not empty.hit and empty.reason == Reason.EMPTY == "empty" and empty.k == 0 and empty.arrays is None
    assert cache.admit("a red fox", _vec(0), KEY, TENANT, _states(), meta={"negative_prompt": "blur"}) == 2
    hit = cache.lookup(_vec(0), KEY, TENANT, STEPS)
    assert hit.hit and hit.reason == Reason.HIT and hit.k == 25 and hit.matched_prompt == "a red fox"
    assert hit.meta == {"negative_prompt": "blur", "k": 25}
    np.testing.assert_allclose(hit.arrays["latent"], _states()[25]["latent"], atol=1e-2)  # stored as fp16
    far = cache.lookup(_vec(3), KEY, TENANT, STEPS)
    assert not far.hit and far.reason == Reason.BELOW_THRESHOLD and far.similarity == pytest.approx(0.0)
    assert cache.lookup(_vec(0), KEY, "another tenant", STEPS).reason == Reason.EMPTY
    assert vars(cache.counters) == {
        "hits": 1,
        "misses": 3,
        "evictions": 0,
        "admitted": 2,
        "repaired": 0,
        "unavailable": 0,
        "invalidated": 0,
        "rejected": 0,
    }
    stored = cache.index.rows[cache.record(KEY, TENANT, "a red fox").id]
    assert {k: e.replica_hits for k, e in stored.entries.items()} == {5: {}, 25: {cache.replica: 1}}
    assert (
        cache.entries == 2 and len(cache) == 1 and cache.total_bytes == sum(e.nbytes for e in stored.entries.values())
    )


def test_concurrent_hits_are_all_counted(memory_cache) -> None:
    cache = memory_cache(DIM)
    cache.admit("a red fox", _vec(0), KEY, TENANT, _states())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        hits = list(pool.map(lambda _: cache.lookup(_vec(0), KEY, TENANT, STEPS).hit, range(200)))
    assert all(hits) and cache.counters.hits == 200
    assert cache.record(KEY, TENANT, "a red fox").entries[25].hits == 200
    assert cache.index.rows[cache.record(KEY, TENANT, "a red fox").id].entries[25].replica_hits == {cache.replica: 200}


def test_admission_keeps_cached_ks_unless_replaced_and_a_rewrite_keeps_hits(memory_cache) -> None:
    cache = memory_cache(DIM)
    cache.admit("a red fox", _vec(0), KEY, TENANT, _states(ks=(5, 25), seed=0))
    cache.lookup(_vec(0), KEY, TENANT, STEPS)
    assert cache.admit("a red fox", _vec(0), KEY, TENANT, _states(ks=(5, 25, 40), seed=1)) == 1  # only K=40 is new
    row_id = cache.record(KEY, TENANT, "a red fox").id
    kept = cache.latents.get(blob_key(row_id, 5)).tensors["latent"]
    np.testing.assert_allclose(kept, _states(seed=0)[5]["latent"], atol=1e-2)  # K=5 was not rewritten
    assert cache.admit("a red fox", _vec(0), KEY, TENANT, _states(ks=(25,), seed=2), replace=True) == 1
    hit = cache.lookup(_vec(0), KEY, TENANT, STEPS)
    np.testing.assert_allclose(hit.arrays["latent"], _states(ks=(25,), seed=2)[25]["latent"], atol=1e-2)
    assert cache.record(KEY, TENANT, "a red fox").entries[25].hits == 2  # the rewrite kept the first hit
    assert cache.entries == 3 and cache.counters.admitted == 4  # 2, then K=40, then the rewrite


def test_lcbfu_evicts_lowest_hits_times_k_then_least_recent_and_drops_empty_prompts(memory_cache) -> None:
    cache = memory_cache(DIM, clock=_ticks(), max_entries=5)
    cache.admit("popular", _vec(0), KEY, TENANT, _states())  # t=1
    cache.admit("ignored", _vec(1), KEY, TENANT, _states())  # t=2
    for _ in range(3):
        assert cache.lookup(_vec(0), KEY, TENANT, STEPS).k == 25  # popular K=25: score 3 × 25, the rest 0
    popular, ignored = cache.record(KEY, TENANT, "popular"), cache.record(KEY, TENANT, "ignored")
    cache.admit("newcomer", _vec(2), KEY, TENANT, _states(ks=(10,)))
    assert cache.entries == 5 and cache.counters.evictions == 0  # exactly at the budget
    cache.admit("next", _vec(3), KEY, TENANT, _states(ks=(15,)))
    assert set(popular.entries) == {25}  # score 0 and least recently used: popular K=5 (t=1) went first
    assert cache.entries == 5 and cache.counters.evictions == 1
    assert blob_key(popular.id, 5) not in cache.latents and set(cache.index.rows[popular.id].entries) == {25}
    cache.admit("another", _vec(4), KEY, TENANT, _states(ks=(20, 40)))  # two must go: both of ignored's (t=2)
    assert cache.record(KEY, TENANT, "ignored") is None and ignored.id not in cache.index.rows
    assert cache.lookup(_vec(1), KEY, TENANT, STEPS).matched_prompt != "ignored"
    assert cache.entries == 5 and cache.counters.evictions == 3
    stored = sorted(blob_key(r.id, k) for r in cache.index.rows.values() for k in r.entries)
    assert sorted(cache.latents.keys()) == stored
    assert cache.record(KEY, TENANT, "popular").entries[25].hits == 3


def test_byte_budget_is_never_exceeded(memory_cache) -> None:
    cache = memory_cache(DIM, max_bytes=3000)
    for i in range(10):
        assert cache.admit(f"p{i}", _vec(i), KEY, TENANT, _states(ks=(5,), seed=i)) == 1
        assert cache.total_bytes <= 3000
    assert cache.counters.evictions > 0
    assert cache.total_bytes == sum(e.nbytes for r in cache.index.rows.values() for e in r.entries.values())


@pytest.mark.parametrize(("damage", "reason"), [("delete", Reason.BLOB_MISSING), ("garble", Reason.BLOB_CORRUPT)])
def test_unusable_latent_is_a_miss_that_removes_the_entry(memory_cache, damage, reason) -> None:
    cache = memory_cache(DIM)
    cache.admit("a red fox", _vec(0), KEY, TENANT, _states(ks=(25,)))
    path = cache.latents._path(blob_key(cache.record(KEY, TENANT, "a red fox").id, 25))
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"\0" * 64)
    miss = cache.lookup(_vec(0), KEY, TENANT, STEPS)
    assert not miss.hit and miss.reason == reason and miss.arrays is None
    assert cache.record(KEY, TENANT, "a red fox") is None and cache.index.rows == {}
    assert cache.counters.repaired == 1 and cache.counters.misses == 1


def test_unavailable_store_serves_uncached_until_attached(memory_cache) -> None:
    cache = memory_cache(DIM)
    index, cache.index = cache.index, None
    assert not cache.available and cache.admit("a red fox", _vec(0), KEY, TENANT, _states()) == 0
    assert cache.lookup(_vec(0), KEY, TENANT, STEPS).reason == Reason.CACHE_UNAVAILABLE
    assert cache.counters.unavailable == 1 and cache.counters.misses == 1
    assert cache.attach(index) and cache.available
    cache.admit("a red fox", _vec(0), KEY, TENANT, _states())
    assert cache.lookup(_vec(0), KEY, TENANT, STEPS).hit
    cache.close()
    assert index.closed and not cache.attach(index)  # a connection that lands after close is refused


def test_search_in_the_store_adopts_rows_the_mirror_lacks(memory_cache) -> None:
    """search.backend = "milvus": a row another replica admitted is found in the store and fetched on the spot."""
    writer = memory_cache(DIM)
    writer.admit("a red fox", _vec(0), KEY, TENANT, _states())
    reader = memory_cache(DIM, search=SearchConfig(backend="milvus"))
    reader.index = writer.index  # one store of record, two mirrors
    hit = reader.lookup(_vec(0), KEY, TENANT, STEPS)
    assert hit.hit and hit.k == 25 and reader.entries == 2


def test_reason_values_are_the_strings_reports_use() -> None:
    assert [r.value for r in Reason] == [
        "hit",
        "empty",
        "below-threshold",
        "predicted-novel",
        "blob-missing",
        "blob-corrupt",
        "cache-unavailable",
        "bypass",
        "refresh",
        "non-finite",
    ]
    assert json.dumps({"reason": Reason.BELOW_THRESHOLD}) == '{"reason": "below-threshold"}'
    assert f"miss ({Reason.EMPTY})" == "miss (empty)"
