"""The orchestrators' side of the cache seam: `BlsCache`, the `CacheClient` a served `Pipeline` uses, over BLS
requests to the `cache` model (which runs `nirvana.cache.endpoint`; the format between them: `nirvana.cache.wire`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np

from nirvana.cache.outcome import Lookup, Reason
from nirvana.cache.wire import bytes_array, encode_states, lookup_from_message, one_bytes
from nirvana.contract.specs import CACHE_MODEL
from nirvana.k_choice import KSelector
from nirvana.runtime.bls import BlsError, bls_infer
from nirvana.security.ratelimit import RateLimited

log = logging.getLogger(__name__)


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
        return json.loads(one_bytes("RESPONSE", out["RESPONSE"])), one_bytes("STATE", out["STATE"])

    def _failed(self, what: str, err: BlsError) -> None:
        with self._lock:
            self.failures += 1
        log.warning("cache %s failed, served uncached: %s", what, err)


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
