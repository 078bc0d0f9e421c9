"""Integrity over real milvus-lite: bad rows are refused or dropped while later rows land, blobs are bound to their
rows and a bad entry is removed on its first failure (or by `invalidate`), an old-format cache is dropped with one
log line, and reconciliation refuses to wipe the latents when Milvus looks empty or foreign."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from nirvana.cache.factory import open_cache
from nirvana.cache.latents import FORMAT_MARKER, Binding, BlobCorrupt
from nirvana.cache.outcome import Reason
from nirvana.cache.records import EntryMeta, PromptRecord, RowChange, blob_key
from nirvana.cache.validation import InvalidLatent, InvalidRow
from nirvana.config import CacheConfig, PredictorConfig

DIM, STEPS, KEY, TENANT = 16, 50, "key", "t"


def _vec(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _states(ks=(5, 25), value: float = 0.5) -> dict[int, dict[str, np.ndarray]]:
    return {k: {"latent": np.full((1, 4, 8, 8), value + k, np.float32)} for k in ks}


@pytest.fixture
def config(tmp_path) -> CacheConfig:
    return CacheConfig(
        dir=tmp_path / "cache",
        flush_interval_s=3600,
        predictor=PredictorConfig(enabled=False),
        min_entries_per_prompt=0,
        near_equal_margin=0,
    )


def _blob_files(cache) -> list:
    return sorted(p for p in cache.latents.root.rglob("*.safetensors"))


def test_invalid_rows_and_latents_are_refused_before_anything_is_written(config) -> None:
    cache = open_cache(config, DIM)
    nan = np.full(DIM, np.nan, np.float32)
    bad = [
        ("x" * 9000, _vec(0), _states()),  # over the 8,192-byte VARCHAR field
        ("nan vector", nan, _states()),
        ("short vector", _vec(0)[:8], _states()),
        ("not unit", _vec(0) * 3, _states()),
    ]
    for prompt, vector, states in bad:
        with pytest.raises(InvalidRow):
            cache.admit(prompt, vector, KEY, TENANT, states)
    with pytest.raises(InvalidRow, match="cache_key"):
        cache.admit("bad key", _vec(0), "key with spaces", TENANT, _states())
    with pytest.raises(InvalidLatent, match="NaN"):
        cache.admit("nan latent", _vec(0), KEY, TENANT, {5: {"latent": np.full((1, 4, 8, 8), np.nan, np.float32)}})
    assert cache.counters.rejected == 6 and cache.index.pending() == 0 and _blob_files(cache) == []
    assert cache.admit("a good prompt", _vec(1), KEY, TENANT, _states()) == 2
    assert cache.index.flush() == 1 and cache.index.count() == 1
    cache.close()


def test_a_row_milvus_refuses_is_dropped_counted_and_later_flushes_land(config, caplog) -> None:
    cache = open_cache(config, DIM)
    cache.admit("good before", _vec(1), KEY, TENANT, _states())
    # A row that got past validation (written by an earlier version, say): a wrong-size vector Milvus refuses.
    bad = PromptRecord(12345, "bad", KEY, TENANT, np.ones(4, np.float32) / 2, 1.0, {5: EntryMeta(nbytes=1)})
    cache.index._pending[bad.id] = RowChange(bad, {5})
    with caplog.at_level(logging.ERROR, logger="nirvana.cache.index"):
        assert cache.index.flush() == 2
    assert cache.index.count() == 1 and cache.stats()["dropped_rows"] == 1 and cache.index.pending() == 0
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("nirvana") and r.levelno >= logging.ERROR]
    assert len(ours) == 1 and "cache row 0000000000003039 dropped: Milvus refuses it" in ours[0]
    cache.admit("good after", _vec(2), KEY, TENANT, _states())
    assert cache.index.flush() == 1 and cache.index.count() == 2  # later flushes are not held up
    cache.close()


def _swap_blob(cache, source: str, target: str, k: int = 25) -> None:
    src = cache.latents._path(blob_key(cache.record(KEY, TENANT, source).id, k))
    dst = cache.latents._path(blob_key(cache.record(KEY, TENANT, target).id, k))
    shutil.copyfile(src, dst)  # intact (its checksum holds) but bound to another row


def test_a_blob_bound_to_another_row_is_refused_and_its_entry_removed(config) -> None:
    cache = open_cache(config, DIM)
    cache.admit("victim", _vec(1), KEY, TENANT, _states(ks=(25,), value=0.5))
    cache.admit("attacker", _vec(2), KEY, TENANT, _states(ks=(25,), value=9.0))
    victim_id = cache.record(KEY, TENANT, "victim").id
    _swap_blob(cache, "attacker", "victim")
    miss = cache.lookup(_vec(1), KEY, TENANT, STEPS)
    assert not miss.hit and miss.reason == Reason.BLOB_CORRUPT and cache.counters.invalidated == 1
    cache.flush()
    assert cache.record(KEY, TENANT, "victim") is None and cache.index.fetch([victim_id]) == {}
    assert blob_key(victim_id, 25) not in cache.latents
    assert cache.lookup(_vec(2), KEY, TENANT, STEPS).hit  # the other entry is untouched
    cache.close()


@pytest.mark.parametrize("fault", ["non-finite", "wrong-shape"])
def test_an_unusable_latent_is_removed_on_its_first_failure(config, fault) -> None:
    cache = open_cache(config, DIM)
    cache.admit("p", _vec(1), KEY, TENANT, _states(ks=(25,)))
    row_id = cache.record(KEY, TENANT, "p").id
    expected = {"latent": (1, 4, 8, 8)}
    if fault == "non-finite":  # written past admission's check (an earlier version, a bit flip before the digest)
        nan = {"latent": np.full((1, 4, 8, 8), np.inf, np.float32)}
        cache.latents.put(blob_key(row_id, 25), nan, {"k": 25}, Binding(row_id, KEY, TENANT, 25))
    else:
        expected = {"latent": (1, 4, 16, 16)}  # the checkpoint now wants another latent size
    miss = cache.lookup(_vec(1), KEY, TENANT, STEPS, expected_shapes=expected)
    assert not miss.hit and miss.reason == Reason.BLOB_CORRUPT
    assert cache.record(KEY, TENANT, "p") is None and blob_key(row_id, 25) not in cache.latents
    assert cache.lookup(_vec(1), KEY, TENANT, STEPS).reason == Reason.EMPTY  # not failing again and again
    cache.close()


def test_invalidate_removes_the_entry_a_hit_came_from(config) -> None:
    cache = open_cache(config, DIM)
    cache.admit("p", _vec(1), KEY, TENANT, _states(ks=(5, 25)))
    hit = cache.lookup(_vec(1), KEY, TENANT, STEPS)
    assert hit.hit and hit.k == 25 and isinstance(hit.entry_id, str)
    assert json.loads(json.dumps({"entry": hit.entry_id})) == {"entry": hit.entry_id}
    with pytest.raises(ValueError, match="not a cache entry id"):
        cache.invalidate("../../etc/passwd")
    assert not cache.invalidate(hit.entry_id, tenant="someone else")
    assert cache.invalidate(hit.entry_id, tenant=TENANT) and cache.counters.invalidated == 1
    assert not cache.invalidate(hit.entry_id)  # gone already
    cache.flush()
    row_id = cache.record(KEY, TENANT, "p").id
    assert set(cache.index.fetch([row_id])[row_id].entries) == {5} and blob_key(row_id, 25) not in cache.latents
    smaller = cache.lookup(_vec(1), KEY, TENANT, STEPS)
    assert smaller.hit and smaller.k == 5
    cache.admit("p", _vec(1), KEY, TENANT, _states(ks=(5,), value=3.0), replace=True)  # rewritten since
    assert not cache.invalidate(smaller.entry_id) and cache.lookup(_vec(1), KEY, TENANT, STEPS).hit
    cache.close()


def test_a_cache_of_the_earlier_blob_format_is_dropped_with_one_log_line(config, caplog) -> None:
    cache = open_cache(config, DIM)
    for i in range(40):  # more than the mass-delete guard's minimum: an upgrade is not a wipe to refuse
        cache.admit(f"prompt {i}", _vec(i), KEY, TENANT, _states())
    cache.close()
    (config.latent_dir / FORMAT_MARKER).unlink()  # as every directory written before blobs were bound
    with caplog.at_level(logging.INFO):
        reopened = open_cache(config, DIM)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("nirvana")]
    assert len(loud) == 1 and "written by an earlier version" in loud[0] and "dropped its 80 latents" in loud[0]
    assert len(reopened) == 0 and _blob_files(reopened) == []
    reopened.flush()
    assert reopened.index.count() == 0
    assert reopened.admit("fresh", _vec(1), KEY, TENANT, _states()) == 2
    reopened.close()
    again = open_cache(config, DIM)
    assert len(again) == 1 and again.lookup(_vec(1), KEY, TENANT, STEPS).hit
    again.close()


def test_a_format_2_blob_met_later_is_corrupt(tmp_path) -> None:
    from safetensors.numpy import save

    from nirvana.cache.blob_format import decode_blob

    data = save({"latent": np.zeros(4, np.float16)}, metadata={"format": "nirvana-latent/2", "meta": "{}"})
    with pytest.raises(BlobCorrupt, match="not a nirvana-latent/3 or nirvana-latent/4 blob"):
        decode_blob(data)


@pytest.mark.parametrize("allow", [False, True])
def test_reconciliation_refuses_to_wipe_latents_when_milvus_looks_empty(config, caplog, allow) -> None:
    cache = open_cache(config, DIM)
    for i in range(20):
        cache.admit(f"prompt {i}", _vec(i), KEY, TENANT, _states())
    cache.close()
    files = _blob_files(cache)
    assert len(files) == 40
    elsewhere = config.model_copy(update={"collection": "empty_one", "reconcile_allow_mass_delete": allow})
    with caplog.at_level(logging.ERROR, logger="nirvana.cache.reconcile"):
        foreign = open_cache(elsewhere, DIM)
    assert len(foreign) == 0
    if allow:
        assert _blob_files(foreign) == [] and not caplog.records
    else:
        assert _blob_files(foreign) == files  # kept
        assert "would delete 40 of 40" in caplog.text and "reconcile_allow_mass_delete" in caplog.text
    foreign.close()
    if not allow:  # pointed back at the right Milvus, nothing was lost
        back = open_cache(config, DIM)
        assert len(back) == 20 and back.lookup(_vec(3), KEY, TENANT, STEPS).hit
        back.close()


def test_reconciliation_still_removes_a_few_orphans(config) -> None:
    cache = open_cache(config, DIM)
    for i in range(20):
        cache.admit(f"prompt {i}", _vec(i), KEY, TENANT, _states())
    orphan = blob_key(999, 5)
    cache.latents.put(orphan, _states()[5], {}, Binding(999, KEY, TENANT, 5))
    cache.close()
    reopened = open_cache(config, DIM)
    assert orphan not in reopened.latents and len(reopened) == 20
    reopened.close()
