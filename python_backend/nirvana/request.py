"""One request's fields, validated once against the engine's limits: every error names the field and the value
(what a Triton client sees as INVALID_ARG)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from nirvana.config import EngineConfig

__all__ = [
    "CACHE_MODES",
    "DEFAULT_TENANT",
    "SEED_MAX",
    "CacheMode",
    "GenerationRequest",
    "RequestError",
    "check_tenant",
    "validate_request",
]

CacheMode = Literal["auto", "bypass", "refresh"]
CACHE_MODES = ("auto", "bypass", "refresh")
SEED_MAX = 2**63 - 1
DEFAULT_TENANT = "default"  # a request that names no tenant, where the client names it (`tenant_source="client"`)
RESERVED_TENANTS = frozenset({"*"})  # the shared partition's name when isolation is off
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")


class RequestError(ValueError):
    """A request field is invalid; `field` and `value` say which."""

    def __init__(self, field_name: str, value: object, reason: str) -> None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        super().__init__(f"{field_name}={shown}: {reason}")
        self.field, self.value = field_name, value


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    cache_mode: CacheMode = "auto"
    tenant: str = "default"
    lora: str = ""  # "name:scale,…" as sent; parsed against the adapter library (nirvana.addons.registry)
    controlnet: str = ""  # a ControlNet's name, with control_image (uint8 [H, W, 3]) at controlnet_scale
    control_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    controlnet_scale: float = 1.0


def validate_request(
    config: EngineConfig,
    prompt: str,
    negative_prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    cache_mode: str | None = None,
    tenant: str | None = None,
    lora: str | None = None,
    controlnet: str | None = None,
    control_image: np.ndarray | None = None,
    controlnet_scale: float | None = None,
) -> GenerationRequest:
    """Fill defaults and validate every field; raises RequestError naming the field and value."""
    limits = config.limits
    _check_text("PROMPT", prompt, limits.max_prompt_chars, allow_empty=False)
    negative_prompt = negative_prompt or ""
    _check_text("NEGATIVE_PROMPT", negative_prompt, limits.max_prompt_chars, allow_empty=True)
    seed = 0 if seed is None else int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise RequestError("SEED", seed, f"must be in [0, {SEED_MAX}]")
    steps = config.default_steps if steps is None else int(steps)
    if not 2 <= steps <= limits.max_steps:
        raise RequestError("NUM_INFERENCE_STEPS", steps, f"must be in [2, {limits.max_steps}]")
    guidance = config.default_guidance if guidance is None else float(guidance)
    if not (math.isfinite(guidance) and 1.0 < guidance <= limits.max_guidance):
        raise RequestError("GUIDANCE_SCALE", guidance, f"must be in (1, {limits.max_guidance}]")
    cache_mode = cache_mode or "auto"
    if cache_mode not in CACHE_MODES:
        raise RequestError("CACHE_MODE", cache_mode, f"must be one of {', '.join(CACHE_MODES)}")
    tenant = check_tenant("TENANT", DEFAULT_TENANT if tenant is None else tenant)
    if len(tenant) > limits.max_tenant_chars:
        raise RequestError("TENANT", tenant, f"longer than the limit of {limits.max_tenant_chars} characters")
    lora = lora or ""
    _check_text("LORA", lora, limits.max_prompt_chars, allow_empty=True, allow_newlines=False)
    controlnet = controlnet or ""
    _check_text("CONTROLNET", controlnet, limits.max_tenant_chars, allow_empty=True, allow_newlines=False)
    scale = 1.0 if controlnet_scale is None else float(controlnet_scale)
    if not math.isfinite(scale):  # refused even without a ControlNet: no non-finite value gets past validation
        raise RequestError("CONTROLNET_SCALE", scale, "must be a finite number")
    return GenerationRequest(
        prompt,
        negative_prompt,
        seed,
        steps,
        guidance,
        cache_mode,
        tenant,
        lora,
        controlnet,
        control_image,
        scale,  # type: ignore[arg-type]
    )


def _check_text(name: str, value: object, max_chars: int, allow_empty: bool, allow_newlines: bool = True) -> None:
    if not isinstance(value, str):
        raise RequestError(name, value, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RequestError(name, value, "must not be empty")
    if len(value) > max_chars:
        raise RequestError(name, f"<{len(value)} characters>", f"longer than the limit of {max_chars} characters")
    allowed = "\t\n\r" if allow_newlines else ""
    if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in value):
        raise RequestError(name, value, "contains control characters")


def check_tenant(field_name: str, tenant: str) -> str:
    """`tenant` if it is a usable tenant name; RequestError naming `field_name` otherwise (empty and reserved names
    included: an empty name must not fall into a shared partition)."""
    if tenant in RESERVED_TENANTS:
        raise RequestError(field_name, tenant, "is reserved")
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise RequestError(
            field_name, tenant, "must be 1-128 characters: letters, digits and ._:@/+=- (a letter or digit first)"
        )
    return tenant
