"""Triton glue of the `cache` model: the one owner of the cache state, serving the `nirvana` instances over BLS.

`model_repository/cache/1/model.py` re-exports `TritonPythonModel` from here. One instance (a milvus-lite file admits
one process, and Triton runs each instance in its own process), so requests from every orchestrator are served one
at a time, in the order Triton delivers them. The work is `nirvana.runtime.bls_cache.CacheEndpoint`;
admissions are answered once queued and written behind by `nirvana.cache.write_behind.AdmissionQueue`
(`cache.admission_queue`), which `finalize` drains before the cache closes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nirvana.cache.factory import open_cache
from nirvana.cache.write_behind import AdmissionQueue
from nirvana.checkpoint import load_checkpoint_info
from nirvana.config import load_config
from nirvana.embed import embedder_dim
from nirvana.runtime.bls_cache import CacheEndpoint, CacheRequestError, bytes_array
from nirvana.serving.metrics import CacheStateMetrics
from nirvana.serving.params import engine_config_path, model_parameters

log = logging.getLogger("nirvana.triton")
# A full queue (256 admissions, 7-25 ms each) drains in seconds; past this a stop gives the rest up, as a crash would
FINALIZE_DRAIN_S = 60.0


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        params = model_parameters(model_config)
        config = load_config(path=engine_config_path(args, params))
        dim = embedder_dim(config.embedder, load_checkpoint_info(config.checkpoint))
        self.cache = open_cache(config.cache, dim)
        depth = config.cache.admission_queue
        self.admissions = AdmissionQueue(self.cache, depth) if depth > 0 else None  # None: admit before answering
        self.endpoint = CacheEndpoint(self.cache, dim, self.admissions)
        self.metrics = CacheStateMetrics(pb_utils, self.cache, admissions=self.admissions)
        log.info("cache model ready (%s, %d dims): %s", config.embedder, dim, self.cache.stats())

    def execute(self, requests: list) -> list:
        return [self._handle(request) for request in requests]  # N requests in, N responses out

    def _handle(self, request: Any) -> Any:
        pb = self.pb
        try:
            tensors = {name: pb.get_input_tensor_by_name(request, name) for name in ("REQUEST", "VECTOR", "STATES")}
            states = tensors["STATES"].as_numpy() if tensors["STATES"] is not None else None
            response, state = self.endpoint.serve(tensors["REQUEST"].as_numpy(), tensors["VECTOR"].as_numpy(), states)
        except CacheRequestError as err:
            return pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.INVALID_ARG))
        except Exception as err:
            log.exception("cache request failed")
            return pb.InferenceResponse(error=pb.TritonError(f"internal error: {type(err).__name__}: {err}"))
        try:
            self.metrics.update()
        except Exception:  # a metrics failure must not turn an answer into an error
            log.exception("metrics update failed")
        outputs = [pb.Tensor(name, bytes_array(value)) for name, value in (("RESPONSE", response), ("STATE", state))]
        return pb.InferenceResponse(output_tensors=outputs)

    def finalize(self) -> None:
        if self.admissions is not None:
            self.admissions.close(timeout=FINALIZE_DRAIN_S)  # writes what is queued: no admission lost on a clean stop
        self.metrics.close()
        self.cache.close()  # flushes the index's write-behind buffer: no hit count lost on a clean stop
