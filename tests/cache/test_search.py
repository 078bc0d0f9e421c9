"""The in-process search mirror: exact for small partitions, IVF beyond, partitions never mix."""

import numpy as np
import pytest

from nirvana.cache.search import PartitionedSearch


def _unit(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _near(rng: np.random.Generator, rows: np.ndarray, noise: float = 0.05) -> np.ndarray:
    q = rows + noise * rng.standard_normal(rows.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_exact_partition_returns_true_nearest_with_cosine() -> None:
    rng = np.random.default_rng(0)
    rows = _unit(rng, 300)
    search = PartitionedSearch(32, exact_max_rows=1000)
    for i, row in enumerate(rows):
        search.add(("key", "a"), i, row)
    queries = _near(rng, rows[:50])
    for q in queries:
        match = search.best(("key", "a"), q)
        assert match.id == int(np.argmax(rows @ q))
        assert match.similarity == pytest.approx(float(np.max(rows @ q)), abs=1e-5)


def test_partitions_are_isolated() -> None:
    rng = np.random.default_rng(1)
    rows = _unit(rng, 2)
    search = PartitionedSearch(32)
    search.add(("key", "tenant-a"), 1, rows[0])
    assert search.best(("key", "tenant-b"), rows[0]) is None
    assert search.best(("other-key", "tenant-a"), rows[0]) is None
    assert search.best(("key", "tenant-a"), rows[0]).id == 1


def test_ivf_partition_recall_and_removal() -> None:
    rng = np.random.default_rng(2)
    rows = _unit(rng, 3000)
    search = PartitionedSearch(32, exact_max_rows=500, nprobe=16, tail_max_rows=200)
    for i, row in enumerate(rows):
        search.add(("k", "t"), i, row)
    queries = _near(rng, rows[:200], noise=0.02)
    found = [search.best(("k", "t"), q).id for q in queries]
    exact = np.argmax(queries @ rows.T, axis=1)
    assert np.mean(np.array(found) == exact) >= 0.99
    for i in range(100):
        search.remove(i)
    assert len(search) == 2900
    for q in queries[:100]:
        assert search.best(("k", "t"), q).id >= 100  # removed rows are never returned


def test_re_adding_an_id_moves_it() -> None:
    rng = np.random.default_rng(3)
    rows = _unit(rng, 2)
    search = PartitionedSearch(32)
    search.add(("k", "a"), 7, rows[0])
    search.add(("k", "b"), 7, rows[1])
    assert search.best(("k", "a"), rows[0]) is None
    assert search.partition_sizes() == {("k", "b"): 1}  # the emptied partition is freed


def test_bulk_load_finds_nearest_and_takes_later_rows() -> None:
    rng = np.random.default_rng(4)
    rows = _unit(rng, 2000)
    bulk = PartitionedSearch(32, exact_max_rows=500, nprobe=16)
    bulk.add_many(("k", "t"), np.arange(2000), rows)
    bulk.add(("k", "t"), 5000, rows[0] * -1)  # later admissions go on top of the bulk-built index
    assert len(bulk) == 2001 and bulk.partition_sizes() == {("k", "t"): 2001}
    queries = _near(rng, rows[:100], noise=0.02)
    found = np.array([bulk.best(("k", "t"), q).id for q in queries])
    assert np.mean(found == np.argmax(queries @ rows.T, axis=1)) >= 0.99
    assert bulk.best(("k", "t"), -rows[0]).id == 5000


def test_a_tail_merge_assigns_its_rows_without_holding_up_searches(monkeypatch) -> None:
    """The tail's move into the IVF finds each row's list outside the search's lock (about a second for 4,096 rows
    at a million prompts): searches answer meanwhile, and a row removed meanwhile stays removed."""
    import threading

    from nirvana.cache import search as search_module

    dim, key = 16, ("k", "t")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((120, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    search = PartitionedSearch(dim, exact_max_rows=64, nprobe=64, tail_max_rows=8)
    search.add_many(key, np.arange(100, dtype=np.int64), vectors[:100])  # > 64 rows: an IVF
    for i in range(100, 108):
        search.add(key, i, vectors[i])  # the tail, at its limit
    entered, release = threading.Event(), threading.Event()
    real_assign = search_module.assign

    def held_assign(ivf, rows):
        entered.set()
        assert release.wait(10)
        return real_assign(ivf, rows)

    monkeypatch.setattr(search_module, "assign", held_assign)
    adder = threading.Thread(target=search.add, args=(key, 108, vectors[108]))
    adder.start()
    assert entered.wait(10)
    assert search.best(key, vectors[50]).id == 50  # not blocked by the merge
    search.remove(103)
    release.set()
    adder.join(10)
    part = search._partitions[key]
    assert len(part.tail) == 0 and not part.merging
    assert part.ivf_ids == set(range(109)) - {103}
    assert search.best(key, vectors[105]).id == 105 and search.best(key, vectors[103]).id != 103
