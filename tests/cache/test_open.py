"""Opening a cache fast: one walk of the latent directory, rows read without their vectors, vectors and the search's
training from the mirror snapshot, and flushes of hit counts that do not read vectors back."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nirvana.cache import index as index_module
from nirvana.cache.factory import open_cache
from nirvana.cache.index import MilvusIndex
from nirvana.cache.latents import LatentStore, LatentStoreError
from nirvana.cache.mirror_image import MirrorImage
from nirvana.cache.records import blob_key
from nirvana.cache.replicas import ReplicaSync
from nirvana.cache.search import PartitionedSearch
from nirvana.cache.snapshot import load_snapshot, snapshot_path
from nirvana.config import CacheConfig, PredictorConfig, SearchConfig

DIM, STEPS, KEY = 16, 50, "key"


def _vec(i: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    v += noise * np.random.default_rng(seed + i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _states(ks=(5, 25)) -> dict[int, dict[str, np.ndarray]]:
    return {k: {"latent": np.full((1, 4, 8, 8), k, np.float32)} for k in ks}


@pytest.fixture
def config(tmp_path: Path) -> CacheConfig:
    return CacheConfig(
        dir=tmp_path / "cache",
        flush_interval_s=3600,
        predictor=PredictorConfig(enabled=False),
        min_entries_per_prompt=0,
    )


def _filled(config: CacheConfig, prompts: int = 6) -> None:
    cache = open_cache(config, DIM)
    for i in range(prompts):
        assert cache.admit(f"prompt {i}", _vec(i, 0.1), KEY, "t", _states()) == 2
    cache.close()


def _count_scandir(monkeypatch: pytest.MonkeyPatch, under: Path) -> list[str]:
    calls: list[str] = []
    real = os.scandir

    def counting(path=".", *args, **kwargs):
        if str(path).startswith(str(under)):
            calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", counting)
    return calls


def test_open_walks_the_latent_directory_once(config, monkeypatch) -> None:
    _filled(config)
    calls = _count_scandir(monkeypatch, config.latent_dir)
    LatentStore(config.latent_dir).wait_walked()
    one_walk = len(calls)
    assert one_walk > 1
    calls.clear()
    cache = open_cache(config, DIM)
    assert len(calls) == one_walk and len(set(calls)) == one_walk  # each folder once: no second walk
    assert len(cache) == 6 and cache.entries == 12
    cache.close()


def test_scanned_keys_follow_puts_and_deletes_and_are_handed_out_once(tmp_path: Path) -> None:
    store = LatentStore(tmp_path)
    store.put("a", {"latent": np.zeros((1, 2), np.float32)})
    store.put("b", {"latent": np.zeros((1, 2), np.float32)})
    reopened = LatentStore(tmp_path)
    reopened.put("c", {"latent": np.zeros((1, 2), np.float32)})
    reopened.delete("a")
    assert reopened.take_scanned_keys() == {"b", "c"}
    assert reopened.take_scanned_keys() is None  # later reconciliations walk the directory again
    assert LatentStore(tmp_path).take_scanned_keys(max_age_s=-1) is None  # too old: walk again


def test_reopen_fills_the_mirror_from_the_snapshot_without_reading_milvus(config, monkeypatch) -> None:
    _filled(config)
    assert snapshot_path(config.dir, config.collection).is_file()  # written at close

    def refused(self, *args, **kwargs):
        raise AssertionError("the open read rows or vectors from Milvus")

    monkeypatch.setattr(MilvusIndex, "fetch_vectors", refused)
    monkeypatch.setattr(MilvusIndex, "scan_rows", refused)
    cache = open_cache(config, DIM)
    assert len(cache) == 6 and cache.entries == 12 and cache.caught_up.is_set()  # small: caught up in line
    assert "image_restore_s" in cache.open_timings and "milvus_rows_s" not in cache.open_timings
    for i in range(6):
        lookup = cache.lookup(_vec(i, 0.1), KEY, "t", STEPS)
        assert lookup.hit and lookup.matched_prompt == f"prompt {i}" and lookup.similarity > 0.999
    cache.close()


def _stale_snapshot(config: CacheConfig) -> tuple[bytes, int]:
    """A snapshot of prompts 0-2, then (as if the process had crashed before writing another) prompts 3-4 admitted,
    prompt 0 evicted and a hit on prompt 1 counted, in Milvus only. Returns the old snapshot and prompt 0's id."""
    _filled(config, prompts=3)
    path = snapshot_path(config.dir, config.collection)
    old = path.read_bytes()
    cache = open_cache(config, DIM)
    for i in (3, 4):
        cache.admit(f"prompt {i}", _vec(i, 0.1), KEY, "t", _states())
    gone = cache.record(KEY, "t", "prompt 0").id
    for k in (5, 25):
        cache._drop_entry(gone, k)
    assert cache.lookup(_vec(1, 0.1), KEY, "t", STEPS).hit
    cache.close()
    path.write_bytes(old)
    return old, gone


