"""Triton glue of the `nirvana` BLS model: tensors in, `Pipeline.generate`, tensors out, errors converted once.

`model_repository/nirvana/1/model.py` re-exports `TritonPythonModel` from here. Only the modules of
`nirvana.serving` import `triton_python_backend_utils` (available inside the python backend stub only). The
streaming model (`stream_model`) builds its engine, parses its inputs and converts its errors with the functions
here, so both models serve one engine the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nirvana.addons.registry import AddOnUnavailable
from nirvana.checkpoint import CheckpointInfo, load_checkpoint_info
from nirvana.config import load_config
from nirvana.contract.specs import STEP_SCHEDULER_MODEL, ModelSpec, nirvana_spec
from nirvana.embed import ClipEmbedder, DitClipEmbedder, SdxlClipEmbedder, resolve_embedder
from nirvana.families import DIT
from nirvana.pipeline import NonFiniteError, Pipeline
from nirvana.progress import EventCallback
from nirvana.request import RequestError
from nirvana.runtime.bls import BlsEmbedder, BlsSubModels, use_credential
from nirvana.runtime.bls_adapters import BlsAdapters
from nirvana.runtime.bls_control import BlsControlNets
from nirvana.runtime.bls_denoiser import BlsDenoiser, SchedulerFull
from nirvana.runtime.cache_client import BlsCache
from nirvana.runtime.decoupled import serving_request
from nirvana.security.credential import read_secret
from nirvana.security.ratelimit import RateLimited
from nirvana.security.tenancy import TenantResolver
from nirvana.service_time import LoadBoard, ServiceTimes
from nirvana.serving.internal import secret_path
from nirvana.serving.metrics import RequestMetrics
from nirvana.serving.params import engine_config_path, model_parameters

log = logging.getLogger("nirvana.triton")

# Triton input name (`nirvana_spec`) → Pipeline.generate keyword
GENERATE_KEYWORDS = {
    "PROMPT": "prompt",
    "NEGATIVE_PROMPT": "negative_prompt",
    "SEED": "seed",
    "NUM_INFERENCE_STEPS": "steps",
    "GUIDANCE_SCALE": "guidance",
    "CACHE_MODE": "cache_mode",
    "TENANT": "tenant",
    "LORA": "lora",
    "CONTROLNET": "controlnet",
    "CONTROLNET_SCALE": "controlnet_scale",
}
# Inputs handed over as arrays, not single values.
ARRAY_KEYWORDS = {"CONTROL_IMAGE": "control_image"}


class InputError(ValueError):
    pass


def scalar_value(name: str, array: np.ndarray, max_bytes: int | None = None) -> object:
    """The single value of a [1] tensor; strings decoded as strict UTF-8, refused before decoding when longer than
    `max_bytes`."""
    if array.size != 1:
        raise InputError(f"{name}: expected exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        if max_bytes is not None and len(value) > max_bytes:
            raise InputError(f"{name}: {len(value)} bytes, over the limit of {max_bytes}")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{name}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return value.item() if isinstance(value, np.generic) else value


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}


def output_arrays(spec: ModelSpec, result: Any) -> dict[str, np.ndarray]:
    """The response tensors of one `GenerationResult`, each in the dtype the spec declares."""
    values = {
        "IMAGE": result.image,
        "CACHE_HIT": [result.cache_hit],
        "SKIPPED_STEPS": [result.skipped_steps],
        "SIMILARITY": [result.similarity],
        "TIMINGS": [json.dumps(_rounded(result.timings_ms)).encode()],
    }
    arrays = {}
    for tensor in (spec.tensor(name) for name in values):
        dtype = np.object_ if tensor.dtype == "string" else np.dtype(tensor.dtype)
        arrays[tensor.name] = np.asarray(values[tensor.name], dtype=dtype)
    return arrays


class ServedEngine(NamedTuple):
    """What an orchestrator instance serves with: the engine, its request metrics, the checkpoint's facts, where
    each request's tenant comes from, and the most bytes a string input may have."""

    pipeline: Pipeline
    metrics: RequestMetrics
    checkpoint: CheckpointInfo
    tenants: TenantResolver
    max_string_bytes: int


