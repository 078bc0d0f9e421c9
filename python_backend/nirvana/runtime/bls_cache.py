"""The cache behind one Triton model: the `nirvana` instances look up and admit through BLS requests to `cache`.

Triton runs each python model instance in its own process and a milvus-lite file admits one process, so the cache
state (the in-process mirror, the LCBFU counts, the Milvus connection, the latent files) has one owner: the
single-instance `cache` model. This module holds both ends of its contract (`nirvana.specs.cache_spec`):

* `BlsCache`: the `CacheClient` an orchestrator's `Pipeline` uses;
* `CacheEndpoint`: what the `cache` model runs for each request, over an `ApproximateCache`.

Wire format: `REQUEST` and `RESPONSE` are UTF-8 JSON; arrays travel as one safetensors blob each (`STATES`: the
latents to admit, tensors named "<K>/<name>"; `STATE`: a hit's resume arrays), exact for every dtype.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from nirvana.cache.outcome import Lookup, Reason
from nirvana.cache.selection import KSelector
from nirvana.cache.write_behind import Admission
from nirvana.runtime.bls import BlsError, bls_infer
from nirvana.runtime.cache_checks import (
    CacheLimits,
    CacheRequestError,
    check_key,
    check_meta,
    check_prompt,
    check_states,
    check_steps,
    check_tenant_field,
    check_vector,
)
from nirvana.security.ratelimit import RateLimited, TenantBuckets
from nirvana.specs import CACHE_MODEL

if TYPE_CHECKING:
    from nirvana.cache.manager import ApproximateCache
    from nirvana.cache.write_behind import AdmissionQueue

log = logging.getLogger(__name__)

States = Mapping[int, Mapping[str, np.ndarray]]


# -- wire format ----------------------------------------------------------------------------------------
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


def _one_bytes(name: str, array: np.ndarray) -> bytes:
    if array.size != 1:
        raise CacheRequestError(f"{name}: expected exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return bytes(value) if isinstance(value, bytes | np.bytes_) else str(value).encode()


# -- the cache model's side ----------------------------------------------------------------------------
class CacheEndpoint:
    """Serves `lookup` and `admit` requests over one `ApproximateCache`, every field checked first
    (`nirvana.runtime.cache_checks`).

    With `admissions` (a write-behind queue) an `admit` is validated, queued and answered at once: `admitted` is then
    the number of latents queued (an upper bound: Ks the prompt already has are skipped when written), `queued`
    says whether the queue took it (false: full, the admission dropped). Without, it is written before the answer.
    `buckets` rate-limits lookups per tenant (answered `rate_limited` with `retry_after_s`); a miss reports no
    similarity unless `similarity_on_miss` (a continuous signal a prober could climb).
    """

    def __init__(
        self,
        cache: ApproximateCache,
        limits: CacheLimits,
        admissions: AdmissionQueue | None = None,
        buckets: TenantBuckets | None = None,
        similarity_on_miss: bool = False,
    ) -> None:
        self.cache, self.limits, self.admissions = cache, limits, admissions
        self.buckets, self.similarity_on_miss = buckets, similarity_on_miss
        self._latent = (1, *limits.latent_shape)
        self._ops: dict[str, Callable[[dict, np.ndarray, bytes], tuple[dict, bytes]]] = {
            "lookup": self._lookup,
            "admit": self._admit,
            "invalidate": self._invalidate,
        }

    def serve(self, request: np.ndarray, vector: np.ndarray, states: np.ndarray | None) -> tuple[bytes, bytes]:
        """REQUEST [1], VECTOR [dim] (lookup, admit; ignored by invalidate), STATES [1] or None (the request's tensors)
        → (RESPONSE, STATE) bytes."""
        try:
            message = json.loads(_one_bytes("REQUEST", request))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CacheRequestError(f"REQUEST: not JSON ({err})") from None
        if not isinstance(message, dict) or message.get("op") not in self._ops:
            op = message.get("op") if isinstance(message, dict) else message
            shown = repr(op) if len(repr(op)) <= 40 else repr(op)[:37] + "..."
            raise CacheRequestError(f"REQUEST op={shown}: must be one of {sorted(self._ops)}")
        blob = b"" if states is None else _one_bytes("STATES", states)
        response, state = self._ops[message["op"]](message, vector, blob)
        return json.dumps(response).encode(), state

    def _lookup(self, message: dict, vector: np.ndarray, _: bytes) -> tuple[dict, bytes]:
        vector = check_vector(vector, self.limits.dim)
        key, tenant = check_key(message), check_tenant_field(message)
        num_steps = check_steps(message, self.limits)
        wait = None if self.buckets is None else self.buckets.take(tenant)
        if wait is not None:
            return {"rate_limited": True, "retry_after_s": wait}, b""
        # a cached latent of another shape (a foreign or damaged entry) is dropped on the spot, not served
        lookup = self.cache.lookup(vector, key, tenant, num_steps, expected_shapes={"latent": self._latent})
        if not lookup.hit and not self.similarity_on_miss:
            lookup.similarity = None
        return lookup_message(lookup)

    def _invalidate(self, message: dict, _: np.ndarray, __: bytes) -> tuple[dict, bytes]:
        entry, tenant = message.get("entry_id"), check_tenant_field(message)
        if not isinstance(entry, str) or len(entry) > 128:
            raise CacheRequestError(f"REQUEST entry_id={str(entry)[:40]!r}: expected an entry id of a hit")
        try:
            return {"invalidated": self.cache.invalidate(entry, tenant)}, b""
        except ValueError as err:
            raise CacheRequestError(f"REQUEST entry_id: {err}") from None

    def _admit(self, message: dict, vector: np.ndarray, blob: bytes) -> tuple[dict, bytes]:
        vector = check_vector(vector, self.limits.dim)
        prompt, key, tenant = check_prompt(message, self.limits), check_key(message), check_tenant_field(message)
        states = decode_states(blob)
        check_states(states, self.limits)
        admission = Admission(
            prompt,
            np.array(vector, np.float32),  # a copy: the request's tensor may be released before the write
            key,
            tenant,
            states,
            replace=message.get("replace") is True,
            meta=check_meta(message),
        )
        if self.admissions is None:
            return {"admitted": admission.write_to(self.cache)}, b""
        if not admission.states or not self.cache.available:  # what `admit` would refuse anyway: nothing to queue
            return {"admitted": 0, "queued": False}, b""
        queued = self.admissions.submit(admission)
        return {"admitted": len(admission.states) if queued else 0, "queued": queued}, b""


# -- the orchestrators' side ---------------------------------------------------------------------------
class BlsCache:
    """`CacheClient` over BLS requests to the `cache` model (`selector`: the same configuration's K selector).

    A failed call (the cache model unloaded or broken) is served as an unreachable Milvus is: a miss
    (`CACHE_UNAVAILABLE`), nothing admitted, the image still generated; `failures` counts those calls.
    """

    def __init__(self, pb_utils: Any, selector: KSelector, model: str = CACHE_MODEL) -> None:
        self._pb, self._model, self.selector = pb_utils, model, selector
        self.failures = 0
        self._lock = threading.Lock()

    def lookup(self, vector: np.ndarray, cache_key: str, tenant: str, num_steps: int) -> Lookup:
        t0 = time.perf_counter()
        message = {"op": "lookup", "cache_key": cache_key, "tenant": tenant, "num_steps": int(num_steps)}
        try:
            response, state = self._call(message, vector)
            if response.get("rate_limited"):
                limited = RateLimited(float(response["retry_after_s"]))
            else:
                limited, lookup = None, lookup_from_message(response, state)
        except (BlsError, ValueError, KeyError) as err:  # no answer, or one that cannot be read
            self._failed("lookup", err)
            return Lookup(False, Reason.CACHE_UNAVAILABLE, timings_ms={"cache_call_ms": _ms_since(t0)})
        if limited is not None:
            raise limited  # the client's to handle (UNAVAILABLE, retry later), not a cache failure
        lookup.timings_ms["cache_call_ms"] = _ms_since(t0)  # the BLS round trip, retrieval included
        return lookup

    def admit(
        self,
        prompt: str,
        vector: np.ndarray,
        cache_key: str,
        tenant: str,
        states: dict[int, dict[str, np.ndarray]],
        replace: bool = False,
        meta: dict | None = None,
    ) -> int:
        message = {
            "op": "admit",
            "prompt": prompt,
            "cache_key": cache_key,
            "tenant": tenant,
            "replace": replace,
            "meta": meta or {},
        }
        try:
            response, _ = self._call(message, vector, encode_states(states))
            return int(response["admitted"])
        except (BlsError, ValueError, KeyError) as err:
            self._failed("admission", err)
            return 0

    def invalidate(self, entry_id: str, tenant: str) -> bool:
        message = {"op": "invalidate", "entry_id": entry_id, "tenant": tenant}
        try:
            response, _ = self._call(message, np.zeros(1, np.float32))  # VECTOR is required; this op reads none
            return bool(response["invalidated"])
        except (BlsError, ValueError, KeyError) as err:
            self._failed("invalidation", err)
            return False

    def close(self) -> None:
        """Nothing to release here: the `cache` model flushes and closes the cache at its own finalize."""

    def _call(self, message: dict, vector: np.ndarray, states: bytes | None = None) -> tuple[dict, bytes]:
        inputs = {
            "REQUEST": bytes_array(json.dumps(message).encode()),
            "VECTOR": np.asarray(vector, dtype=np.float32).reshape(-1),
        }
        if states is not None:
            inputs["STATES"] = bytes_array(states)
        out = bls_infer(self._pb, self._model, inputs, ["RESPONSE", "STATE"])
        return json.loads(_one_bytes("RESPONSE", out["RESPONSE"])), _one_bytes("STATE", out["STATE"])

    def _failed(self, what: str, err: BlsError) -> None:
        with self._lock:
            self.failures += 1
        log.warning("cache %s failed, served uncached: %s", what, err)


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
