"""Bounded growth: per-tenant budgets evict inside the tenant first, emptied search partitions are freed, hit counts
of replicas gone for good are folded, and the probing monitor's per-tenant memory is bounded."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nirvana.cache import probing
from nirvana.cache.factory import open_cache
from nirvana.cache.latents import LatentStore
from nirvana.cache.manager import ApproximateCache
from nirvana.cache.mirror import Mirror
from nirvana.cache.probing import ProbeMonitor
from nirvana.cache.records import UNATTRIBUTED, EntryMeta, PromptRecord
from nirvana.cache.replicas import ReplicaSync
from nirvana.config import CacheConfig, PredictorConfig

DIM, STEPS, KEY = 16, 50, "key"
KS = (5, 10, 15, 20, 25)


def _vec(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _states(ks) -> dict[int, dict[str, np.ndarray]]:
    return {k: {"latent": np.full((1, 4, 8, 8), k, np.float32)} for k in ks}


admissions = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(0, 7), st.sets(st.sampled_from(KS), min_size=1)), max_size=30
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(sequence=admissions)
def test_every_tenant_stays_within_its_budget_and_the_cache_within_the_global_one(memory_cache, sequence) -> None:
    in_memory_index = type(memory_cache(DIM).index)  # conftest's InMemoryIndex (tests/ is not a package)
    with tempfile.TemporaryDirectory() as tmp:
        config = CacheConfig(
            dir=Path(tmp),
            predictor=PredictorConfig(enabled=False),
            min_entries_per_prompt=1,
            max_entries=14,
            max_bytes=40_000,
            max_entries_per_tenant=6,
            max_bytes_per_tenant=8_000,
        )
        latents = LatentStore(config.latent_dir)
        cache = ApproximateCache(
            config, Mirror(DIM, config.search, config.min_entries_per_prompt), latents, in_memory_index()
        )
        try:
            for tenant, prompt, ks in sequence:
                cache.admit(f"prompt {prompt}", _vec(prompt), KEY, tenant, _states(sorted(ks)))
                for entries, nbytes in cache.mirror.tenants().values():
                    assert entries <= 6 and nbytes <= 8_000
                assert cache.entries <= 14 and cache.total_bytes <= 40_000
                assert cache.entries == sum(n for n, _ in cache.mirror.tenants().values())
                assert cache.total_bytes == sum(b for _, b in cache.mirror.tenants().values())
        finally:  # an empty sequence never waits for the walk at open, which may still write its format marker
            latents.wait_walked()
            cache.close()


def test_a_tenant_over_its_cap_evicts_its_own_entries_not_the_others(tmp_path) -> None:
    config = CacheConfig(
        dir=tmp_path / "cache",
        flush_interval_s=3600,
        predictor=PredictorConfig(enabled=False),
        min_entries_per_prompt=0,
        max_entries_per_tenant=10,
    )
    cache = open_cache(config, DIM)
    quiet = [f"quiet {i}" for i in range(2)]
    for i, prompt in enumerate(quiet):
        cache.admit(prompt, _vec(100 + i), KEY, "quiet", _states(KS))
    cache.admit("favourite", _vec(0), KEY, "noisy", _states(KS))
    for _ in range(3):
        assert cache.lookup(_vec(0), KEY, "noisy", STEPS).hit  # hits: LCBFU keeps it
    for i in range(1, 12):
        cache.admit(f"flood {i}", _vec(i), KEY, "noisy", _states(KS))
        assert cache.mirror.tenant_usage("noisy")[0] <= 10
    assert cache.counters.evictions > 0
    assert all(set(cache.record(KEY, "quiet", p).entries) == set(KS) for p in quiet)  # untouched
    assert 25 in cache.record(KEY, "noisy", "favourite").entries
    cache.flush()
    stored = cache.index.fetch([cache.record(KEY, "quiet", p).id for p in quiet])
    assert all(set(r.entries) == set(KS) for r in stored.values()) and cache.index.count() == len(cache)
    cache.close()


def test_a_search_partition_is_freed_with_its_last_row(memory_cache) -> None:
    cache = memory_cache(DIM, max_entries=10)
    cache.admit("only one", _vec(0), KEY, "short-lived", _states((5,)))
    assert (KEY, "short-lived") in cache.mirror.search.partition_sizes()
    for i in range(1, 11):  # the global budget evicts it (score 0, oldest)
        cache.admit(f"p{i}", _vec(i), KEY, "other", _states((5,)))
    assert cache.record(KEY, "short-lived", "only one") is None
    assert (KEY, "short-lived") not in cache.mirror.search.partition_sizes()
    assert "short-lived" not in cache.mirror.tenants()


def test_a_retired_replicas_count_is_folded_once_and_never_comes_back() -> None:
    live = EntryMeta(replica_hits={"old": 4, "new": 1})
    stale = live.copy()  # another replica's mirror, from before the fold
    assert live.retire({"old"}, now=1_000_000.0) and live.hits == 5
    assert live.replica_hits == {"new": 1, UNATTRIBUTED: 4, "old": -1_000_000}
    for merged in (live.merged_with(stale), stale.merged_with(live)):
        assert merged.hits == 5  # not 9: the tombstone wins over the stale count
    assert not live.retire({"old"}, now=1_000_001.0)  # folding twice changes nothing
    assert live.retire(set(), now=1_000_000.0 + 31 * 86400) and "old" not in live.replica_hits  # expired


def test_replicas_not_seen_for_replica_retire_s_are_folded(memory_cache) -> None:
    config = CacheConfig(replica_retire_s=60)
    mirror, index = Mirror(DIM), type(memory_cache(DIM).index)()
    record = PromptRecord(1, "p", KEY, "t", _vec(0), 1.0, {25: EntryMeta(replica_hits={"gone": 3, "busy": 1})})
    mirror.add(record)
    index.put(record, added=[25])
    sync = ReplicaSync(config, mirror, None)  # type: ignore[arg-type]  # retire() needs no reconciler
    sync.replica = "me"
    assert sync.retire(index, now=1000.0) == 0  # first sight of both
    record.entries[25].count_hit("busy", 1030.0)
    assert sync.retire(index, now=1061.0) == 1  # "gone" counted nothing for 61 s; "busy" did
    assert record.entries[25].replica_hits == {"busy": 2, UNATTRIBUTED: 3, "gone": -1061}
    assert index.rows[1].entries[25].hits == 5


def test_a_milvus_lite_cache_folds_other_replica_ids_at_open(tmp_path) -> None:
    config = CacheConfig(dir=tmp_path / "cache", predictor=PredictorConfig(enabled=False), replica_id="host-1")
    cache = open_cache(config, DIM)
    cache.admit("p", _vec(0), KEY, "t", _states((25,)))
    for _ in range(3):
        cache.lookup(_vec(0), KEY, "t", STEPS)
    cache.close()
    reopened = open_cache(config.model_copy(update={"replica_id": "host-2"}), DIM)
    entry = reopened.record(KEY, "t", "p").entries[25]
    assert entry.hits == 3 and entry.replica_hits[UNATTRIBUTED] == 3 and entry.replica_hits["host-1"] < 0
    reopened.close()
    again = open_cache(config.model_copy(update={"replica_id": "host-3"}), DIM)
    assert again.record(KEY, "t", "p").entries[25].hits == 3  # stored folded: not counted twice
    again.close()


def test_the_probing_monitor_holds_a_bounded_number_of_tenants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probing, "MAX_TRACKED_TENANTS", 100)
    monitor = ProbeMonitor(window_s=1e9)
    for i in range(1000):
        monitor.observe(f"tenant {i}", 0.62, 0.65)
    assert len(monitor._events) <= 100 and monitor.near_misses == 1000
