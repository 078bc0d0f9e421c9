"""Typed client for the `nirvana` Triton model over gRPC or HTTP (tritonclient only)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Protocol = Literal["grpc", "http"]
MODEL = "nirvana"
# Inputs of the `nirvana` model (Triton datatypes, each of shape [1] but CONTROL_IMAGE); PROMPT is required, the rest
# optional.
# The one place the client names them: requests, perf_analyzer input data and tests all read this table. The
# client depends on tritonclient only, so this is its own copy of the server's spec, checked against it by a test.
INPUT_DATATYPES = {
    "PROMPT": "BYTES",
    "NEGATIVE_PROMPT": "BYTES",
    "SEED": "INT64",
    "NUM_INFERENCE_STEPS": "INT32",
    "GUIDANCE_SCALE": "FP32",
    "CACHE_MODE": "BYTES",
    "TENANT": "BYTES",
    "LORA": "BYTES",
    "CONTROLNET": "BYTES",
    "CONTROL_IMAGE": "UINT8",  # [H, W, 3], the image's size
    "CONTROLNET_SCALE": "FP32",
}
# Outputs: IMAGE is [H, W, 3], the others [1]; TIMINGS is JSON of server-side ms per stage.
OUTPUT_DATATYPES = {
    "IMAGE": "UINT8",
    "CACHE_HIT": "BOOL",
    "SKIPPED_STEPS": "INT32",
    "SIMILARITY": "FP32",
    "TIMINGS": "BYTES",
}
_NUMPY_TYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}


@dataclass(frozen=True)
class GenerateOptions:
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    cache_mode: str | None = None  # auto | bypass | refresh
    tenant: str | None = None
    lora: str | None = None  # LoRA adapters and scales: "name:0.8,other:0.5"
    controlnet: str | None = None  # a ControlNet's name, with control_image (uint8 [H, W, 3]) at controlnet_scale
    control_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    controlnet_scale: float | None = None


@dataclass
class GenerateResult:
    image: np.ndarray  # uint8 [H, W, 3]
    cache_hit: bool
    skipped_steps: int
    similarity: float
    latency_ms: float  # client-side, request sent to response decoded
    server_timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, measured in the server


def request_values(prompt: str, options: GenerateOptions) -> list[tuple[str, str | int | float | np.ndarray]]:
    """(input name, value) of one request: PROMPT first, then each optional input that is set."""
    optional = [
        ("NEGATIVE_PROMPT", options.negative_prompt),
        ("SEED", options.seed),
        ("NUM_INFERENCE_STEPS", options.steps),
        ("GUIDANCE_SCALE", options.guidance),
        ("CACHE_MODE", options.cache_mode),
        ("TENANT", options.tenant),
        ("LORA", options.lora),
        ("CONTROLNET", options.controlnet),
        ("CONTROL_IMAGE", options.control_image),
        ("CONTROLNET_SCALE", options.controlnet_scale),
    ]
    return [("PROMPT", prompt)] + [(name, value) for name, value in optional if value is not None]


class NirvanaClient:
    """`NirvanaClient("127.0.0.1:8001", "grpc").generate("a red fox")`."""

    def __init__(
        self,
        url: str,
        protocol: Protocol = "grpc",
        model: str = MODEL,
        timeout_s: float = 600.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """`headers` go with every request: what the gateway in front of the server authenticates (e.g.
        ``{"authorization": "Bearer …"}``), or a signed tenant token (``{"x-nirvana-tenant": token}``)."""
        if protocol == "grpc":
            import tritonclient.grpc as tc
        elif protocol == "http":
            import tritonclient.http as tc
        else:
            raise ValueError(f"protocol={protocol!r}: must be grpc or http")
        self._tc, self.protocol, self.model, self.timeout_s = tc, protocol, model, timeout_s
        self.headers = dict(headers or {})
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self._client = tc.InferenceServerClient(url=url, **kwargs)

    def ready(self) -> bool:
        return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))

    def _input(self, name: str, value: object, datatype: str, np_type: type) -> object:
        # An image goes as it is; every other input is one value of shape [1].
        array = np.ascontiguousarray(value, np_type) if isinstance(value, np.ndarray) else np.array([value], np_type)
        tensor = self._tc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def build_inputs(self, prompt: str, options: GenerateOptions) -> list:
        inputs = []
        for name, value in request_values(prompt, options):
            datatype = INPUT_DATATYPES[name]
            value = value.encode() if isinstance(value, str) else value
            inputs.append(self._input(name, value, datatype, _NUMPY_TYPES[datatype]))
        return inputs

    def generate(self, prompt: str, options: GenerateOptions | None = None) -> GenerateResult:
        outputs = [self._tc.InferRequestedOutput(name) for name in OUTPUT_DATATYPES]
        start = time.perf_counter()
        # gRPC: a client-side deadline in seconds. HTTP: the deadline is the connection's network_timeout; its
        # infer(timeout=...) is a *server-side queue* timeout in microseconds, which we leave to the model config.
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        inputs = self.build_inputs(prompt, options or GenerateOptions())
        result = self._client.infer(self.model, inputs, outputs=outputs, headers=self.headers or None, **kwargs)
        latency_ms = (time.perf_counter() - start) * 1e3
        return GenerateResult(
            image=result.as_numpy("IMAGE"),
            cache_hit=bool(result.as_numpy("CACHE_HIT").reshape(-1)[0]),
            skipped_steps=int(result.as_numpy("SKIPPED_STEPS").reshape(-1)[0]),
            similarity=float(result.as_numpy("SIMILARITY").reshape(-1)[0]),
            latency_ms=latency_ms,
            server_timings_ms=json.loads(result.as_numpy("TIMINGS").reshape(-1)[0]),
        )

    def close(self) -> None:
        self._client.close()
