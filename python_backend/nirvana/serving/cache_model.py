"""Triton glue of the `cache` model: the one owner of the cache state, serving the `nirvana` instances over BLS.

`model_repository/cache/1/model.py` re-exports `TritonPythonModel` from here. One instance (a milvus-lite file admits
one process, and Triton runs each instance in its own process), so requests from every orchestrator are served one
at a time, in the order Triton delivers them. The work is `nirvana.cache.endpoint.CacheEndpoint`;
admissions are answered once queued and written behind by `nirvana.cache.write_behind.AdmissionQueue`
(`cache.admission_queue`), which `finalize` drains before the cache closes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nirvana.cache.checks import CacheLimits, CacheRequestError
from nirvana.cache.endpoint import CacheEndpoint
from nirvana.cache.factory import open_cache
from nirvana.cache.wire import bytes_array
from nirvana.cache.write_behind import AdmissionQueue
from nirvana.checkpoint import CheckpointInfo, load_checkpoint_info
from nirvana.config import EngineConfig, load_config
from nirvana.embed import embedder_dim
from nirvana.security.ratelimit import TenantBuckets
from nirvana.serving.internal import InternalGate
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
        self.gate = InternalGate(pb_utils, args, params)  # before anything else: no credential, no cache
        config = load_config(path=engine_config_path(args, params))
        checkpoint = load_checkpoint_info(config.checkpoint)
        limits = cache_limits(config, checkpoint)
        self.cache = open_cache(config.cache, limits.dim)
        depth = config.cache.admission_queue
        self.admissions = AdmissionQueue(self.cache, depth) if depth > 0 else None  # None: admit before answering
        security = config.security
        self.buckets = TenantBuckets(security.tenant_lookups_per_s, security.tenant_lookup_burst)
        self.endpoint = CacheEndpoint(
            self.cache, limits, self.admissions, self.buckets, similarity_on_miss=security.similarity_on_miss
        )
        self.metrics = CacheStateMetrics(
            pb_utils, self.cache, admissions=self.admissions, buckets=self.buckets, gate=self.gate
        )
        log.info("cache model ready (%s, %d dims): %s", config.embedder, limits.dim, self.cache.stats())

    def execute(self, requests: list) -> list:
        return [self._handle(request) for request in requests]  # N requests in, N responses out

    def _handle(self, request: Any) -> Any:
        pb = self.pb
        refusal = self.gate.refusal(request)
        if refusal is not None:
            return refusal
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


def cache_limits(config: EngineConfig, checkpoint: CheckpointInfo) -> CacheLimits:
    """What this deployment's requests to the cache look like (vector size, latent shape, steps, prompt length)."""
    h, w = checkpoint.latent_size
    return CacheLimits(
        dim=embedder_dim(config.embedder, checkpoint),
        latent_shape=(checkpoint.vae_latent_channels, h, w),  # the denoised latent, in the VAE's space
        max_steps=config.limits.max_steps,
        max_prompt_chars=config.limits.max_prompt_chars,
    )
