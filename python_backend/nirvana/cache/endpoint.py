"""The `cache` model's side of the cache seam: what it runs for each request, over the one `ApproximateCache`.

Triton runs each python model instance in its own process and a milvus-lite file admits one process, so the cache
state (the in-process mirror, the LCBFU counts, the Milvus connection, the latent files) has one owner: the
single-instance `cache` model (`nirvana.serving.cache_model`). Its client is `nirvana.runtime.cache_client`; the
format between them is `nirvana.cache.wire`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from nirvana.cache.checks import (
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
from nirvana.cache.wire import decode_states, lookup_message, one_bytes
from nirvana.cache.write_behind import Admission
from nirvana.security.ratelimit import TenantBuckets

if TYPE_CHECKING:
    from nirvana.cache.manager import ApproximateCache
    from nirvana.cache.write_behind import AdmissionQueue


class CacheEndpoint:
    """Serves `lookup` and `admit` requests over one `ApproximateCache`, every field checked first
    (`nirvana.cache.checks`).

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
            message = json.loads(one_bytes("REQUEST", request))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CacheRequestError(f"REQUEST: not JSON ({err})") from None
        if not isinstance(message, dict) or message.get("op") not in self._ops:
            op = message.get("op") if isinstance(message, dict) else message
            shown = repr(op) if len(repr(op)) <= 40 else repr(op)[:37] + "..."
            raise CacheRequestError(f"REQUEST op={shown}: must be one of {sorted(self._ops)}")
        blob = b"" if states is None else one_bytes("STATES", states)
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
