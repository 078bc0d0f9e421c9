"""What a row must be before it enters the store of record's write-behind buffer, and what a loaded latent must be
before it is served.

One bad row used to block every later Milvus flush (a flush writes its rows in one upsert, and a failed flush keeps
them all for the retry): a prompt over the VARCHAR limit, a NaN or wrong-size vector, absurd metadata. So rows are
checked before they are queued (`check_record`, raising `InvalidRow` that names the field), and a flush that still
fails isolates and drops the rows Milvus refuses (`index.MilvusIndex`). Latents are checked after decoding
(`check_latents`): a non-finite or wrong-shape latent makes every similar request fail until it is removed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from nirvana.cache.records import EntryMeta, PromptRecord

MAX_PROMPT_BYTES = 8192  # the Milvus VARCHAR field's max_length (bytes of UTF-8)
MAX_TENANT_BYTES = 512
MAX_K = 10_000  # steps a latent may skip: far above any step count a request may ask for
MAX_COUNT = 2**53  # hits per replica: exact in a JSON number
MAX_NBYTES = 1 << 40
UNIT_NORM_TOLERANCE = 1e-2  # vectors are unit norm (inner product = cosine); fp16 round trips stay well inside
_CACHE_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_REPLICA_RE = re.compile(r".{1,128}", re.DOTALL)


class InvalidRow(ValueError):
    """A row the store of record would refuse, or that would poison lookups; the message names the field."""


class InvalidLatent(ValueError):
    """A loaded latent that cannot be served (non-finite values, a shape other than the request needs)."""


def check_record(record: PromptRecord, dim: int) -> None:
    """InvalidRow unless `record` is a row Milvus accepts and lookups can use."""
    if not isinstance(record.id, int) or not 0 <= record.id < 2**63:
        raise InvalidRow(f"id {record.id!r}: not a 63-bit row id")
    _check_text("prompt", record.prompt, MAX_PROMPT_BYTES, allow_empty=True)
    if not isinstance(record.cache_key, str) or not _CACHE_KEY_RE.fullmatch(record.cache_key):
        raise InvalidRow(f"cache_key {str(record.cache_key)[:80]!r}: expected 1-64 characters of [A-Za-z0-9_.:-]")
    _check_text("tenant", record.tenant, MAX_TENANT_BYTES, allow_empty=False)
    check_vector(record.vector, dim, InvalidRow)
    if not _finite_in(record.created, 0.0, 1e12):
        raise InvalidRow(f"created {record.created!r}: not a time in seconds")
    for k, entry in record.entries.items():
        check_entry(k, entry)


def check_vector(vector: object, dim: int, error: type[ValueError] = InvalidRow) -> None:
    """`error` unless `vector` is a finite, unit-norm float vector of `dim` values."""
    array = np.asarray(vector)
    if array.shape != (dim,) or array.dtype.kind != "f":
        raise error(f"vector: expected {dim} floats, got {array.dtype} {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise error("vector: holds NaN or inf")
    norm = float(np.linalg.norm(array.astype(np.float64)))
    if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
        raise error(f"vector: norm {norm:.4f}, expected a unit vector")


def check_entry(k: object, entry: EntryMeta) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= MAX_K:
        raise InvalidRow(f"entry K {k!r}: expected an int in [1, {MAX_K}]")
    if not 0 <= entry.nbytes <= MAX_NBYTES:
        raise InvalidRow(f"entry K={k}: nbytes {entry.nbytes} out of range")
    if not _finite_in(entry.last_access, 0.0, 1e12):
        raise InvalidRow(f"entry K={k}: last_access {entry.last_access!r} is not a time in seconds")
    for replica, n in entry.replica_hits.items():
        if not isinstance(replica, str) or not _REPLICA_RE.fullmatch(replica):
            raise InvalidRow(f"entry K={k}: replica id {str(replica)[:40]!r} is not 1-128 characters")
        if not -MAX_COUNT <= n <= MAX_COUNT:  # negative: a retired replica's tombstone (`records.EntryMeta`)
            raise InvalidRow(f"entry K={k}: hit count {n} of replica {replica[:40]!r} out of range")


def check_latents(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """InvalidLatent if a float array holds NaN/inf, or an array named in `expected` is missing or shaped otherwise."""
    for name, shape in (expected or {}).items():
        if name not in arrays:
            raise InvalidLatent(f"no {name!r} array (has {sorted(arrays)})")
        if tuple(arrays[name].shape) != tuple(shape):
            raise InvalidLatent(f"{name!r} has shape {list(arrays[name].shape)}, expected {list(shape)}")
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise InvalidLatent(f"{name!r} holds NaN or inf")


def _check_text(name: str, value: object, max_bytes: int, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise InvalidRow(f"{name}: expected a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRow(f"{name}: not encodable as UTF-8 ({exc.reason})") from None
    if size > max_bytes or (size == 0 and not allow_empty):
        raise InvalidRow(f"{name}: {size} bytes of UTF-8, expected {0 if allow_empty else 1} to {max_bytes}")


def _finite_in(value: object, low: float, high: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
