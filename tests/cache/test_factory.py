"""open_cache: the production cache over real milvus-lite and a real latent directory: hits, misses, LCBFU
eviction, repair, reconnect."""

import errno
import time

import numpy as np
import pytest

from nirvana.cache.factory import open_cache
from nirvana.cache.records import blob_key
from nirvana.config import CacheConfig, PredictorConfig, SearchConfig

DIM, STEPS, KEY = 16, 50, "key"


def _vec(i: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    v += noise * np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _states(ks=(5, 10, 15, 20, 25), seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {k: {"latent": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for k in ks}


@pytest.fixture
def config(tmp_path) -> CacheConfig:
    return CacheConfig(
        dir=tmp_path / "cache",
        flush_interval_s=3600,
        predictor=PredictorConfig(enabled=False),
        min_entries_per_prompt=0,
    )


def test_hit_picks_largest_cached_k_within_similarity(config) -> None:
    cache = open_cache(config, DIM)
    assert cache.admit("a red fox", _vec(0), KEY, "t", _states()) == 5
    same = cache.lookup(_vec(0), KEY, "t", STEPS)
    assert same.hit and same.k == 25 and same.matched_prompt == "a red fox" and same.similarity > 0.999
    np.testing.assert_allclose(same.arrays["latent"], _states()[25]["latent"], atol=1e-2)  # fp16 store
    near = cache.lookup(_vec(0, noise=0.45, seed=1), KEY, "t", STEPS)  # cosine between 0.65 and 0.95
    assert near.hit and 0 < near.k < 25
    far = cache.lookup(_vec(3), KEY, "t", STEPS)
    assert not far.hit and far.reason == "below-threshold" and far.k == 0
    assert cache.lookup(_vec(0), "other-key", "t", STEPS).reason == "empty"
    assert cache.record(KEY, "t", "a red fox").entries[25].hits == 1
    cache.close()


def test_tenants_do_not_see_each_other(config) -> None:
    cache = open_cache(config, DIM)
    cache.admit("secret prompt", _vec(1), KEY, "alice", _states())
    assert not cache.lookup(_vec(1), KEY, "bob", STEPS).hit
    assert cache.lookup(_vec(1), KEY, "alice", STEPS).hit
    cache.close()


def test_hits_survive_clean_restart(config) -> None:
    cache = open_cache(config, DIM)
    cache.admit("a red fox", _vec(0), KEY, "t", _states())
    for _ in range(7):
        assert cache.lookup(_vec(0), KEY, "t", STEPS).hit
    cache.close()
    reopened = open_cache(config, DIM)
    record = reopened.record(KEY, "t", "a red fox")
    assert record.entries[25].hits == 7 and record.score == 7 * 25
    assert reopened.lookup(_vec(0), KEY, "t", STEPS).hit
    reopened.close()


def test_lcbfu_evicts_lowest_hits_times_k_and_drops_empty_prompts(config) -> None:
    ticks = iter(range(1, 1000))
    cache = open_cache(config.model_copy(update={"max_entries": 5}), DIM, clock=lambda: float(next(ticks)))
    cache.admit("popular", _vec(0), KEY, "t", _states(ks=(5, 25)))
    cache.admit("ignored", _vec(1), KEY, "t", _states(ks=(5, 25)))
    for _ in range(3):
        assert cache.lookup(_vec(0), KEY, "t", STEPS).k == 25  # popular K=25: score 3 x 25
    cache.admit("newcomer", _vec(2), KEY, "t", _states(ks=(10,)))
    assert cache.entries == 5 and cache.counters.evictions == 0
    cache.admit("another", _vec(3), KEY, "t", _states(ks=(10, 15)))
    # two must go, all at score 0 but popular K=25: least recently used first (popular K=5, then one of ignored)
    assert cache.entries == 5 and cache.counters.evictions == 2
    assert set(cache.record(KEY, "t", "popular").entries) == {25}
    assert len(cache.record(KEY, "t", "ignored").entries) == 1
    cache.admit("third", _vec(4), KEY, "t", _states(ks=(20,)))
    assert cache.record(KEY, "t", "ignored") is None  # its last latent went: it left the index
    assert cache.lookup(_vec(1), KEY, "t", STEPS).matched_prompt != "ignored"
    assert cache.record(KEY, "t", "popular").entries[25].hits == 3
    cache.close()


def test_byte_budget_is_kept(config) -> None:
    cache = open_cache(config.model_copy(update={"max_bytes": 3000}), DIM)
    for i in range(10):
        cache.admit(f"p{i}", _vec(i), KEY, "t", _states(ks=(5,), seed=i))
        assert cache.total_bytes <= 3000
    assert cache.counters.evictions > 0
    cache.close()


@pytest.mark.parametrize("damage", ["missing", "bitflip", "truncate"])
def test_bad_blob_is_a_miss_and_the_entry_is_removed(config, damage) -> None:
    cache = open_cache(config, DIM)
    cache.admit("a red fox", _vec(0), KEY, "t", _states(ks=(25,)))
    record = cache.record(KEY, "t", "a red fox")
    path = next(p for p in cache.latents.root.rglob("*") if p.is_file() and blob_key(record.id, 25) in p.name)
    data = bytearray(path.read_bytes())
    if damage == "missing":
        path.unlink()
    elif damage == "bitflip":
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))
    lookup = cache.lookup(_vec(0), KEY, "t", STEPS)
    assert not lookup.hit and lookup.arrays is None and lookup.reason.startswith("blob-")
    assert cache.record(KEY, "t", "a red fox") is None and cache.entries == 0
    cache.close()


def test_reopen_reconciles_orphans_and_dangling_entries(config) -> None:
    cache = open_cache(config, DIM)
    cache.admit("kept", _vec(0), KEY, "t", _states(ks=(5, 25)))
    record = cache.record(KEY, "t", "kept")
    cache.close()
    cache.latents.delete(blob_key(record.id, 5))  # dangling entry: row says K=5, blob gone
    cache.latents.put("00000000deadbeef-k10", {"latent": np.zeros((1, 4, 8, 8), np.float32)})  # orphan blob
    reopened = open_cache(config, DIM)
    assert set(reopened.record(KEY, "t", "kept").entries) == {25}
    assert "00000000deadbeef-k10" not in set(reopened.latents.keys())
    assert reopened.counters.repaired == 2
    reopened.close()


def test_predictor_skips_novel_prompts_and_measures_false_skips(config) -> None:
    predictor = PredictorConfig(enabled=True, min_samples=8, shadow_rate=1.0)
    cache = open_cache(config.model_copy(update={"predictor": predictor}), DIM)
    for i in range(12):  # a cluster of cached prompts around axis 0
        cache.admit(f"p{i}", _vec(0, noise=0.05, seed=i), KEY, "t", _states(ks=(5,)))
    cache._refit_predictor()
    deadline = time.monotonic() + 30
    while not cache.predictor.stats().fitted and time.monotonic() < deadline:
        time.sleep(0.05)
    novel = cache.lookup(_vec(7), KEY, "t", STEPS)  # far from the cluster
    assert novel.reason == "predicted-novel" and not novel.hit
    stats = cache.predictor.stats()
    assert stats.shadow_checks == 1 and stats.false_skips == 0 and stats.false_skip_rate == 0.0
    assert cache.lookup(_vec(0, noise=0.05, seed=3), KEY, "t", STEPS).hit
    cache.close()


def test_unreachable_milvus_serves_uncached_then_resumes(config, tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the milvus-lite directory should be")
    cfg = config.model_copy(update={"milvus_uri": str(blocker / "m.db"), "reconnect_interval_s": 0.2})
    cache = open_cache(cfg, DIM)
    assert not cache.available
    assert cache.admit("a red fox", _vec(0), KEY, "t", _states()) == 0
    miss = cache.lookup(_vec(0), KEY, "t", STEPS)
    assert not miss.hit and miss.reason == "cache-unavailable" and cache.counters.unavailable == 1
    blocker.unlink()
    blocker.mkdir()  # Milvus is back
    deadline = time.monotonic() + 30
    while not cache.available and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.available
    assert cache.admit("a red fox", _vec(0), KEY, "t", _states()) == 5
    assert cache.lookup(_vec(0), KEY, "t", STEPS).hit
    cache.close()


def test_unreachable_milvus_server_uri(config) -> None:
    cfg = config.model_copy(update={"milvus_uri": "http://127.0.0.1:9", "rpc_timeout_s": 1.0})
    cache = open_cache(cfg, DIM)
    assert not cache.available and cache.lookup(_vec(0), KEY, "t", STEPS).reason == "cache-unavailable"
    cache.close()


def test_near_equal_candidates_are_chosen_at_random(config) -> None:
    cache = open_cache(config.model_copy(update={"near_equal_margin": 0.05}), DIM)
    query = _vec(0)
    twin = np.zeros(DIM, np.float32)
    twin[0], twin[1] = 0.999, 0.0447  # cosine 0.999 to the query: near-equal to an exact copy
    cache.admit("exact", query, KEY, "t", _states(ks=(25,)))
    cache.admit("twin", twin / np.linalg.norm(twin), KEY, "t", _states(ks=(25,)))
    cache.admit("far", _vec(5), KEY, "t", _states(ks=(25,)))
    served = {cache.lookup(query, KEY, "t", STEPS).matched_prompt for _ in range(40)}
    assert served == {"exact", "twin"}
    plain = open_cache(config.model_copy(update={"dir": config.dir.parent / "plain", "near_equal_margin": 0}), DIM)
    plain.admit("exact", query, KEY, "t", _states(ks=(25,)))
    plain.admit("twin", twin / np.linalg.norm(twin), KEY, "t", _states(ks=(25,)))
    assert {plain.lookup(query, KEY, "t", STEPS).matched_prompt for _ in range(10)} == {"exact"}
    cache.close()
    plain.close()


def test_disk_full_during_admission_leaves_no_partial_entry(config, monkeypatch) -> None:
    cache = open_cache(config, DIM)
    cache.admit("kept", _vec(1), KEY, "t", _states(ks=(5,)))
    files_before = sorted(cache.latents.keys())
    real_put, calls = cache.latents.put_encoded, []

    def put_until_full(key, data):
        calls.append(key)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(key, data)

    monkeypatch.setattr(cache.latents, "put_encoded", put_until_full)
    assert cache.admit("a red fox", _vec(0), KEY, "t", _states()) == 0
    assert sorted(cache.latents.keys()) == files_before  # the two latents written before the failure are gone
    assert cache.record(KEY, "t", "a red fox") is None and cache.entries == 1
    assert cache.lookup(_vec(1), KEY, "t", STEPS).hit
    cache.close()


def test_milvus_search_backend_finds_the_same_match(config) -> None:
    cache = open_cache(config.model_copy(update={"search": SearchConfig(backend="milvus")}), DIM)
    cache.admit("a red fox", _vec(0), KEY, "t", _states(ks=(25,)))
    cache.admit("a blue car", _vec(4), KEY, "t", _states(ks=(25,)))
    cache.flush()  # Milvus search sees what has been written
    hit = cache.lookup(_vec(0, noise=0.05, seed=2), KEY, "t", STEPS)
    assert hit.hit and hit.matched_prompt == "a red fox"
    assert cache.lookup(_vec(0), KEY, "other-tenant", STEPS).reason == "empty"
    cache.close()
