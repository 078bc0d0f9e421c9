"""Milvus (milvus-lite) as the store of record: write-behind, restart, failures keep changes queued."""

import numpy as np
import pytest

from nirvana.cache.index import EntryMeta, MilvusIndex, PromptRecord, record_id


def _record(i: int, dim: int = 8) -> PromptRecord:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1.0
    rec = PromptRecord(record_id("key", "t", f"p{i}"), f"p{i}", "key", "t", v, created=100.0 + i)
    rec.entries = {5: EntryMeta(hits=i, last_access=200.0 + i, nbytes=1000), 10: EntryMeta(hits=1, nbytes=2000)}
    return rec


def test_write_behind_then_restart_keeps_lcbfu_state(tmp_path) -> None:
    uri = str(tmp_path / "m.db")
    index = MilvusIndex(uri, "c", 8, flush_interval_s=3600)  # no background flush during the test
    index.put(_record(3))
    assert index.pending() == 1
    assert index.count() == 0  # nothing written on the request path
    index.close()  # clean shutdown flushes
    index = MilvusIndex(uri, "c", 8, flush_interval_s=3600)
    (loaded,) = list(index.load_all())
    assert loaded.prompt == "p3" and loaded.entries[5].hits == 3 and loaded.entries[10].nbytes == 2000
    assert loaded.hits == 4 and loaded.score == 3 * 5 + 1 * 10
    np.testing.assert_array_equal(loaded.vector, _record(3).vector)
    index.close()


def test_delete_and_latest_write_wins(tmp_path) -> None:
    index = MilvusIndex(str(tmp_path / "m.db"), "c", 8, flush_interval_s=3600)
    index.insert_now([_record(1), _record(2)])
    rec = _record(1)
    rec.entries[5].hits = 42
    index.put(rec)
    index.delete(_record(2).id)
    index.flush()
    rows = {r.prompt: r for r in index.load_all()}
    assert set(rows) == {"p1"} and rows["p1"].entries[5].hits == 42
    assert index.search(rec.vector, "key", "t")[0] == rec.id
    assert index.search(rec.vector, "key", "other-tenant") is None
    index.close()


def test_failed_flush_keeps_changes_for_retry(tmp_path, monkeypatch) -> None:
    index = MilvusIndex(str(tmp_path / "m.db"), "c", 8, flush_interval_s=3600)
    index.put(_record(1))
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