def served_pipeline(pb_utils: Any, args: dict[str, Any]) -> ServedEngine:
    """The engine of one orchestrator instance over BLS sub-models and the `cache` model, from Triton's `initialize`
    arguments (parameters `engine_config`, `conditioning_device`, `internal_secret_file`), with its request metrics."""
    params = model_parameters(json.loads(args["model_config"]))
    use_credential(read_secret(secret_path(args, params)))  # every BLS request of this stub carries it
    config = load_config(path=engine_config_path(args, params))
    checkpoint = load_checkpoint_info(config.checkpoint)  # weights live in the sub-models
    # "auto": keep the text conditioning on the GPU when this stub's torch has CUDA (the torch profile).
    device = params.get("conditioning_device", "cpu")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = BlsSubModels(pb_utils, conditioning_device=device)
    # "clip" pools the served text_encoder's output here; "minilm" is the prompt_embedder model.
    clip = resolve_embedder(config.embedder, checkpoint) == "clip"
    if not clip:
        embedder = BlsEmbedder(pb_utils)
    elif checkpoint.family == "sdxl":  # pooled text_embeds come with every conditioning pass
        embedder = SdxlClipEmbedder(checkpoint)
    elif checkpoint.family in DIT:  # so do their pooled_projections
        embedder = DitClipEmbedder(checkpoint)
    else:
        embedder = ClipEmbedder(checkpoint, models.encode_text)
    cache = BlsCache(pb_utils, config.cache.selection.selector())
    service = ServiceTimes(LoadBoard.for_server())  # shared with this server's other orchestrator stubs
    adapters = None
    if config.adapters.dir is not None:
        settings = config.adapters
        adapters = BlsAdapters(pb_utils, settings.dir, scale_step=settings.scale_step, wait_s=settings.load_wait_s)
    controlnets = None
    if config.controlnets.dir is not None:
        controlnets = BlsControlNets(pb_utils, config.controlnets.dir, checkpoint)
    # the repository's step scheduler runs the loops of every request at once (nirvana.serving.scheduler_model)
    scheduled = (Path(args["model_repository"]).parent / STEP_SCHEDULER_MODEL / "config.pbtxt").is_file()
    pipeline = Pipeline(
        config,
        checkpoint=checkpoint,
        models=models,
        embedder=embedder,
        cache=cache,
        service=service,
        served_adapters=adapters,
        served_controlnets=controlnets,
        denoiser=BlsDenoiser(pb_utils) if scheduled else None,
    )
    metrics = RequestMetrics(pb_utils, cache, service)
    # UTF-8 takes at most 4 bytes a character: anything longer fails the character limit anyway
    max_bytes = 4 * max(config.limits.max_prompt_chars, config.limits.max_tenant_chars, 1024)
    return ServedEngine(pipeline, metrics, checkpoint, TenantResolver(config.security), max_bytes)


def generate_options(pb_utils: Any, spec: ModelSpec, request: Any, engine: ServedEngine) -> dict[str, object]:
    """`Pipeline.generate` keywords from the request's inputs that `GENERATE_KEYWORDS` names (others are the
    caller's), the tenant the deployment established (`nirvana.security.tenancy`); raises InputError for a missing
    required input or a tensor that is not one value, RequestError for a tenant that is not allowed."""
    options: dict[str, object] = {}
    for tensor_spec in spec.inputs:
        tensor = pb_utils.get_input_tensor_by_name(request, tensor_spec.name)
        if tensor is not None and tensor_spec.name in GENERATE_KEYWORDS:
            value = scalar_value(tensor_spec.name, tensor.as_numpy(), engine.max_string_bytes)
            options[GENERATE_KEYWORDS[tensor_spec.name]] = value
        elif tensor is not None and tensor_spec.name in ARRAY_KEYWORDS:
            options[ARRAY_KEYWORDS[tensor_spec.name]] = tensor.as_numpy()
        elif tensor is None and not tensor_spec.optional:
            raise InputError(f"{tensor_spec.name}: required input is missing")
    typed = options.get("tenant")
    options["tenant"] = engine.tenants.resolve(None if typed is None else str(typed), request.parameters())
    return options


def generate_or_error(
    pb_utils: Any, pipeline: Pipeline, metrics: RequestMetrics, options: dict, on_event: EventCallback | None = None
) -> tuple[Any, Any]:
    """``(result, None)`` or ``(None, error response)``: engine errors become Triton errors here, once. Exceptions
    the caller owns (`nirvana.progress.Cancelled`) pass through."""
    pb = pb_utils
    try:
        result = pipeline.generate(on_event=on_event, **options)
    except (RateLimited, AddOnUnavailable, SchedulerFull) as err:  # the client may retry: UNAVAILABLE, saying why
        metrics.rejected()
        return None, pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.UNAVAILABLE))
    except (InputError, RequestError) as err:
        metrics.rejected()
        return None, pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.INVALID_ARG))
    except NonFiniteError as err:  # nothing was cached; the message says what to change
        metrics.failed_non_finite()
        return None, pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.INTERNAL))
    try:
        metrics.observe(result)
    except Exception:  # a metrics failure must not turn a generated image into an error
        log.exception("metrics update failed")
    return result, None


def internal_error(pb_utils: Any, err: Exception) -> Any:
    """The response for an unexpected failure: the server stays up; the client gets a message it can report."""
    log.exception("request failed")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(err).__name__}: {err}"))


class TritonPythonModel:
    """One `nirvana` instance (of N, each its own stub process): Triton hands it one request per `execute`
    (`max_batch_size: 0`), so N requests run at once. The instances hold no cache state: lookups and admissions go
    to the one `cache` model (`BlsCache`)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.engine = served_pipeline(pb_utils, args)
        self.pipeline, self.metrics = self.engine.pipeline, self.engine.metrics
        self.spec = nirvana_spec(self.engine.checkpoint.image_size)
        log.info("nirvana model instance %s ready", args.get("model_instance_name", "?"))

    async def execute(self, requests: list) -> list:
        # Off the stub's event loop: a request runs for seconds of blocking sub-model calls.
        return list(await asyncio.gather(*(asyncio.to_thread(self._handle, r) for r in requests)))

    def _handle(self, request: Any) -> Any:
        pb = self.pb
        try:
            options = generate_options(pb, self.spec, request, self.engine)
            with serving_request(request):  # the stub's queue is flushed with it (`nirvana.runtime.decoupled`)
                result, error = generate_or_error(pb, self.pipeline, self.metrics, options)
        except (InputError, RequestError) as err:
            self.metrics.rejected()
            return pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.INVALID_ARG))
        except Exception as err:
            return internal_error(pb, err)
        if error is not None:
            return error
        outputs = [pb.Tensor(name, array) for name, array in output_arrays(self.spec, result).items()]
        return pb.InferenceResponse(output_tensors=outputs)

    def finalize(self) -> None:
        self.pipeline.close()  # the cache model flushes the cache at its own finalize
