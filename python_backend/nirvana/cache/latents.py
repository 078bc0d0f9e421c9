"""Latent blob store: named sets of numpy tensors, one safetensors file each, on a directory.

The directory may be a local disk or a shared volume (a Kubernetes RWX PVC). Each blob is written to a temporary
file next to its final name, fsynced and renamed into place, so a reader sees either the old blob or the new one
and a crash leaves at most a temporary file, removed at the next open. Every read is verified (`blob_format`: a
safetensors file with a blake2b digest in its metadata); a damaged file raises :class:`BlobCorrupt` and never
returns wrong data. Floats are stored uncompressed, as float16 by default: about 32 KiB for SD 1.5's 4×64×64 latent.

**Blobs of the earlier format** (``*.nlt``: a custom zlib format, before safetensors) are not read: at open they
are deleted, with one log line counting them, and regenerated as misses recur. Their entries in Milvus then have no
latent, so the cache's reconciliation at open drops them too. Converting them instead would keep the cache warm
across the upgrade but means keeping the old decoder; a cache refills within a day of traffic, so we drop them.

**Blobs of format 2** (safetensors without a binding to their row, before `blob_format` 3) are dropped the same
way: a directory without the `FORMAT_MARKER` file (written at the first open by this version) that holds blobs was
written by an earlier version; its blobs are deleted at open with ONE warning line, and their Milvus entries,
left without a latent, are dropped by the reconciliation that follows. Reading them unbound instead would keep
whatever an earlier version let a forged admission store (issue 31) served without any check that it belongs to
its row. A format-2 blob met later (an old replica still writing a shared directory) fails to decode: its entry is
removed on that first read, as for any damaged blob.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nirvana.cache.blob_format import (
    FORMAT,
    STORED_FLOAT_DTYPES,
    Binding,
    BlobCorrupt,
    BlobMismatch,
    BlobMissing,
    LatentBlob,
    LatentStoreError,
    check_binding,
    decode_blob,
    encode_blob,
)

__all__ = [
    "Binding",
    "BlobCorrupt",
    "BlobMismatch",
    "BlobMissing",
    "InvalidKey",
    "LatentBlob",
    "LatentStore",
    "LatentStoreError",
]

log = logging.getLogger(__name__)

BLOB_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".nlt"  # the pre-safetensors format: dropped at open
TEMP_SUFFIX = ".tmp"
FORMAT_MARKER = "FORMAT"  # in the root: the blob format the directory holds (absent: format 2 or older)
# A temporary file younger than this may belong to a put in flight in another process sharing the directory
# (several Triton model instances, several pods): the cleanup at open leaves it alone.
STALE_TEMP_AGE_S = 300.0
SCANNED_KEYS_MAX_AGE_S = 60.0  # the keys found at open are used by a reconciliation that starts sooner than this

_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class InvalidKey(LatentStoreError, ValueError):
    """The key is not a safe file name ([A-Za-z0-9_.-], 1 to 200 characters)."""


class LatentStore:
    """Blobs under ``root``, sharded two levels deep by a hash of the key (65,536 folders: ~23 files each at 1.5M).

    ``dtype`` (a `latent_codec` codec: "float16", "float32", "q6") is how float tensors are stored. ``total_bytes``
    is this process's view: the scan at open plus its own puts and deletes. The scan at open also removes stale
    temporary files and blobs of the pre-safetensors format (see the module docstring).
    """

    def __init__(self, root: str | Path, dtype: str = "float16") -> None:
        if dtype not in STORED_FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {STORED_FLOAT_DTYPES}, got {dtype!r}")
        self.root = Path(root)
        self.dtype = dtype
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._scanned: tuple[float, set[str]] | None = None  # (time.monotonic(), keys) of the walk at open
        self.old_format_dropped = 0  # blobs of an earlier format deleted at open
        self._total_bytes = 0
        self.scan_s = 0.0  # how long the walk at open took (beside Milvus's open)
        # The walk at open runs in the background, beside Milvus's open: at a million blobs each takes half a
        # minute (`nirvana bench overhead`). Everything that reads or changes what it counts waits for it.
        self._walk_error: BaseException | None = None
        self._walked = threading.Event()
        threading.Thread(target=self._walk, name="latent-scan", daemon=True).start()

    def _walk(self) -> None:
        t0 = time.perf_counter()
        try:
            self._total_bytes = self._scan_at_open()
        except BaseException as err:  # raised to every caller of `wait_walked`
            self._walk_error = err
        finally:
            self.scan_s = time.perf_counter() - t0
            self._walked.set()

    def wait_walked(self) -> None:
        """Block until the walk at open is done; re-raise what it raised (an unreadable directory)."""
        self._walked.wait()
        if self._walk_error is not None:
            raise LatentStoreError(f"walk of {self.root} at open failed: {self._walk_error}") from self._walk_error

    def check_readable(self) -> None:
        """LatentStoreError unless the directory can be listed, without waiting for the walk at open (a restart from
        the mirror snapshot is ready before the walk ends); what the walk raises, if it has ended."""
        if self._walked.is_set():
            self.wait_walked()
            return
        try:
            with os.scandir(self.root) as entries:
                next(entries, None)
        except OSError as err:
            raise LatentStoreError(f"latent directory {self.root} cannot be read: {err}") from err

    def _scan_at_open(self) -> int:
        """The one walk of the directory at open (millions of files): returns the bytes of the blobs, keeps their
        keys for the reconciliation (`take_scanned_keys`), and removes stale temporary files and blobs of the
        pre-safetensors format."""
        total, legacy, cutoff, now = 0, 0, time.time() - STALE_TEMP_AGE_S, time.time()
        marker = self.root / FORMAT_MARKER
        current = marker.is_file() and marker.read_text().strip() == FORMAT
        keys: set[str] = set()
        for entry in self._files(BLOB_SUFFIX, LEGACY_SUFFIX, TEMP_SUFFIX):
            name = entry.name
            if name.endswith(BLOB_SUFFIX) and not current:
                self.old_format_dropped += _remove_if_older(entry, now)
            elif name.endswith(BLOB_SUFFIX):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # deleted meanwhile (another process sharing the directory)
                keys.add(name[: -len(BLOB_SUFFIX)])
            elif name.endswith(TEMP_SUFFIX):
                _remove_if_older(entry, cutoff)
            else:
                legacy += _remove_if_older(entry, now)
        if legacy:
            log.warning("dropped %d latents in the pre-safetensors format; they will be regenerated", legacy)
        if self.old_format_dropped:
            log.warning(
                "latent cache %s was written by an earlier version (blobs not bound to their rows): dropped its %d "
                "latents and their entries; the cache refills as misses recur",
                self.root,
                self.old_format_dropped,
            )
        if not current:
            temp = marker.with_name(f".{FORMAT_MARKER}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
            temp.write_text(FORMAT + "\n")
            os.replace(temp, marker)
        self._scanned = (time.monotonic(), keys)
        return total

    def take_scanned_keys(self, max_age_s: float = SCANNED_KEYS_MAX_AGE_S) -> set[str] | None:
        """The keys the walk at open found, handed out once (the reconciliation at open uses them instead of
        walking the directory again); None once taken, or when the walk is older than ``max_age_s`` (a
        reconnect long after open): then walk with `keys`. Blobs put or deleted by this process since the walk
        are accounted for; another process's are not."""
        self.wait_walked()
        with self._lock:
            scanned, self._scanned = self._scanned, None
        if scanned is None or time.monotonic() - scanned[0] > max_age_s:
            return None
        return scanned[1]

    # --- public API ---------------------------------------------------------------------------------------------

    def put(
        self, key: str, tensors: dict[str, np.ndarray], meta: dict | None = None, binding: Binding | None = None
    ) -> int:
        """Store ``tensors``, a JSON-able ``meta`` and the entry they belong to (``binding``) under ``key``,
        replacing any old blob; returns bytes on disk.

        Atomic: the old blob stays readable until the new one is complete; on any error no partial file is left.
        """
        return self.put_encoded(key, self.encode(tensors, meta, binding))

    def put_encoded(self, key: str, data: bytes) -> int:
        """``put`` of what `encode` made (an admission encodes once, for its budget and its write)."""
        self.wait_walked()
        path = self._path(key)
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
                if self._scanned is not None:
                    self._scanned[1].add(key)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return len(data)

    def encode(self, tensors: dict[str, np.ndarray], meta: dict | None = None, binding: Binding | None = None) -> bytes:
        """The blob ``put`` writes for these tensors, meta and binding in this store's codec. Raises as ``put``
        does (ValueError, TypeError) for tensors it cannot store."""
        return encode_blob(tensors, meta or {}, self.dtype, binding)

    def encoded_size(
        self, tensors: dict[str, np.ndarray], meta: dict | None = None, binding: Binding | None = None
    ) -> int:
        """Bytes ``put`` would write for these tensors, meta and binding."""
        return len(self.encode(tensors, meta, binding))

    def get(self, key: str, expect: Binding | None = None) -> LatentBlob:
        """The blob stored under ``key``; BlobMissing if absent, BlobCorrupt if the file is damaged, BlobMismatch
        if it is not bound to ``expect`` (when given)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"no latent blob stored under key {key!r}") from None
        blob = decode_blob(data, key)
        if expect is not None:
            check_binding(blob, expect, key)
        return blob

    def delete(self, key: str) -> int:
        """Remove the blob under ``key``; returns the bytes freed (0 if it was absent)."""
        self.wait_walked()
        path = self._path(key)
        with self._lock:
            size = _size_or_zero(path)
            if self._scanned is not None:
                self._scanned[1].discard(key)
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
        self.wait_walked()
        with self._lock:
            return self._total_bytes

    def remove_temp_files(self, older_than_s: float = 0.0) -> int:
        """Delete temporary files of interrupted puts older than ``older_than_s`` seconds; returns how many."""
        self.wait_walked()
        cutoff = time.time() - older_than_s
        return sum(_remove_if_older(entry, cutoff) for entry in self._files(TEMP_SUFFIX))

    # --- internals ----------------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise InvalidKey(f"invalid latent key {key!r}: use 1-200 characters from [A-Za-z0-9_.-]")
        shard = hashlib.blake2b(key.encode(), digest_size=2).hexdigest()
        return self.root / shard[:2] / shard[2:] / f"{key}{BLOB_SUFFIX}"

    def _files(self, *suffixes: str) -> Iterator[os.DirEntry]:
        """Files ending in one of ``suffixes`` inside the two-level shard folders."""
        for top in _subdirs(self.root):
            for leaf in _subdirs(top.path):
                with os.scandir(leaf.path) as entries:
                    yield from (e for e in entries if e.name.endswith(suffixes) and e.is_file(follow_symlinks=False))


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


def _remove_if_older(entry: os.DirEntry, cutoff: float) -> bool:
    """Delete a file last modified at or before ``cutoff`` (time.time()); False if younger or already gone."""
    try:
        if entry.stat().st_mtime > cutoff:
            return False
        os.unlink(entry.path)
    except FileNotFoundError:
        return False  # finished (renamed) or cleaned by someone else meanwhile
    return True