@pytest.mark.parametrize("chunk_rows", [10_000, 1])
def test_a_stale_snapshot_catches_up_with_milvus(config, monkeypatch, chunk_rows) -> None:
    monkeypatch.setattr("nirvana.cache.replicas.CHUNK_ROWS", chunk_rows)  # 1: a lock hold per row
    _, gone = _stale_snapshot(config)
    cache = open_cache(config, DIM)
    assert cache.caught_up.is_set() and len(cache) == 4 and gone not in cache.mirror
    assert sum(e.hits for e in cache.record(KEY, "t", "prompt 1").entries.values()) == 1
    for i in (1, 2, 3, 4):
        assert cache.lookup(_vec(i, 0.1), KEY, "t", STEPS).matched_prompt == f"prompt {i}"
    assert not cache.lookup(_vec(0, 0.1), KEY, "t", STEPS).hit
    cache.close()


def test_a_large_restart_is_ready_before_it_catches_up(config, monkeypatch) -> None:
    """Past `catch_up_in_background_from` prompts the open returns once the snapshot fills the mirror: lookups are
    served from it, and what Milvus holds beyond it arrives with the catch-up."""
    _stale_snapshot(config)
    release, callers = threading.Event(), []
    real_refresh = ReplicaSync.refresh

    def held_refresh(self, index):
        callers.append(threading.current_thread().name)
        release.wait(30)
        return real_refresh(self, index)

    monkeypatch.setattr(ReplicaSync, "refresh", held_refresh)
    cache = open_cache(config.model_copy(update={"catch_up_in_background_from": 0}), DIM)
    assert not cache.caught_up.is_set() and cache.available and len(cache) == 3  # the snapshot's prompts
    assert cache.lookup(_vec(2, 0.1), KEY, "t", STEPS).matched_prompt == "prompt 2"
    release.set()
    assert cache.caught_up.wait(30) and callers == ["cache-catch-up"]  # never in line
    assert len(cache) == 4 and cache.lookup(_vec(4, 0.1), KEY, "t", STEPS).matched_prompt == "prompt 4"
    cache.close()


def test_a_failed_catch_up_goes_on_in_the_background(config, monkeypatch) -> None:
    _stale_snapshot(config)
    real_refresh, calls = ReplicaSync.refresh, []

    def failing_once(self, index):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise ConnectionError("milvus went away")
        return real_refresh(self, index)

    monkeypatch.setattr(ReplicaSync, "refresh", failing_once)
    cache = open_cache(config.model_copy(update={"reconnect_interval_s": 0.1}), DIM)  # returns: not stuck retrying
    assert cache.caught_up.wait(30) and calls[1:] == ["cache-catch-up"] and len(cache) == 4
    cache.close()


