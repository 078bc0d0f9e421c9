"""Latent blob store: named sets of numpy tensors, compressed, one file each, on a directory.

The directory may be a local disk or a shared volume (a Kubernetes RWX PVC). Each blob is written to a temporary
file next to its final name, fsynced and renamed into place, so a reader sees either the old blob or the new one
and a crash leaves at most a temporary file, removed at the next open. Every read is verified against checksums of
the header and of the payload; a damaged file raises :class:`BlobCorrupt` and never returns wrong data.

File format (version 1), little-endian::

    magic b"NLAT" | u16 version | u32 header length | 16-byte blake2b of the header | header | payload

The header is UTF-8 JSON: per tensor its name, stored dtype and shape; the caller's ``meta``; the payload's length,
uncompressed length and blake2b digest. The payload is zlib over the concatenated tensors, each byte-shuffled
(all first bytes of its elements, then all second bytes, ...) because the sign/exponent bytes of float latents
compress well once they sit together.

Size: a 4×64×64 latent (SD 1.5 at 512×512) of random normal values stored as float16 takes about 28 KB on disk
(raw float16: 32 KiB; raw float32: 64 KiB); ``tests/cache/test_latents.py`` prints the measured number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"NLAT"
FORMAT_VERSION = 1
BLOB_SUFFIX = ".nlt"
TEMP_SUFFIX = ".tmp"
# A temporary file younger than this may belong to a put in flight in another process sharing the directory
# (several Triton model instances, several pods): the cleanup at open leaves it alone.
STALE_TEMP_AGE_S = 300.0

_PREFIX = struct.Struct("<4sHI16s")  # magic, version, header length, header digest
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_STORED_FLOAT_DTYPES = ("float16", "float32")
_ACCEPTED_KINDS = "fiub"  # float, signed, unsigned, bool


class LatentStoreError(Exception):
    """Base class of latent store errors."""


class BlobMissing(LatentStoreError):
    """No blob is stored under the key."""


class BlobCorrupt(LatentStoreError):
    """The stored file is damaged (truncated, bad magic/header, checksum mismatch, undecodable)."""


class InvalidKey(LatentStoreError, ValueError):
    """The key is not a safe file name ([A-Za-z0-9_.-], 1 to 200 characters)."""


@dataclass
class LatentBlob:
    """A stored set of tensors: float arrays come back as float32 whatever the stored dtype, others unchanged.

    ``meta`` is the JSON-able dict given at ``put`` after a JSON round trip (tuples come back as lists).
    """

    tensors: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)


class LatentStore:
    """Blobs under ``root``, sharded two levels deep by a hash of the key (65,536 folders: ~23 files each at 1.5M).

    ``dtype`` ("float16" or "float32") is how float tensors are stored; ``compression_level`` is zlib's (0-9).
    ``total_bytes`` is this process's view: the scan at open plus its own puts and deletes.
    """

    def __init__(self, root: str | Path, dtype: str = "float16", compression_level: int = 1) -> None:
        if dtype not in _STORED_FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_STORED_FLOAT_DTYPES}, got {dtype!r}")
        if type(compression_level) is not int or not 0 <= compression_level <= 9:
            raise ValueError(f"compression_level must be an int in [0, 9], got {compression_level!r}")
        self.root = Path(root)
        self.dtype = dtype
        self.compression_level = compression_level
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_temp_files(older_than_s=STALE_TEMP_AGE_S)
        self._total_bytes = sum(entry.stat().st_size for entry in self._files(BLOB_SUFFIX))

    # --- public API ---------------------------------------------------------------------------------------------

    def put(self, key: str, tensors: dict[str, np.ndarray], meta: dict | None = None) -> int:
        """Store ``tensors`` and a JSON-able ``meta`` under ``key``, replacing any old blob; returns bytes on disk.

        Atomic: the old blob stays readable until the new one is complete; on any error no partial file is left.
        """
        path = self._path(key)
        data = encode_blob(tensors, meta or {}, self.dtype, self.compression_level)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            # Under the lock so that concurrent puts/deletes of one key keep total_bytes exact.
            with self._lock:
                old_size = _size_or_zero(path)
                os.replace(temp, path)
                self._total_bytes += len(data) - old_size
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return len(data)

    def get(self, key: str) -> LatentBlob:
        """The blob stored under ``key``; BlobMissing if absent, BlobCorrupt if the file is damaged."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"no latent blob stored under key {key!r}") from None
        return decode_blob(data, key)

    def delete(self, key: str) -> int:
        """Remove the blob under ``key``; returns the bytes freed (0 if it was absent)."""
        path = self._path(key)
        with self._lock:
            size = _size_or_zero(path)
            try:
                path.unlink()
            except FileNotFoundError:
                return 0
            self._total_bytes -= size
        return size

    def size_of(self, key: str) -> int:
        """Bytes on disk of the blob under ``key``; BlobMissing if absent."""
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"no latent blob stored under key {key!r}") from None

    def __contains__(self, key: str) -> bool:
        return self._path(key).is_file()

    def keys(self) -> Iterator[str]:
        """All stored keys, in no particular order (walks the directory: slow for millions of blobs)."""
        # Temporary files end in TEMP_SUFFIX, so they never match here.
        for entry in self._files(BLOB_SUFFIX):
            yield entry.name[: -len(BLOB_SUFFIX)]

    @property
    def total_bytes(self) -> int:
        """Bytes on disk of all blobs, tracked in memory."""
        with self._lock:
            return self._total_bytes

    def remove_temp_files(self, older_than_s: float = 0.0) -> int:
        """Delete temporary files of interrupted puts older than ``older_than_s`` seconds; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self._files(TEMP_SUFFIX):
            try:
                if entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # finished (renamed) or cleaned by someone else meanwhile
        return removed

    # --- internals ----------------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise InvalidKey(f"invalid latent key {key!r}: use 1-200 characters from [A-Za-z0-9_.-]")
        shard = hashlib.blake2b(key.encode(), digest_size=2).hexdigest()
        return self.root / shard[:2] / shard[2:] / f"{key}{BLOB_SUFFIX}"

    def _files(self, suffix: str) -> Iterator[os.DirEntry]:
        """Files ending in ``suffix`` inside the two-level shard folders."""
        for top in _subdirs(self.root):
            for leaf in _subdirs(top.path):
                with os.scandir(leaf.path) as entries:
                    yield from (e for e in entries if e.name.endswith(suffix) and e.is_file(follow_symlinks=False))


def encode_blob(tensors: dict[str, np.ndarray], meta: dict, float_dtype: str, compression_level: int) -> bytes:
    """Serialise tensors and meta to the file format described in the module docstring."""
    specs, chunks = [], []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        array = _stored_array(name, np.asarray(value), float_dtype)
        specs.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        chunks.append(_shuffle(array))
    raw = b"".join(chunks)
    payload = zlib.compress(raw, compression_level)
    header = {
        "tensors": specs,
        "meta": meta,
        "raw_bytes": len(raw),
        "payload_bytes": len(payload),
        "payload_blake2b": hashlib.blake2b(payload, digest_size=16).hexdigest(),
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    digest = hashlib.blake2b(header_bytes, digest_size=16).digest()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), digest) + header_bytes + payload


def decode_blob(data: bytes, key: str = "?") -> LatentBlob:
    """Parse and verify a stored blob; BlobCorrupt on any damage."""
    if len(data) < _PREFIX.size:
        raise BlobCorrupt(f"{key}: truncated ({len(data)} bytes, shorter than the fixed prefix)")
    magic, version, header_len, header_digest = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BlobCorrupt(f"{key}: bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise BlobCorrupt(f"{key}: unsupported format version {version}")
    header_bytes = data[_PREFIX.size : _PREFIX.size + header_len]
    if len(header_bytes) != header_len:
        raise BlobCorrupt(f"{key}: truncated header")
    if hashlib.blake2b(header_bytes, digest_size=16).digest() != header_digest:
        raise BlobCorrupt(f"{key}: header checksum mismatch")
    payload = data[_PREFIX.size + header_len :]
    try:
        header = json.loads(header_bytes)
        if len(payload) != header["payload_bytes"]:
            raise BlobCorrupt(f"{key}: payload is {len(payload)} bytes, header says {header['payload_bytes']}")
        if hashlib.blake2b(payload, digest_size=16).hexdigest() != header["payload_blake2b"]:
            raise BlobCorrupt(f"{key}: payload checksum mismatch")
        raw = zlib.decompress(payload)
        if len(raw) != header["raw_bytes"]:
            raise BlobCorrupt(f"{key}: decompressed to {len(raw)} bytes, header says {header['raw_bytes']}")
        tensors, offset = {}, 0
        for spec in header["tensors"]:
            dtype = np.dtype(spec["dtype"])
            if dtype.kind not in _ACCEPTED_KINDS:
                raise BlobCorrupt(f"{key}: tensor {spec['name']!r} has unsupported dtype {dtype}")
            shape = tuple(int(n) for n in spec["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            array = _unshuffle(raw[offset : offset + nbytes], dtype, shape)
            tensors[spec["name"]] = array.astype(np.float32) if dtype.kind == "f" else array.copy()
            offset += nbytes
        if offset != len(raw):
            raise BlobCorrupt(f"{key}: tensors cover {offset} of {len(raw)} payload bytes")
        return LatentBlob(tensors=tensors, meta=header["meta"])
    except BlobCorrupt:
        raise
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise BlobCorrupt(f"{key}: undecodable ({type(exc).__name__}: {exc})") from exc


def _stored_array(name: str, array: np.ndarray, float_dtype: str) -> np.ndarray:
    """The array as it is written: floats cast to ``float_dtype``, little-endian, C order."""
    if array.dtype.kind not in _ACCEPTED_KINDS:
        raise TypeError(f"tensor {name!r}: dtype {array.dtype} is not storable (use float, int, uint or bool)")
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # detected just below, with a clearer message
            stored = array.astype(float_dtype)
        # float16 saturates to inf above 65504; storing that silently would return wrong data later.
        if float_dtype == "float16" and np.any(np.isinf(stored) & ~np.isinf(array)):
            raise ValueError(f"tensor {name!r} has values outside the float16 range; use dtype='float32'")
        array = stored
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)


def _shuffle(array: np.ndarray) -> bytes:
    if array.dtype.itemsize == 1:
        return array.tobytes()
    return np.frombuffer(array.tobytes(), np.uint8).reshape(-1, array.dtype.itemsize).T.tobytes()


def _unshuffle(chunk: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    planes = np.frombuffer(chunk, np.uint8).reshape(dtype.itemsize, -1)
    # May be a read-only view of ``chunk``: the caller copies.
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


def _subdirs(path: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False) and len(e.name) == 2]
    except FileNotFoundError:
        return []


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
