"""Tensor contracts of served ControlNets: a ``controlnet_<name>`` model per ControlNet, and ``unet_control``, the
UNet with the residual inputs a ControlNet feeds it (`nirvana.runtime.bls_control` calls both at every step).

A ControlNet answers one residual per UNet skip connection (``down_residual_<i>``) and one for the mid block
(``mid_residual``); their shapes follow from the UNet's config (:func:`residual_shapes`). Both models batch across
requests like the ``unet`` (``max_batch_size`` rows, dynamic batching): the conditioning scale comes per row
(``conditioning_scale`` ``[batch]``), so requests at different scales, with different control images, share an
execution. SD 1.x/2.x only: an SDXL ControlNet takes SDXL's added conditioning too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from nirvana.contract.specs import UNET_OPT_BATCH, ModelSpec, SpecError, TensorSpec, unet_spec

if TYPE_CHECKING:
    from nirvana.checkpoint import CheckpointInfo

__all__ = [
    "MID_RESIDUAL",
    "UNET_CONTROL_MODEL",
    "control_specs",
    "controlnet_model",
    "controlnet_spec",
    "residual_names",
    "residual_shapes",
    "unet_control_spec",
]

UNET_CONTROL_MODEL = "unet_control"
CONTROLNET_PREFIX = "controlnet_"
MID_RESIDUAL = "mid_residual"
# A ControlNet's folder name becomes part of a Triton model name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def controlnet_model(name: str) -> str:
    """The Triton model that serves ControlNet ``name`` (its folder's name)."""
    if not _NAME.fullmatch(name):
        raise SpecError(f"controlnet folder name {name!r}: use letters, digits, '_' and '-' (it names a Triton model)")
    return CONTROLNET_PREFIX + name


def residual_shapes(unet_config: Mapping[str, Any], latent_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """``(channels, h, w)`` of every down-block residual, then the mid block's, for a UNet of ``unet_config``: the
    input convolution's output, each resnet's output per down block, and each downsampler's (stride 2, ⌈h/2⌉)."""
    channels = [int(c) for c in unet_config["block_out_channels"]]
    layers = unet_config["layers_per_block"]
    per_block = [int(layers)] * len(channels) if isinstance(layers, int) else [int(n) for n in layers]
    h, w = latent_size
    shapes = [(channels[0], h, w)]
    for index, (width, count) in enumerate(zip(channels, per_block, strict=True)):
        shapes += [(width, h, w)] * count
        if index < len(channels) - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            shapes.append((width, h, w))
    return [*shapes, (channels[-1], h, w)]


def residual_names(count: int) -> list[str]:
    """Input/output names of ``count`` residuals: ``down_residual_0 … down_residual_{count-2}``, ``mid_residual``."""
    return [f"down_residual_{i}" for i in range(count - 1)] + [MID_RESIDUAL]


def _residual_tensors(shapes: Iterable[tuple[int, int, int]]) -> tuple[TensorSpec, ...]:
    shapes = list(shapes)
    names = residual_names(len(shapes))
    return tuple(TensorSpec(name, "float32", ("batch", *shape)) for name, shape in zip(names, shapes, strict=True))


def _batched(name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], max_batch: int) -> ModelSpec:
    """A spec batched like the ``unet``'s: profile min 2 rows (one guidance pair), opt 8, max ``max_batch``."""
    opt = min(UNET_OPT_BATCH, max_batch)
    profile = {}
    for tensor in inputs:
        fixed = tuple(int(d) for d in tensor.shape[1:])
        profile[tensor.name] = ((2, *fixed), (opt, *fixed), (max_batch, *fixed))
    return ModelSpec(name, inputs, outputs, profile, max_batch_size=max_batch)


def unet_control_spec(base: ModelSpec, shapes: list[tuple[int, int, int]]) -> ModelSpec:
    """The ``unet`` spec ``base`` with one input per ControlNet residual, as model ``unet_control``."""
    return _batched(UNET_CONTROL_MODEL, (*base.inputs, *_residual_tensors(shapes)), base.outputs, base.max_batch_size)


def controlnet_spec(
    name: str, base: ModelSpec, image_size: tuple[int, int], shapes: list[tuple[int, int, int]]
) -> ModelSpec:
    """ControlNet ``name``: the UNet's ``sample``, ``timestep`` and ``encoder_hidden_states``, plus
    ``controlnet_cond`` float32 ``[batch, 3, H, W]`` (the control image in [0, 1], as diffusers prepares it) and
    ``conditioning_scale`` float32 ``[batch]`` → the residuals, already multiplied by the row's scale."""
    height, width = image_size
    inputs = (
        *base.inputs,
        TensorSpec("controlnet_cond", "float32", ("batch", 3, height, width)),
        TensorSpec("conditioning_scale", "float32", ("batch",)),
    )
    return _batched(controlnet_model(name), inputs, _residual_tensors(shapes), base.max_batch_size)


def control_specs(checkpoint: CheckpointInfo, names: Iterable[str], unet_max_batch: int) -> dict[str, ModelSpec]:
    """``unet_control`` and a ``controlnet_<name>`` spec per ControlNet, keyed by model name."""
    if checkpoint.family == "sdxl":
        raise SpecError("served ControlNets support SD 1.x/2.x checkpoints; an SDXL ControlNet is not served yet")
    size = checkpoint.latent_size
    base = unet_spec(
        checkpoint.latent_channels, size, checkpoint.text_max_length, checkpoint.text_hidden_size, unet_max_batch
    )
    shapes = residual_shapes(checkpoint.unet_config, size)
    specs = {UNET_CONTROL_MODEL: unet_control_spec(base, shapes)}
    for name in names:
        spec = controlnet_spec(name, base, checkpoint.image_size, shapes)
        specs[spec.name] = spec
    return specs
