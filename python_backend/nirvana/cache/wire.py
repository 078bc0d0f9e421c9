"""The `cache` model's wire format, shared by its client (`nirvana.runtime.cache_client`) and its endpoint
(`nirvana.cache.endpoint`); the contract itself is `nirvana.contract.specs.cache_spec`.

`REQUEST` and `RESPONSE` are UTF-8 JSON; arrays travel as one safetensors blob each (`STATES`: the latents to
admit, tensors named "<K>/<name>"; `STATE`: a hit's resume arrays), exact for every dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from nirvana.cache.checks import CacheRequestError
from nirvana.cache.outcome import Lookup, Reason

States = Mapping[int, Mapping[str, np.ndarray]]


def encode_arrays(arrays: Mapping[str, np.ndarray] | None) -> bytes:
    """Named arrays → one safetensors blob; None or {} → b"" (a miss carries no state)."""
    if not arrays:
        return b""
    return save_tensors({name: np.ascontiguousarray(array) for name, array in arrays.items()})


def decode_arrays(blob: bytes) -> dict[str, np.ndarray] | None:
    return load_tensors(bytes(blob)) if blob else None


def encode_states(states: States) -> bytes:
    """K → ResumeState arrays (what `admit` takes) → one blob of tensors named "<K>/<name>"."""
    return encode_arrays({f"{k}/{name}": array for k, arrays in states.items() for name, array in arrays.items()})


def decode_states(blob: bytes) -> dict[int, dict[str, np.ndarray]]:
    """Inverse of `encode_states`; CacheRequestError for a blob that is not one."""
    try:
        arrays = decode_arrays(blob) or {}
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise CacheRequestError(f"STATES: not a safetensors blob ({type(err).__name__})") from None
    states: dict[int, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        k, _, name = key.partition("/")
        if not k.isdigit():
            raise CacheRequestError(f"STATES: tensor {key[:40]!r} is not named '<K>/<name>'")
        states.setdefault(int(k), {})[name] = array
    return states


def lookup_message(lookup: Lookup) -> tuple[dict, bytes]:
    """A `Lookup` as (RESPONSE JSON object, STATE blob)."""
    message = {
        "hit": lookup.hit,
        "reason": lookup.reason.value,
        "similarity": lookup.similarity,
        "k": lookup.k,
        "matched_prompt": lookup.matched_prompt,
        "meta": lookup.meta,
        "timings_ms": lookup.timings_ms,
        "entry_id": lookup.entry_id,
    }
    return message, encode_arrays(lookup.arrays)


def lookup_from_message(message: dict, state: bytes) -> Lookup:
    """Inverse of `lookup_message`."""
    similarity = message["similarity"]
    return Lookup(
        hit=bool(message["hit"]),
        reason=Reason(message["reason"]),
        similarity=None if similarity is None else float(similarity),
        k=int(message["k"]),
        matched_prompt=message["matched_prompt"],
        arrays=decode_arrays(state),
        timings_ms=dict(message["timings_ms"]),
        meta=dict(message["meta"]),
        entry_id=message.get("entry_id"),
    )


def bytes_array(value: bytes) -> np.ndarray:
    """One BYTES element, as a [1] tensor carries it."""
    array = np.empty(1, dtype=np.object_)  # object, not "S": numpy's fixed-width bytes drop trailing NULs
    array[0] = value
    return array


def one_bytes(name: str, array: np.ndarray) -> bytes:
    if array.size != 1:
        raise CacheRequestError(f"{name}: expected exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return bytes(value) if isinstance(value, bytes | np.bytes_) else str(value).encode()