def test_a_failed_first_connect_keeps_the_snapshot_for_the_reconnect(config, monkeypatch) -> None:
    _filled(config, prompts=3)
    real_init, attempts = MilvusIndex.__init__, []

    def down_once(self, *args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("milvus not up yet")
        real_init(self, *args, **kwargs)

    def refused(self, *args, **kwargs):
        raise AssertionError("rows read from Milvus: the snapshot was dropped")

    monkeypatch.setattr(MilvusIndex, "__init__", down_once)
    monkeypatch.setattr(MilvusIndex, "scan_rows", refused)
    cache = open_cache(config.model_copy(update={"reconnect_interval_s": 0.2}), DIM)
    assert not cache.available
    deadline = time.monotonic() + 30
    while not cache.caught_up.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.available and len(cache) == 3 and cache.lookup(_vec(1, 0.1), KEY, "t", STEPS).hit
    cache.close()


def test_a_snapshot_far_smaller_than_milvus_is_not_caught_up_row_by_row(config, monkeypatch) -> None:
    _filled(config, prompts=1)
    path = snapshot_path(config.dir, config.collection)
    one_prompt = path.read_bytes()
    cache = open_cache(config, DIM)
    for i in range(1, 5):
        cache.admit(f"prompt {i}", _vec(i, 0.1), KEY, "t", _states())
    cache.close()
    path.write_bytes(one_prompt)  # an old file: Milvus holds 5 prompts, more than twice its 1 (slack 0)
    monkeypatch.setattr("nirvana.cache.reconcile.STALE_IMAGE_SLACK", 0)
    reopened = open_cache(config, DIM)
    assert "milvus_rows_s" in reopened.open_timings and len(reopened) == 5
    reopened.close()


def test_a_failed_directory_walk_fails_the_open_and_releases_milvus(config, monkeypatch) -> None:
    _filled(config, prompts=2)

    def unreadable(self):
        raise PermissionError("latent shard folder unreadable")

    with monkeypatch.context() as patched:
        patched.setattr(LatentStore, "_scan_at_open", unreadable)
        with pytest.raises(LatentStoreError, match="unreadable"):
            open_cache(config, DIM)
    again = open_cache(config, DIM)  # the milvus-lite file was let go: it opens again in this process
    assert len(again) == 2
    again.close()


def test_a_format1_snapshot_still_spares_the_vector_reads(config, monkeypatch) -> None:
    """A snapshot written by the version before (vectors and trainings, no records): rows come from Milvus, vectors
    from it where its (id, created) still match, from Milvus for the rest."""
    _filled(config, prompts=4)
    cache = open_cache(config, DIM)
    records = sorted((cache.record(KEY, "t", f"prompt {i}") for i in range(4)), key=lambda r: r.id)
    cache.close()
    stale = records[1].id  # its row was removed and admitted again since: Milvus's vector counts
    np.savez(
        snapshot_path(config.dir, config.collection),
        ids=np.array([r.id for r in records], np.int64),
        created=np.array([r.created - (r.id == stale) for r in records], np.float64),
        vectors=np.stack([_vec(9) if r.id == stale else cache.mirror.vector_of(r.id) for r in records]),
        partitions=np.array("[]"),
    )
    asked: list[int] = []
    real = MilvusIndex.fetch_vectors
    monkeypatch.setattr(MilvusIndex, "fetch_vectors", lambda self, ids: asked.extend(ids) or real(self, ids))
    reopened = open_cache(config, DIM)
    assert asked == [stale] and "milvus_rows_s" in reopened.open_timings
    for i in range(4):
        assert reopened.lookup(_vec(i, 0.1), KEY, "t", STEPS).matched_prompt == f"prompt {i}"
    reopened.close()
    assert isinstance(load_snapshot(snapshot_path(config.dir, config.collection), DIM), MirrorImage)  # format 2


def test_damaged_snapshot_is_ignored(config, caplog) -> None:
    _filled(config, prompts=3)
    snapshot_path(config.dir, config.collection).write_bytes(b"not a snapshot")
    with caplog.at_level(logging.WARNING, logger="nirvana.cache.snapshot"):
        cache = open_cache(config, DIM)
    assert [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]  # logged
    assert len(cache) == 3 and cache.lookup(_vec(2, 0.1), KEY, "t", STEPS).hit
    cache.close()
    image = load_snapshot(snapshot_path(config.dir, config.collection), DIM)  # rewritten at close
    assert isinstance(image, MirrorImage) and len(image.records) == 3


def test_reopen_reconciles_with_the_snapshot(config) -> None:
    """Dangling entries and orphan blobs are still repaired when the vectors come from the snapshot."""
    _filled(config, prompts=3)
    cache = open_cache(config, DIM)
    kept = cache.record(KEY, "t", "prompt 0")
    gone = cache.record(KEY, "t", "prompt 1")
    cache.close()
    cache.latents.delete(blob_key(kept.id, 5))
    for k in (5, 25):
        cache.latents.delete(blob_key(gone.id, k))
    cache.latents.put("00000000deadbeef-k10", {"latent": np.zeros((1, 4, 8, 8), np.float32)})
    reopened = open_cache(config, DIM)
    assert set(reopened.record(KEY, "t", "prompt 0").entries) == {25}
    assert reopened.record(KEY, "t", "prompt 1") is None and len(reopened) == 2
    assert "00000000deadbeef-k10" not in set(reopened.latents.keys())
    assert reopened.counters.repaired == 4
    reopened.close()
    again = open_cache(config, DIM)  # the repairs reached Milvus
    assert again.record(KEY, "t", "prompt 1") is None and set(again.record(KEY, "t", "prompt 0").entries) == {25}
    again.close()


def test_reopen_reuses_the_search_training(config, monkeypatch) -> None:
    config = config.model_copy(update={"search": SearchConfig(exact_max_rows=16)})
    cache = open_cache(config, DIM)
    for i in range(40):
        cache.admit(f"p{i}", _vec(i, 0.3, seed=i), KEY, "t", _states(ks=(25,)))
    trained = cache.mirror.search.trained()[(KEY, "t")]
    cache.close()
    monkeypatch.setattr("faiss.IndexIVFFlat.train", lambda *a: (_ for _ in ()).throw(AssertionError("trained again")))
    reopened = open_cache(config, DIM)
    again = reopened.mirror.search.trained()[(KEY, "t")]
    np.testing.assert_array_equal(again.centroids, trained.centroids)
    assert again.rows == trained.rows
    for i in range(40):
        assert reopened.lookup(_vec(i, 0.3, seed=i), KEY, "t", STEPS).matched_prompt == f"p{i}"
    reopened.close()


def test_trained_partition_rebuilds_without_training_and_finds_the_same_rows() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(600, dtype=np.int64) * 3 + 1
    first = PartitionedSearch(DIM, exact_max_rows=64, nprobe=4)
    first.add_many(("k", "t"), ids, vectors)
    trained = first.trained()[("k", "t")]
    assert len(trained.ids) == 600 and set(trained.lists.tolist()) <= set(range(len(trained.centroids)))
    second = PartitionedSearch(DIM, exact_max_rows=64, nprobe=4)
    second.add_many(("k", "t"), ids[::-1].copy(), vectors[::-1].copy(), trained)  # other order, same lists
    for q in vectors[:50]:
        assert first.top(("k", "t"), q, 3) == second.top(("k", "t"), q, 3)
    second.remove(int(ids[0]))
    assert second.best(("k", "t"), vectors[0]).id != ids[0]


def test_hit_flush_writes_counts_without_reading_vectors(config, monkeypatch) -> None:
    cache = open_cache(config, DIM)
    cache.admit("a red fox", _vec(0), KEY, "t", _states())
    cache.flush()
    requested: list[list[str]] = []
    client = cache.index._client
    real_get = client.get

    def recording_get(collection, ids, output_fields=None, **kwargs):
        requested.append(list(output_fields or ["*"]))
        return real_get(collection, ids=ids, output_fields=output_fields, **kwargs)

    monkeypatch.setattr(client, "get", recording_get)
    for _ in range(3):
        assert cache.lookup(_vec(0), KEY, "t", STEPS).hit
    cache.flush()
    assert requested and all("vector" not in fields and "*" not in fields for fields in requested)
    stored = cache.index.fetch([cache.record(KEY, "t", "a red fox").id])
    (row,) = stored.values()
    assert row.entries[25].hits == 3
    np.testing.assert_allclose(row.vector, _vec(0), atol=1e-7)
    cache.close()


def test_flush_of_a_row_recreated_elsewhere_keeps_its_stored_vector(config) -> None:
    cache = open_cache(config, DIM)
    cache.admit("a red fox", _vec(0), KEY, "t", _states())
    cache.flush()
    record = cache.record(KEY, "t", "a red fox")
    other = record.snapshot()  # another replica removed the row and admitted the prompt again, differently
    other.created += 5.0
    other.vector = _vec(7)
    cache.index._client.upsert(cache.index.collection, [other.to_row()])
    assert cache.lookup(_vec(0), KEY, "t", STEPS).hit
    cache.flush()
    (row,) = cache.index.fetch([record.id]).values()
    np.testing.assert_allclose(row.vector, _vec(7), atol=1e-7)
    assert row.created == other.created
    cache.close()


def test_vector_reads_are_paged_small(config, monkeypatch) -> None:
    """milvus-lite costs more per row in larger pages of vectors (index.scan_rows)."""
    monkeypatch.setattr(index_module, "_VECTOR_BATCH", 2)
    _filled(config, prompts=5)
    snapshot_path(config.dir, config.collection).unlink()
    cache = open_cache(config, DIM)
    assert len(cache) == 5 and cache.lookup(_vec(4, 0.1), KEY, "t", STEPS).hit
    cache.close()
