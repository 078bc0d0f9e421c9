"""Triton glue of the decoupled `nirvana_stream` model: the `nirvana` request path, reporting as it goes.

Contract: `nirvana.contract.stream`. The engine, input parsing and error conversion are the `nirvana` model's
(`bls_model`); what is added here is turning `nirvana.progress` events into responses and noticing cancellation.

Concurrency: each instance (a stub process) streams up to ``streams_per_instance`` requests at once, one thread
each: a stream spends its time waiting on BLS calls (the batched UNet), and a thread costs kilobytes where another
stub process costs ≈ 235 MiB (torch). Two instances keep one stream's Python work (scheduler step, preview) from
queueing every other stream behind one GIL. `execute` blocks while all of an instance's threads are busy, so further
requests wait in Triton's bounded queue (``max_queue_size``) rather than in an unbounded thread-pool queue.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from nirvana.contract.stream import MAX_PREVIEW_EVERY, nirvana_stream_spec
from nirvana.progress import CacheEvent, Cancelled, StepEvent, latent_preview
from nirvana.request import RequestError
from nirvana.runtime.decoupled import serving_request
from nirvana.serving.bls_model import (
    InputError,
    generate_options,
    generate_or_error,
    internal_error,
    output_arrays,
    scalar_value,
)
from nirvana.serving.params import model_parameters

log = logging.getLogger("nirvana.triton.stream")
DEFAULT_STREAMS_PER_INSTANCE = 4


def preview_every(pb_utils: Any, request: Any) -> int:
    """The request's ``PREVIEW_EVERY`` (0 when absent); InputError outside [0, MAX_PREVIEW_EVERY]."""
    tensor = pb_utils.get_input_tensor_by_name(request, "PREVIEW_EVERY")
    every = 0 if tensor is None else int(scalar_value("PREVIEW_EVERY", tensor.as_numpy()))
    if not 0 <= every <= MAX_PREVIEW_EVERY:
        raise InputError(f"PREVIEW_EVERY={every}: must be in [0, {MAX_PREVIEW_EVERY}]")
    return every


def _event_tensor(pb_utils: Any, payload: dict) -> Any:
    return pb_utils.Tensor("EVENT", np.array([json.dumps(payload).encode()], dtype=np.object_))


class StreamReporter:
    """The `on_event` callback of one streamed request: a response per event, a preview every ``every`` steps run,
    and `Cancelled` as soon as Triton reports the request cancelled (client cancelled or closed the stream)."""

    def __init__(self, pb_utils: Any, request: Any, sender: Any, every: int) -> None:
        self.pb, self.request, self.sender, self.every = pb_utils, request, sender, every
        self.steps_run = 0

    def cancelled(self) -> bool:
        return bool(self.request.is_cancelled())

    def __call__(self, event: CacheEvent | StepEvent) -> None:
        if self.cancelled():
            raise Cancelled("the client cancelled the request")
        payload = event.to_json()
        tensors = []
        if isinstance(event, StepEvent):
            self.steps_run += 1
            if self.every and self.steps_run % self.every == 0:
                tensors.append(self.pb.Tensor("PREVIEW", latent_preview(event.latent)))
                payload["preview"] = True
        tensors.append(_event_tensor(self.pb, payload))
        self.sender.send(self.pb.InferenceResponse(output_tensors=tensors))


class TritonPythonModel:
    """One `nirvana_stream` instance: `execute` hands each request to a thread and returns (decoupled)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from nirvana.serving.bls_model import served_pipeline

        self.pb = pb_utils
        params = model_parameters(json.loads(args["model_config"]))
        self.engine = served_pipeline(pb_utils, args)
        self.pipeline, self.metrics, checkpoint = self.engine.pipeline, self.engine.metrics, self.engine.checkpoint
        self.spec = nirvana_stream_spec(checkpoint.image_size, checkpoint.latent_size)
        self.previews = checkpoint.latent_channels == 4  # the fixed RGB map is Stable Diffusion's 4-channel one
        streams = int(params.get("streams_per_instance", DEFAULT_STREAMS_PER_INSTANCE))
        self.slots = threading.BoundedSemaphore(streams)
        self.workers = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="nirvana-stream")
        log.info("nirvana_stream instance %s ready (%d streams)", args.get("model_instance_name", "?"), streams)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                options = generate_options(self.pb, self.spec, request, self.engine)
                every = preview_every(self.pb, request)
                if every and not self.previews:
                    raise InputError("PREVIEW_EVERY: this model's latent has no 4-channel RGB preview; send 0")
            except (InputError, RequestError) as err:
                self.metrics.rejected()
                self._finish(sender, error=self.pb.TritonError(str(err), self.pb.TritonError.INVALID_ARG))
                continue
            self.slots.acquire()  # all threads busy: block, and let Triton queue the rest
            self.workers.submit(self._stream, request, sender, options, every)
        return None

    def _stream(self, request: Any, sender: Any, options: dict, every: int) -> None:
        pb = self.pb
        reporter = StreamReporter(pb, request, sender, every)
        try:
            with serving_request(request):  # the stub's queue is flushed with it (`nirvana.runtime.decoupled`)
                result, error = generate_or_error(pb, self.pipeline, self.metrics, options, on_event=reporter)
            if error is not None:
                sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            arrays = output_arrays(self.spec, result)
            final = {"event": "final", "reason": str(result.reason), "admitted": result.admitted}
            outputs = [pb.Tensor(name, array) for name, array in arrays.items()]
            outputs.append(_event_tensor(pb, final | {"steps_run": reporter.steps_run}))
            sender.send(pb.InferenceResponse(output_tensors=outputs), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Cancelled:
            log.info("stream cancelled after %d steps; nothing admitted", reporter.steps_run)
            self._finish(sender, error=pb.TritonError("request cancelled", pb.TritonError.CANCELLED))
        except Exception as err:
            self._finish(sender, response=internal_error(pb, err))
        finally:
            self.slots.release()

    def _finish(self, sender: Any, error: Any = None, response: Any = None) -> None:
        """The last response (an error, if any) with the final flag; a client already gone is not an error here."""
        response = response or self.pb.InferenceResponse(error=error)
        try:
            sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as err:  # e.g. the stream was closed: Triton has already released the request
            log.info("final response not delivered: %s", err)

    def finalize(self) -> None:
        # Not waiting: a thread stuck on a request Triton has already let go of must not hold the unload (seen once
        # after a cancelled stream: the instance did not unload within Triton's 30 s exit timeout).
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.pipeline.close()
