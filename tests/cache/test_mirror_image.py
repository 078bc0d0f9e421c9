"""The snapshot's whole-mirror format: records, entries, per-replica hit counts and the search's partitions come
back as they were, and arrays that do not fit together are refused."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana.cache import mirror_image
from nirvana.cache.mirror import Mirror
from nirvana.cache.records import EntryMeta, PromptRecord
from nirvana.cache.search import PartitionedSearch

DIM = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _mirror(rows: int = 300) -> Mirror:
    """Two partitions: one past `exact_max_rows` (an IVF and a tail), one small (exact rows only)."""
    from nirvana.config import SearchConfig

    mirror = Mirror(DIM, SearchConfig(exact_max_rows=64, tail_max_rows=32, nprobe=8))
    vectors = _unit(np.random.default_rng(0), rows)
    records = []
    for i, vector in enumerate(vectors):
        key, tenant = ("k", "a") if i % 10 else ("k2", "b")
        hits = {"pod-1": i % 3, "_": 1, "gone": -1700000000} if i % 7 == 0 else {}
        entries = {25: EntryMeta(last_access=i + 0.5, nbytes=100 + i, replica_hits=hits)}
        if i % 5 == 0:
            entries[10] = EntryMeta(hits=2, last_access=1.0, nbytes=7)
        records.append(PromptRecord(1000 + 3 * i, f"prompt {i} — ünïcode", key, tenant, vector, float(i), entries))
    mirror.add_many(records[:250])
    for record in records[250:]:  # into the IVF partition's tail
        mirror.add(record)
    return mirror


def _decoded(mirror: Mirror) -> mirror_image.MirrorImage:
    arrays = mirror_image.encode(mirror.records(), mirror.search.states())
    return mirror_image.decode(arrays, DIM)


def test_records_and_search_come_back_as_they_were() -> None:
    mirror = _mirror()
    image = _decoded(mirror)
    restored = Mirror(DIM, mirror._search_config)
    restored.restore(image.records, image.states)
    assert len(restored) == len(mirror) and restored.entries == mirror.entries
    for record in mirror.records():
        again = restored.get(record.id)
        assert (again.prompt, again.cache_key, again.tenant, again.created) == (
            record.prompt,
            record.cache_key,
            record.tenant,
            record.created,
        )
        assert again.entries == record.entries and again.vector is None
        np.testing.assert_allclose(restored.vector_of(record.id), mirror.vector_of(record.id), atol=1e-3)
    assert restored.tenants() == mirror.tenants()
    assert list(restored.in_eviction_order()) == list(mirror.in_eviction_order())
    queries = _unit(np.random.default_rng(1), 40)
    for partition in (("k", "a"), ("k2", "b")):
        for q in queries:
            again, before = restored.top(partition, q, 3), mirror.top(partition, q, 3)
            # tail vectors are kept at float16: similarities within 1e-3, so near-ties may swap places
            np.testing.assert_allclose([m.similarity for m in again], [m.similarity for m in before], atol=1e-3)
            assert again[0].id == before[0].id or before[0].similarity - before[1].similarity < 2e-3
    assert restored.search.partition_sizes() == mirror.search.partition_sizes()


def test_a_restored_search_keeps_serving_changes() -> None:
    mirror = _mirror()
    image = _decoded(mirror)
    restored = Mirror(DIM, mirror._search_config)
    restored.restore(image.records, image.states)
    victim = next(r for r in restored.records() if r.cache_key == "k")
    for k in list(victim.entries):
        restored.pop_entry(victim.id, k)
    assert victim.id not in restored and restored.vector_of(victim.id) is None
    new = PromptRecord(7, "new", "k", "a", _unit(np.random.default_rng(5), 1)[0], 1.0, {25: EntryMeta(nbytes=1)})
    restored.add(new)
    assert restored.top(("k", "a"), restored.vector_of(7), 1)[0].id == 7


def test_arrays_that_do_not_fit_together_are_refused() -> None:
    mirror = _mirror(120)
    arrays = mirror_image.encode(mirror.records(), mirror.search.states())
    missing_row = dict(arrays, tail_ids_0=arrays["tail_ids_0"][1:], tail_vectors_0=arrays["tail_vectors_0"][1:])
    with pytest.raises(ValueError, match="does not hold exactly its records"):
        mirror_image.decode(missing_row, DIM)
    with pytest.raises(ValueError, match="tail vectors"):
        mirror_image.decode(arrays, DIM + 1)
    with pytest.raises(ValueError, match="inconsistent lengths"):
        mirror_image.decode(dict(arrays, hit_n=arrays["hit_n"][1:]), DIM)
    with pytest.raises(ValueError, match="format"):
        mirror_image.decode(dict(arrays, format=np.array(3)), DIM)


def test_search_sample_draws_distinct_held_vectors() -> None:
    search = PartitionedSearch(DIM, exact_max_rows=64)
    vectors = _unit(np.random.default_rng(2), 200)
    search.add_many(("k", "t"), np.arange(200, dtype=np.int64), vectors)
    sample = search.sample_vectors(50, np.random.default_rng(0))
    assert sample.shape == (50, DIM) and len({v.tobytes() for v in sample}) == 50
    assert np.max(np.abs(sample @ vectors.T), axis=1).min() > 0.999  # each one of the held vectors
    assert search.sample_vectors(500, np.random.default_rng(0)).shape == (200, DIM)
