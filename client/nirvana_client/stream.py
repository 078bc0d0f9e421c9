"""Streamed generation through the decoupled `nirvana_stream` model (gRPC only): cache, progress and preview
events while the image is made, then the image (tritonclient's `start_stream` / `async_stream_infer`)."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nirvana_client.client import GenerateOptions, GenerateResult, NirvanaClient

STREAM_MODEL = "nirvana_stream"
# Beside the `nirvana` model's inputs (client.INPUT_DATATYPES): previews every M steps run, 0 = none.
STREAM_INPUT_DATATYPES = {"PREVIEW_EVERY": "INT32"}
# Beside its outputs: EVENT (JSON) on every response, PREVIEW (uint8 [h, w, 3]) on preview responses.
STREAM_OUTPUT_DATATYPES = {"EVENT": "BYTES", "PREVIEW": "UINT8"}


class StreamCancelled(Exception):
    """`on_event` returned False: the stream was closed and the server told to drop the request."""


@dataclass(frozen=True)
class StreamEvent:
    """One response: ``event`` is "cache", "progress" or "final"; ``data`` the EVENT JSON; ``preview`` uint8
    ``[h, w, 3]`` or None; ``elapsed_ms`` since the request was sent."""

    event: str
    data: dict
    preview: np.ndarray | None
    elapsed_ms: float


def _final_result(result: object, latency_ms: float) -> GenerateResult:
    def one(name: str) -> object:
        return result.as_numpy(name).reshape(-1)[0]  # type: ignore[attr-defined]

    return GenerateResult(
        image=result.as_numpy("IMAGE"),  # type: ignore[attr-defined]
        cache_hit=bool(one("CACHE_HIT")),
        skipped_steps=int(one("SKIPPED_STEPS")),  # type: ignore[call-overload]
        similarity=float(one("SIMILARITY")),  # type: ignore[arg-type]
        latency_ms=latency_ms,
        server_timings_ms=json.loads(one("TIMINGS")),  # type: ignore[arg-type]
    )


def generate_stream(
    client: NirvanaClient,
    prompt: str,
    options: GenerateOptions | None = None,
    preview_every: int = 0,
    on_event: Callable[[StreamEvent], object] | None = None,
) -> tuple[GenerateResult, list[StreamEvent]]:
    """Generate one image over a gRPC stream; ``on_event`` sees every event as it arrives (returning False
    cancels: the stream is closed with ``cancel_requests=True`` and :class:`StreamCancelled` raised). Returns the
    image's result and every event, the final one included. A server error raises InferenceServerException."""
    if client.protocol != "grpc":
        raise ValueError("streaming needs protocol='grpc' (Triton streams over gRPC only)")
    grpc_client = client._client
    inputs = client.build_inputs(prompt, options or GenerateOptions())
    if preview_every:
        inputs.append(client._input("PREVIEW_EVERY", preview_every, "INT32", np.int32))
    responses: queue.Queue = queue.Queue()
    callback = lambda result, error: responses.put((result, error))  # noqa: E731
    grpc_client.start_stream(callback=callback, headers=client.headers or None)  # headers: stream-wide, gRPC
    events: list[StreamEvent] = []
    start = time.perf_counter()
    closed = False
    try:
        grpc_client.async_stream_infer(STREAM_MODEL, inputs)
        while True:
            result, error = responses.get(timeout=client.timeout_s)
            if error is not None:
                raise error
            elapsed_ms = (time.perf_counter() - start) * 1e3
            data = json.loads(result.as_numpy("EVENT").reshape(-1)[0])
            preview = result.as_numpy("PREVIEW") if data.get("preview") else None
            events.append(StreamEvent(data["event"], data, preview, elapsed_ms))
            if on_event is not None and on_event(events[-1]) is False:
                grpc_client.stop_stream(cancel_requests=True)
                closed = True
                raise StreamCancelled(f"cancelled after {len(events)} events")
            if data["event"] == "final":
                return _final_result(result, elapsed_ms), events
    finally:
        if not closed:
            grpc_client.stop_stream(cancel_requests=True)
