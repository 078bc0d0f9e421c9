"""Latent blob store (nirvana.cache.latents, format in nirvana.cache.blob_format): round trips, corruption
detection, atomicity, accounting, and what happens to blobs of the pre-safetensors format."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nirvana.cache import latents
from nirvana.cache.latents import (
    FORMAT_MARKER,
    LEGACY_SUFFIX,
    TEMP_SUFFIX,
    BlobCorrupt,
    BlobMissing,
    InvalidKey,
    LatentStore,
)

RNG = np.random.default_rng(0)


@pytest.fixture
def store(tmp_path: Path) -> LatentStore:
    return LatentStore(tmp_path / "latents")


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != FORMAT_MARKER)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in blob_files(root))


def latent(shape: tuple[int, ...] = (4, 64, 64)) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --- round trips ----------------------------------------------------------------------------------------------------


def test_float16_round_trip_within_half_precision(store: LatentStore) -> None:
    x = latent()
    store.put("p1_k5", {"latent": x}, {"k": 5, "seed": 7})
    blob = store.get("p1_k5")
    assert blob.tensors["latent"].dtype == np.float32
    assert blob.tensors["latent"].shape == (4, 64, 64)
    np.testing.assert_allclose(blob.tensors["latent"], x, rtol=2.0**-11, atol=6e-8)
    assert blob.meta == {"k": 5, "seed": 7}


def test_float32_store_is_exact(tmp_path: Path) -> None:
    store = LatentStore(tmp_path, dtype="float32")
    x, y = latent((2, 4, 8, 8)), RNG.standard_normal(3)  # float64 comes back as float32
    store.put("a", {"latent": x, "sigma": y})
    blob = store.get("a")
    np.testing.assert_array_equal(blob.tensors["latent"], x)
    assert blob.tensors["sigma"].dtype == np.float32
    np.testing.assert_array_equal(blob.tensors["sigma"], y.astype(np.float32))


def test_non_float_arrays_are_exact_and_keep_their_dtype(store: LatentStore) -> None:
    tensors = {
        "timestep": np.array(981, dtype=np.int64),
        "steps": np.arange(-5, 5, dtype=np.int32).reshape(2, 5),
        "mask": np.array([True, False, True]),
        "pixels": RNG.integers(0, 255, size=(3, 2, 2), dtype=np.uint8),
        "big_endian": np.arange(6, dtype=">i4"),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    store.put("ints", tensors)
    blob = store.get("ints")
    assert set(blob.tensors) == set(tensors)
    for name, value in tensors.items():
        out = blob.tensors[name]
        assert out.shape == value.shape
        np.testing.assert_array_equal(out, value)
        if value.dtype.kind != "f":
            assert out.dtype == value.dtype.newbyteorder("<") or out.dtype == value.dtype
    blob.tensors["steps"][0, 0] = 42  # returned arrays are the caller's to modify


def test_overwrite_replaces_value_and_meta(store: LatentStore) -> None:
    store.put("k", {"x": np.ones(3, np.float32)}, {"v": 1})
    store.put("k", {"y": np.zeros(2, np.int8)}, {"v": 2})
    blob = store.get("k")
    assert list(blob.tensors) == ["y"] and blob.meta == {"v": 2}


def test_stored_size_of_a_sd15_latent(store: LatentStore, capsys: pytest.CaptureFixture[str]) -> None:
    """SD 1.5 at 512×512: a 4×64×64 latent (raw fp16: 32768 bytes), stored uncompressed plus a small header."""
    size = store.put("sd15", {"latent": latent()}, {"k": 25})
    with capsys.disabled():
        print(f"\n4x64x64 fp16 latent, safetensors: {size} bytes on disk (raw fp16 32768, raw fp32 65536)")
    assert size == store.size_of("sd15") == store.encoded_size({"latent": latent()}, {"k": 25})
    assert 32_768 < size < 32_768 + 512


# --- missing and corrupt --------------------------------------------------------------------------------------------


def test_missing_key(store: LatentStore) -> None:
    with pytest.raises(BlobMissing, match="nope"):
        store.get("nope")
    with pytest.raises(BlobMissing):
        store.size_of("nope")
    assert store.delete("nope") == 0
    assert "nope" not in store


def corrupt(store: LatentStore, key: str, change) -> None:
    path = store._path(key)
    path.write_bytes(change(bytearray(path.read_bytes())))


def flip(data: bytearray, index: int, bit: int = 0) -> bytes:
    data[index] ^= 1 << bit
    return bytes(data)


def header_span(data: bytes) -> tuple[int, int]:
    """Where the safetensors JSON header lies: after its little-endian u64 length."""
    return 8, 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("keep", [0, 10, 30, -100, -1])
def test_truncated_file_is_corrupt(store: LatentStore, keep: int) -> None:
    store.put("t", {"latent": latent()})
    corrupt(store, "t", lambda d: bytes(d[:keep]))
    with pytest.raises(BlobCorrupt):
        store.get("t")


def test_flipped_bit_in_payload_is_corrupt(store: LatentStore) -> None:
    store.put("f", {"latent": latent()})
    corrupt(store, "f", lambda d: flip(d, len(d) - 1000, 3))
    with pytest.raises(BlobCorrupt, match="checksum mismatch"):
        store.get("f")


def test_flipped_bit_in_header_is_corrupt(store: LatentStore) -> None:
    store.put("h", {"latent": latent()}, {"k": 5})
    start, end = header_span(store._path("h").read_bytes())
    # A digit of K in the meta (JSON inside the header's JSON): both still parse, so only the checksum can catch it.
    corrupt(store, "h", lambda d: flip(d, start + bytes(d[start:end]).index(b'\\"k\\":5') + 6, 1))
    with pytest.raises(BlobCorrupt, match="checksum mismatch"):
        store.get("h")


def test_garbage_file_is_corrupt(store: LatentStore) -> None:
    store.put("g", {"latent": latent((4, 8, 8))})
    corrupt(store, "g", lambda d: RNG.bytes(len(d)))
    with pytest.raises(BlobCorrupt, match="not a safetensors file"):
        store.get("g")


def test_every_single_bit_flip_is_detected(store: LatentStore) -> None:
    store.put("small", {"latent": latent((2, 3)), "t": np.array([7], np.int64)}, {"k": 5})
    path = store._path("small")
    original = path.read_bytes()
    for index in range(len(original)):
        path.write_bytes(flip(bytearray(original), index, index % 8))
        with pytest.raises(BlobCorrupt):
            store.get("small")


# --- atomicity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["replace", "fsync"])
def test_failed_put_leaves_no_file_and_old_value(
    store: LatentStore, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    old = latent((4, 8, 8))
    store.put("a", {"latent": old}, {"v": "old"})
    files_before, total_before = blob_files(store.root), store.total_bytes

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(f"simulated crash in {step}")

    monkeypatch.setattr(latents.os, step, crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.put("a", {"latent": latent((4, 8, 8))}, {"v": "new"})
    with pytest.raises(OSError, match="simulated crash"):
        store.put("b", {"latent": latent((4, 8, 8))})
    monkeypatch.undo()

    assert blob_files(store.root) == files_before  # no temp files, no "b"
    assert store.total_bytes == total_before
    assert store.get("a").meta == {"v": "old"}
    assert "b" not in store


def test_stale_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    store = LatentStore(tmp_path)
    store.put("a", {"latent": latent((4, 8, 8))})
    shard = store._path("a").parent
    stale, fresh = shard / f".a.safetensors.0001{TEMP_SUFFIX}", shard / f".a.safetensors.0002{TEMP_SUFFIX}"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in flight in another process")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    reopened = LatentStore(tmp_path)
    reopened.wait_walked()  # the walk at open runs in the background, beside Milvus's open
    assert not stale.exists() and fresh.exists()  # a young temp file may be another process's put
    assert reopened.total_bytes == store.size_of("a")
    assert list(reopened.keys()) == ["a"]
    assert reopened.remove_temp_files() == 1 and not fresh.exists()


def test_blobs_of_the_pre_safetensors_format_are_dropped_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LatentStore(tmp_path)
    store.put("kept", {"latent": latent((4, 8, 8))})
    shard = store._path("kept").parent
    for name in ("old1", "old2"):  # what the zlib format left: magic b"NLAT", then a header and a payload
        (shard / f"{name}{LEGACY_SUFFIX}").write_bytes(b"NLAT\x01\x00" + RNG.bytes(200))
    with caplog.at_level(logging.WARNING, logger="nirvana.cache.latents"):
        reopened = LatentStore(tmp_path)
        reopened.wait_walked()  # the walk at open (which drops them) runs in the background
    dropped = [r.getMessage() for r in caplog.records if "pre-safetensors" in r.getMessage()]
    assert dropped == ["dropped 2 latents in the pre-safetensors format; they will be regenerated"]
    assert list(reopened.keys()) == ["kept"] and reopened.total_bytes == disk_bytes(tmp_path)
    assert not list(tmp_path.rglob(f"*{LEGACY_SUFFIX}"))


def test_a_file_that_is_not_safetensors_is_corrupt(store: LatentStore) -> None:
    store.put("x", {"latent": latent((4, 8, 8))})
    corrupt(store, "x", lambda d: b"NLAT\x01\x00" + bytes(d))  # e.g. an old-format blob renamed by hand
    with pytest.raises(BlobCorrupt):
        store.get("x")


# --- accounting and keys --------------------------------------------------------------------------------------------


def test_total_bytes_tracks_puts_deletes_and_reopen(tmp_path: Path) -> None:
    store = LatentStore(tmp_path)
    sizes = {f"p{i}_k{k}": store.put(f"p{i}_k{k}", {"latent": latent((4, 16, 16))}) for i in range(5) for k in (5, 10)}
    assert store.total_bytes == sum(sizes.values()) == disk_bytes(tmp_path)
    store.put("p0_k5", {"latent": latent((4, 32, 32))})  # overwrite with a bigger blob
    assert store.total_bytes == disk_bytes(tmp_path)
    freed = store.delete("p1_k10")
    assert freed == sizes["p1_k10"]
    assert store.total_bytes == disk_bytes(tmp_path)
    assert LatentStore(tmp_path).total_bytes == store.total_bytes
    assert sorted(store.keys()) == sorted(set(sizes) - {"p1_k10"})


def test_total_bytes_is_exact_under_concurrent_writers(store: LatentStore) -> None:
    def work(worker: int) -> None:
        rng = np.random.default_rng(worker)
        for i in range(30):
            key = f"k{rng.integers(0, 8)}"  # threads contend for the same keys
            if i % 3 == 2:
                store.delete(key)
            else:
                store.put(key, {"latent": rng.standard_normal((4, int(rng.integers(1, 16)), 8))})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.total_bytes == disk_bytes(store.root)


def test_blobs_are_sharded_two_levels_deep(store: LatentStore) -> None:
    store.put("abc", {"x": np.zeros(1, np.float32)})
    relative = store._path("abc").relative_to(store.root)
    assert len(relative.parts) == 3 and all(len(part) == 2 for part in relative.parts[:2])


@pytest.mark.parametrize("key", ["", "../evil", "a/b", "a b", "é", "x" * 201, None])
def test_bad_keys_are_rejected_with_the_key(store: LatentStore, key: object) -> None:
    with pytest.raises(InvalidKey) as info:
        store.put(key, {"x": np.zeros(1)})  # type: ignore[arg-type]
    assert repr(key)[:20] in str(info.value)


def test_invalid_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        LatentStore(tmp_path, dtype="bfloat16")
    store = LatentStore(tmp_path)
    with pytest.raises(ValueError, match="float16 range"):
        store.put("big", {"x": np.array([1e6], np.float32)})
    with pytest.raises(TypeError, match="not storable"):
        store.put("obj", {"x": np.array(["a"], dtype=object)})
    assert blob_files(tmp_path) == []
