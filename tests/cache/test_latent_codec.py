"""Quantised latents (nirvana.cache.latent_codec, `cache.latent_dtype = "q6"`): a third of float16's bytes, every
value within half a level of what was stored, the format versioned, damage detected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nirvana.cache.blob_format import FORMAT, QUANTISED_FORMAT, _metadata
from nirvana.cache.latent_codec import LatentCodecError, decode_tensor, encode_tensor, roundtrip
from nirvana.cache.latents import BlobCorrupt, LatentStore

RNG = np.random.default_rng(0)


def _half_level(x: np.ndarray) -> np.ndarray:
    """Per channel of ``[B, C, h, w]``: half of (max − min) / 63, the largest error 6 bits allow."""
    return (x.max(axis=(0, 2, 3)) - x.min(axis=(0, 2, 3))).reshape(1, -1, 1, 1) / 126


def _intermediate(side: int) -> np.ndarray:
    """An intermediate latent ``[1, 4, side, side]``: a smooth signal plus the noise still in it at step K (half and
    half), unit variance."""
    signal = np.cumsum(np.cumsum(RNG.standard_normal((1, 4, side, side)), axis=2), axis=3)
    return (0.7 * signal / signal.std() + 0.7 * RNG.standard_normal((1, 4, side, side))).astype(np.float32)


def test_a_sd15_latent_takes_under_12_kb_and_comes_back_within_half_a_level(tmp_path: Path, capsys) -> None:
    store = LatentStore(tmp_path, dtype="q6")
    x = _intermediate(64)
    size = store.put("sd15", {"latent": x, "generator_state": np.arange(16, dtype=np.uint8)}, {"k": 5})
    fp16 = LatentStore(tmp_path / "fp16").put("sd15", {"latent": x}, {"k": 5})
    sdxl = {dtype: LatentStore(tmp_path / f"xl-{dtype}", dtype=dtype) for dtype in ("q6", "float16")}
    xl = {dtype: store.put("sdxl", {"latent": _intermediate(128)}, {"k": 5}) for dtype, store in sdxl.items()}
    with capsys.disabled():
        print(f"\nq6: SD 1.5 4x64x64 latent {size} bytes on disk (float16 {fp16}), SDXL 4x128x128 {xl}")
    assert size <= 12 * 1024 < fp16 / 2.5 and xl["q6"] <= 4 * 12 * 1024 < xl["float16"] / 2.5
    blob = store.get("sd15")
    error = np.abs(blob.tensors["latent"] - x)
    assert blob.tensors["latent"].dtype == np.float32 and np.all(error <= _half_level(x) * 1.0001 + 1e-7)
    assert np.array_equal(blob.tensors["generator_state"], np.arange(16, dtype=np.uint8))  # not floats: exact


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
              elements=st.floats(-1e4, 1e4, width=32)))  # fmt: skip
def test_any_finite_latent_comes_back_within_half_a_level(x: np.ndarray) -> None:
    back = roundtrip(x, "q6")
    assert back.shape == x.shape and np.all(np.abs(back - x) <= _half_level(x) * 1.0001 + 1e-3 * np.abs(x).max())


def test_blobs_say_their_format_and_a_cast_only_blob_stays_format_3(tmp_path: Path) -> None:
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    for dtype, expected in (("q6", QUANTISED_FORMAT), ("float16", FORMAT)):
        store = LatentStore(tmp_path / dtype, dtype=dtype)
        store.put("a", {"latent": x})
        assert _metadata(store._path("a").read_bytes(), "a")["format"] == expected
    # a directory of float16 blobs read by a store that now writes q6: both kinds are read
    mixed = LatentStore(tmp_path / "float16", dtype="q6")
    mixed.put("b", {"latent": x})
    assert np.allclose(mixed.get("a").tensors["latent"], x, atol=1e-2)
    assert np.allclose(mixed.get("b").tensors["latent"], x, atol=0.1)


def test_a_changed_level_in_the_metadata_is_detected(tmp_path: Path) -> None:
    store = LatentStore(tmp_path, dtype="q6")
    store.put("a", {"latent": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)})
    path = store._path("a")
    data = path.read_bytes()
    codecs = json.loads(_metadata(data, "a")["codecs"])
    step = json.dumps(codecs["latent"]["step"][0])
    path.write_bytes(data.replace(step.encode(), json.dumps(codecs["latent"]["step"][0] * 2)[: len(step)].encode()))
    with pytest.raises(BlobCorrupt):
        store.get("a")


def test_a_description_that_does_not_fit_its_codes_is_refused() -> None:
    stored, description = encode_tensor(RNG.standard_normal((1, 4, 8, 8)).astype(np.float32), "q6")
    for bad in ({**description, "shape": [1, 4, 8, 9]}, {**description, "low": [0.0]}, {**description, "codec": "q9"}):
        with pytest.raises(LatentCodecError):
            decode_tensor(stored, bad)
    with pytest.raises(LatentCodecError):
        decode_tensor(stored[:-3], description)


def test_bad_codecs_and_values_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="q4"):
        LatentStore(tmp_path, dtype="q4")
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_tensor(np.array([[[[np.nan]]]], np.float32), "q6")
    assert roundtrip(np.zeros((0, 3), np.float32), "q6").shape == (0, 3)  # nothing to quantise: stored as a cast
