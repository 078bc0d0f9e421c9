"""The on-disk format of one latent blob: a safetensors file with a checksum and its binding in its metadata.

A blob is a set of named numpy tensors plus a small JSON-able ``meta`` dict. It is written as a plain safetensors
file (readable by any safetensors tool) whose string metadata holds::

    "format":  "nirvana-latent/3"
    "meta":    the caller's meta, as JSON
    "binding": what the blob belongs to, as JSON: row id, cache key, tenant, K (`Binding`), and "tensors": the
               128-bit blake2b of the tensors alone (per tensor in name order: name, dtype, shape, bytes)
    "blake2b": 128-bit blake2b over the meta JSON, the binding JSON and the tensors' digest

safetensors itself checks that the header parses and that the tensors exactly cover the data; the digest catches
what that leaves (a flipped bit in the data, a changed shape digit or meta value), so a damaged file raises
:class:`BlobCorrupt` and never returns wrong data. The binding catches an intact blob in the wrong place: one
copied or renamed from another row's key (or written there by someone who could write the directory but not
Milvus) is refused by a reader that says which row it expects (`check_binding`: :class:`BlobMismatch`).

Format 2 (no binding) is not read: `latents.LatentStore` drops a directory of them at open (see there).

How float tensors are stored is the store's codec (`latent_codec`): cast to float16 (the default) or float32, a
4×64×64 latent (SD 1.5 at 512×512) then taking 32 KiB of data plus a header of about 250 bytes; or ``q6``, quantised
and deflated (about 11 KB), its tensors then 1-D uint8 arrays restored from a ``"codecs"`` entry of the metadata
(JSON: per tensor, what `latent_codec.decode_tensor` needs), which the checksum covers. A blob with a quantised
tensor is ``"nirvana-latent/4"``, so that a version which only reads format 3 refuses it instead of returning the
codes as values; one with casts only is still written as format 3, so a float16 cache stays readable by the previous
version during a rolling upgrade. ``tests/cache/test_latents.py`` prints the sizes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from nirvana.cache.latent_codec import CODECS, LatentCodecError, decode_tensor, encode_tensor

FORMAT = "nirvana-latent/3"  # bound blobs whose tensors are stored as they are (casts)
QUANTISED_FORMAT = "nirvana-latent/4"  # bound blobs with a quantised tensor (a "codecs" metadata entry)
STORED_FLOAT_DTYPES = CODECS
_ACCEPTED_KINDS = "fiub"  # float, signed, unsigned, bool
_LENGTH_BYTES = 8  # safetensors: little-endian u64 header length, then the JSON header, then the data


class LatentStoreError(Exception):
    """Base class of latent store errors."""


class BlobMissing(LatentStoreError):
    """No blob is stored under the key."""


class BlobCorrupt(LatentStoreError):
    """The stored file is damaged (truncated, not safetensors, checksum mismatch, undecodable)."""


class BlobMismatch(BlobCorrupt):
    """The blob is intact but bound to another row, cache key, tenant or K than the reader expects."""


@dataclass(frozen=True)
class Binding:
    """Which cache entry a blob belongs to: its Milvus row, cache key, tenant partition and K."""

    row_id: int
    cache_key: str
    tenant: str
    k: int

    def to_json(self) -> dict:
        return {"row": f"{self.row_id:016x}", "cache_key": self.cache_key, "tenant": self.tenant, "k": self.k}


@dataclass
class LatentBlob:
    """A stored set of tensors: float arrays come back as float32 whatever the stored dtype, others unchanged.

    ``meta`` is the JSON-able dict given at ``put`` after a JSON round trip (tuples come back as lists).
    """

    tensors: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    binding: dict = field(default_factory=dict)  # `Binding.to_json()` plus "tensors" (their digest); {} if none

    @property
    def digest(self) -> str:
        """The tensors' digest (names the blob's content: `ApproximateCache` puts it in a `Lookup.entry_id`)."""
        return str(self.binding.get("tensors", ""))


def check_binding(blob: LatentBlob, expected: Binding, key: str = "?") -> None:
    """BlobMismatch unless ``blob`` is bound to ``expected``."""
    found = {name: blob.binding.get(name) for name in ("row", "cache_key", "tenant", "k")}
    if found != expected.to_json():
        raise BlobMismatch(f"{key}: bound to {found}, expected {expected.to_json()}")


def encode_blob(tensors: dict[str, np.ndarray], meta: dict, float_dtype: str, binding: Binding | None = None) -> bytes:
    """Serialise tensors (floats cast to ``float_dtype``), meta and binding to the format in the module docstring."""
    stored, codecs = {}, {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        stored[name], description = _stored_array(name, np.asarray(value), float_dtype)
        if description is not None:
            codecs[name] = description
    meta_json = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    bound = {**(binding.to_json() if binding is not None else {}), "tensors": _tensor_digest(stored)}
    binding_json = json.dumps(bound, separators=(",", ":"), sort_keys=True)
    codecs_json = json.dumps(codecs, separators=(",", ":"), sort_keys=True) if codecs else ""
    digest = _digest(meta_json, binding_json, bound["tensors"], codecs_json)
    metadata = {"meta": meta_json, "binding": binding_json, "blake2b": digest}
    metadata["format"] = QUANTISED_FORMAT if codecs else FORMAT
    if codecs:
        metadata["codecs"] = codecs_json
    return save_tensors(stored, metadata=metadata)


def decode_blob(data: bytes, key: str = "?") -> LatentBlob:
    """Parse and verify a stored blob; BlobCorrupt on any damage."""
    metadata = _metadata(data, key)
    quantised = metadata.get("format") == QUANTISED_FORMAT
    if metadata.get("format") != FORMAT and not quantised:
        raise BlobCorrupt(f"{key}: not a {FORMAT} or {QUANTISED_FORMAT} blob (format {metadata.get('format')!r})")
    try:
        stored = load_tensors(data)
    except SafetensorError as exc:
        raise BlobCorrupt(f"{key}: undecodable ({exc})") from exc
    meta_json, binding_json = metadata.get("meta", ""), metadata.get("binding", "")
    codecs_json = metadata.get("codecs", "") if quantised else ""
    tensor_digest = _tensor_digest(stored)
    if _digest(meta_json, binding_json, tensor_digest, codecs_json) != metadata.get("blake2b"):
        raise BlobCorrupt(f"{key}: checksum mismatch")
    try:
        meta, binding = json.loads(meta_json), json.loads(binding_json)
        codecs = json.loads(codecs_json) if codecs_json else {}
    except ValueError as exc:
        raise BlobCorrupt(f"{key}: undecodable meta ({exc})") from exc
    tensors = {}
    for name, array in stored.items():
        if array.dtype.kind not in _ACCEPTED_KINDS:
            raise BlobCorrupt(f"{key}: tensor {name!r} has unsupported dtype {array.dtype}")
        tensors[name] = array.astype(np.float32) if array.dtype.kind == "f" else array.copy()
        if name in codecs:
            try:
                tensors[name] = decode_tensor(array, codecs[name])
            except LatentCodecError as exc:
                raise BlobCorrupt(f"{key}: tensor {name!r}: {exc}") from exc
    if not isinstance(binding, dict) or binding.get("tensors") != tensor_digest:
        raise BlobCorrupt(f"{key}: binding does not name these tensors")
    return LatentBlob(tensors=tensors, meta=meta, binding=binding)


def _metadata(data: bytes, key: str) -> dict:
    """The safetensors header's string metadata (safetensors' own API reads it only from a file)."""
    if len(data) < _LENGTH_BYTES:
        raise BlobCorrupt(f"{key}: truncated ({len(data)} bytes)")
    header_len = int.from_bytes(data[:_LENGTH_BYTES], "little")
    if header_len > len(data) - _LENGTH_BYTES:
        raise BlobCorrupt(f"{key}: not a safetensors file or truncated (header of {header_len} bytes)")
    try:
        metadata = json.loads(data[_LENGTH_BYTES : _LENGTH_BYTES + header_len])["__metadata__"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BlobCorrupt(f"{key}: undecodable header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, dict):
        raise BlobCorrupt(f"{key}: undecodable header (metadata is not a map)")
    return metadata


def _digest(meta_json: str, binding_json: str, tensor_digest: str, codecs_json: str = "") -> str:
    text = f"{meta_json}\0{binding_json}\0{tensor_digest}" + (f"\0{codecs_json}" if codecs_json else "")
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        array = tensors[name]
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _stored_array(name: str, array: np.ndarray, codec: str) -> tuple[np.ndarray, dict | None]:
    """The array as it is written (floats by ``codec``, little-endian, C order) and, for a quantising codec, what
    restores it."""
    if array.dtype.kind not in _ACCEPTED_KINDS:
        raise TypeError(f"tensor {name!r}: dtype {array.dtype} is not storable (use float, int, uint or bool)")
    description = None
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # detected just below, with a clearer message
            stored, description = encode_tensor(array, codec)
        # float16 saturates to inf above 65504; storing that silently would return wrong data later.
        if codec == "float16" and np.any(np.isinf(stored) & ~np.isinf(array)):
            raise ValueError(f"tensor {name!r} has values outside the float16 range; use dtype='float32'")
        array = stored
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return array.astype(array.dtype.newbyteorder("<"), order="C", copy=False), description
