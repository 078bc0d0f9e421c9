"""Milvus (milvus-lite) as the store of record: write-behind, restart, failures keep changes queued."""

import numpy as np
import pytest

from nirvana.cache.index import MilvusIndex
from nirvana.cache.records import EntryMeta, PromptRecord, record_id


def _record(i: int, dim: int = 8) -> PromptRecord:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1.0
    rec = PromptRecord(record_id("key", "t", f"p{i}"), f"p{i}", "key", "t", v, created=100.0 + i)
    rec.entries = {5: EntryMeta(hits=i, last_access=200.0 + i, nbytes=1000), 10: EntryMeta(hits=1, nbytes=2000)}
    return rec


def test_write_behind_then_restart_keeps_lcbfu_state(tmp_path) -> None:
    uri = str(tmp_path / "m.db")
    index = MilvusIndex(uri, "c", 8, flush_interval_s=3600)  # no background flush during the test
    index.put(_record(3), added=[5, 10])
    assert index.pending() == 1
    assert index.count() == 0  # nothing written on the request path
    index.close()  # clean shutdown flushes
    index = MilvusIndex(uri, "c", 8, flush_interval_s=3600)
    (loaded,) = list(index.load_all())
    assert loaded.prompt == "p3" and loaded.entries[5].hits == 3 and loaded.entries[10].nbytes == 2000
    assert loaded.hits == 4 and loaded.score == 3 * 5 + 1 * 10
    np.testing.assert_array_equal(loaded.vector, _record(3).vector)
    index.close()


def test_delete_and_hits_merged_into_the_stored_row(tmp_path) -> None:
    index = MilvusIndex(str(tmp_path / "m.db"), "c", 8, flush_interval_s=3600)
    index.insert_now([_record(1), _record(2)])
    rec = _record(1)
    rec.entries[5].replica_hits["me"] = 41
    index.put(rec)
    index.delete(_record(2).id)
    index.flush()
    rows = {r.prompt: r for r in index.load_all()}
    assert set(rows) == {"p1"} and rows["p1"].entries[5].hits == 42
    assert rows["p1"].entries[5].replica_hits == {"_": 1, "me": 41}  # "_": counted before per-replica counts
    assert index.search(rec.vector, "key", "t")[0] == rec.id
    assert index.search(rec.vector, "key", "other-tenant") is None
    index.close()


def test_failed_flush_keeps_changes_for_retry(tmp_path, monkeypatch) -> None:
    index = MilvusIndex(str(tmp_path / "m.db"), "c", 8, flush_interval_s=3600)
    index.put(_record(1), added=[5, 10])
    real_upsert = index._client.upsert

    def down(*args, **kwargs):  # Milvus unreachable: a fault we cannot cause with milvus-lite otherwise
        raise ConnectionError("milvus is down")

    monkeypatch.setattr(index._client, "upsert", down)
    with pytest.raises(ConnectionError):
        index.flush()
    assert index.pending() == 1
    monkeypatch.setattr(index._client, "upsert", real_upsert)
    assert index.flush() == 1 and index.count() == 1
    index.close()


def test_dimension_mismatch_is_a_clear_error(tmp_path) -> None:
    MilvusIndex(str(tmp_path / "m.db"), "c", 8).close()
    with pytest.raises(ValueError, match="8-dim vectors but the embedder gives 16"):
        MilvusIndex(str(tmp_path / "m.db"), "c", 16)


# -- two writers on one collection (two replicas; here two clients of one milvus-lite file) ----------------------


@pytest.fixture
def two_indexes(tmp_path):
    uri = str(tmp_path / "m.db")
    a, b = MilvusIndex(uri, "c", 8, flush_interval_s=3600), MilvusIndex(uri, "c", 8, flush_interval_s=3600)
    yield a, b
    a.close(), b.close()


def _fresh(i: int) -> PromptRecord:
    rec = _record(i)
    rec.entries = {5: EntryMeta(last_access=1.0, nbytes=1000)}
    return rec


def test_hits_of_two_replicas_add_up_in_either_flush_order(two_indexes) -> None:
    a, b = two_indexes
    a.put(_fresh(1), added=[5])
    a.flush()
    seen_by_a, (seen_by_b,) = _fresh(1), list(b.load_all())
    for _ in range(3):
        seen_by_a.entries[5].count_hit("a", 10.0)
    for _ in range(4):
        seen_by_b.entries[5].count_hit("b", 20.0)
    a.put(seen_by_a), b.put(seen_by_b)
    b.flush(), a.flush()  # each re-reads the row and merges its own count in
    (row,) = list(a.load_all())
    assert row.entries[5].replica_hits == {"a": 3, "b": 4} and row.hits == 7 and row.entries[5].last_access == 20.0
    seen_by_a.entries[5].count_hit("a", 30.0)  # one more hit on A: its count (4) replaces its stored count (3)
    a.put(seen_by_a)
    a.flush()
    assert next(b.load_all()).hits == 8


def test_a_k_added_by_one_replica_survives_the_other_replicas_flush(two_indexes) -> None:
    a, b = two_indexes
    a.put(_fresh(1), added=[5])
    a.flush()
    with_k10 = _fresh(1)
    with_k10.entries[10] = EntryMeta(last_access=2.0, nbytes=2000)
    b.put(with_k10, added=[10])  # B admitted K=10 of the same prompt (same row id)
    b.flush()
    hit_on_a = _fresh(1)  # A never saw K=10
    hit_on_a.entries[5].count_hit("a", 3.0)
    a.put(hit_on_a)
    a.flush()
    assert {k: e.hits for k, e in next(b.load_all()).entries.items()} == {5: 1, 10: 0}


def test_removal_by_one_replica_drops_the_other_replicas_hits_on_that_entry(two_indexes) -> None:
    a, b = two_indexes
    a.put(_fresh(1), added=[5])
    a.flush()
    (on_b,) = list(b.load_all())
    on_b.entries[5].count_hit("b", 2.0)
    evicted = _fresh(1)
    del evicted.entries[5]
    a.put(evicted, removed=[5])  # A evicted its last K: the row goes
    a.flush()
    b.put(on_b)  # B's hit arrives after the eviction: it must not bring the entry back
    b.flush()
    assert a.count() == 0


def test_failed_flush_keeps_added_and_removed_ks(tmp_path, monkeypatch) -> None:
    index = MilvusIndex(str(tmp_path / "m.db"), "c", 8, flush_interval_s=3600)
    rec = _fresh(1)
    index.put(rec, added=[5])
    monkeypatch.setattr(index, "_write", lambda batch: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(ConnectionError):
        index.flush()
    rec.entries[5].count_hit("me", 1.0)
    index.put(rec)  # a later change to the same row must not forget that K=5 is new
    monkeypatch.undo()
    assert index.flush() == 1
    assert next(index.load_all()).entries[5].replica_hits == {"me": 1}
    index.close()
