"""What the `cache` model accepts, checked as if any client could send it.

Only the orchestrators can reach the `cache` model (`nirvana.serving.internal`), but a bug in one of them, or a
leaked credential, must still not be able to plant a row that fails every later flush or a latent that fails every
similar request: every field is checked here before the cache sees it, and each refusal names the field and value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from nirvana.cache.validation import MAX_PROMPT_BYTES
from nirvana.request import check_tenant

CACHE_KEY = re.compile(r"^[0-9a-f]{32}$")  # `Pipeline.cache_key`: 32 hex digits of a SHA-256
NORM_TOLERANCE = 1e-3  # every embedder L2-normalises in float32: its norms are 1 ± 1e-6
MAX_META_BYTES = 4096
MAX_MODEL_OUTPUTS = 8  # DPM-Solver++ keeps `solver_order` ≤ 3 outputs
MAX_GENERATOR_BYTES = 16384  # torch's CPU generator state is 5,056 bytes, CUDA's 16
STATE_NAME = re.compile(r"^(latent|num_model_outputs|lower_order_nums|generator_state|model_output_\d)$")


class CacheRequestError(ValueError):
    """A request to the `cache` model is malformed; the message names the field and the value."""


@dataclass(frozen=True)
class CacheLimits:
    """What this deployment's latents look like: `latent_shape` (C, h, w) for the UNet's latent, `max_steps`."""

    dim: int
    latent_shape: tuple[int, int, int]
    max_steps: int
    max_prompt_chars: int


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_vector(vector: np.ndarray, dim: int) -> np.ndarray:
    """A finite, unit-norm float32 vector of `dim` values (a forged 1000·(1,…,1) would outscore any real match)."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape != (dim,):
        raise CacheRequestError(f"VECTOR: expected {dim} values, got {vector.size}")
    if not np.isfinite(vector).all():
        raise CacheRequestError("VECTOR: holds NaN or inf")
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise CacheRequestError(f"VECTOR: norm {norm:.4g}, expected 1 (an L2-normalised embedding)")
    return vector


def check_key(message: dict) -> str:
    key = message.get("cache_key")
    if not isinstance(key, str) or not CACHE_KEY.match(key):
        raise CacheRequestError(f"REQUEST cache_key={_shown(key)}: expected 32 lowercase hex digits")
    return key


def check_tenant_field(message: dict) -> str:
    tenant = message.get("tenant")
    if not isinstance(tenant, str):
        raise CacheRequestError(f"REQUEST tenant={_shown(tenant)}: expected a string")
    try:
        return check_tenant("REQUEST tenant", tenant)
    except ValueError as err:
        raise CacheRequestError(str(err)) from None


def check_steps(message: dict, limits: CacheLimits) -> int:
    steps = message.get("num_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 2 <= steps <= limits.max_steps:
        raise CacheRequestError(f"REQUEST num_steps={_shown(steps)}: expected an integer in [2, {limits.max_steps}]")
    return steps


def check_prompt(message: dict, limits: CacheLimits) -> str:
    prompt = message.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CacheRequestError(f"REQUEST prompt={_shown(prompt)}: expected a non-empty string")
    if len(prompt) > limits.max_prompt_chars or len(prompt.encode()) > MAX_PROMPT_BYTES:
        raise CacheRequestError(
            f"REQUEST prompt: {len(prompt)} characters / {len(prompt.encode())} bytes, over the limit of "
            f"{limits.max_prompt_chars} characters / {MAX_PROMPT_BYTES} bytes"
        )
    return prompt


def check_meta(message: dict) -> dict | None:
    meta = message.get("meta") or None
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(v, str | int | float | bool) for v in meta.values()):
        raise CacheRequestError(f"REQUEST meta={_shown(meta)}: expected an object of plain values")
    if len(json.dumps(meta).encode()) > MAX_META_BYTES:
        raise CacheRequestError(f"REQUEST meta: over {MAX_META_BYTES} bytes")
    return meta


def check_states(states: dict[int, dict[str, np.ndarray]], limits: CacheLimits) -> None:
    """Each K in [1, max_steps) with a finite float latent of the deployment's shape and plausible scheduler state."""
    latent = (1, *limits.latent_shape)
    for k, arrays in states.items():
        where = f"STATES K={k}"
        if not 1 <= k < limits.max_steps:
            raise CacheRequestError(f"{where}: K must be in [1, {limits.max_steps})")
        for name, array in arrays.items():
            if not STATE_NAME.match(name):
                raise CacheRequestError(f"{where}: unexpected tensor {_shown(name)}")
            _check_array(f"{where} {name}", name, array, latent)
        if "latent" not in arrays:
            raise CacheRequestError(f"{where}: no 'latent'")


def _check_array(where: str, name: str, array: np.ndarray, latent: tuple[int, ...]) -> None:
    if name == "latent" or name.startswith("model_output_"):
        if array.dtype.kind != "f" or tuple(array.shape) != latent:
            raise CacheRequestError(f"{where}: expected float {list(latent)}, got {array.dtype} {list(array.shape)}")
        if not np.isfinite(array).all():
            raise CacheRequestError(f"{where}: holds NaN or inf")
    elif name == "generator_state":
        if array.dtype != np.uint8 or array.ndim != 1 or array.size > MAX_GENERATOR_BYTES:
            raise CacheRequestError(f"{where}: expected ≤ {MAX_GENERATOR_BYTES} uint8 values")
    else:  # num_model_outputs, lower_order_nums: one small count
        value = int(array.reshape(-1)[0]) if array.dtype.kind in "iu" and array.size == 1 else -1
        if not 0 <= value <= MAX_MODEL_OUTPUTS:
            raise CacheRequestError(f"{where}: expected one integer in [0, {MAX_MODEL_OUTPUTS}]")
