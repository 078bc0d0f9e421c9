"""Tensor contracts of every Triton model: the single source of truth for export, engines and Triton configs.

The four sub-models (text encoder, prompt embedder, UNet, VAE decoder) and the ``nirvana`` orchestrator each have
one :class:`ModelSpec`. Every name here goes into a ``config.pbtxt``; the ONNX export, the TensorRT profile, the
Triton config and the BLS glue are all derived from (or checked against) these specs, never written by hand.

Batching decision. The ``unet`` batches across requests: ``max_batch_size`` is its largest batch in *rows*
(default 16 = eight requests' classifier-free-guidance pairs ``[uncond, cond]``), its Triton ``dims`` leave the
batch axis out (Triton prepends it), and Triton's dynamic batcher merges the pairs of concurrent requests into one
execution (each row carries its own timestep, so requests at different steps share a call). Rows stay independent
in the graph; merged rows equal the rows run alone up to summation order (0 difference measured with onnxruntime on
CPU; TensorRT picks kernels per shape, so expect fp16 rounding-level differences on GPU — a cache hit is
approximate by design, and a request is no longer bit-reproducible across different loads there).
The other sub-models keep ``max_batch_size = 0`` and an **explicit** batch axis: the BLS model sends them one
request's prompts or latent, and their calls are not on the per-step hot path. A Triton config lists the
full shapes under ``max_batch_size: 0`` and the shapes without the batch axis otherwise (see :func:`triton_dims`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirvana.contract.tensors import (
    TRITON_DTYPES,
    ModelSpec,
    Shape,
    SpecError,
    TensorSpec,
    needs_reshape,
    triton_dims,
)
from nirvana.families import DIT

if TYPE_CHECKING:
    from nirvana.checkpoint import CheckpointInfo

__all__ = [
    "DEFAULT_UNET_MAX_BATCH",
    "EMBEDDER_DIM",
    "MODEL_NAMES",
    "NIRVANA_MODEL",
    "SDXL_MODEL_NAMES",
    "TRITON_DTYPES",
    "ModelSpec",
    "SpecError",
    "TensorSpec",
    "needs_reshape",
    "nirvana_spec",
    "prompt_embedder_spec",
    "submodel_specs",
    "text_encoder_spec",
    "triton_dims",
    "unet_spec",
    "vae_decoder_spec",
]

MODEL_NAMES = ("text_encoder", "prompt_embedder", "unet", "vae_decoder")
# SDXL serves its second text encoder too; every name a repository may hold (stale ones are removed by it).
SDXL_MODEL_NAMES = ("text_encoder", "text_encoder_2", "prompt_embedder", "unet", "vae_decoder")
# SDXL: the text encoders hand over their penultimate hidden state (what SDXL conditions on), not the last.
PENULTIMATE = "penultimate_hidden_state"
# SDXL's added UNet conditioning: six micro-conditioning numbers per row (nirvana.sdxl.micro_conditioning).
TIME_IDS = 6
NIRVANA_MODEL = "nirvana"
# all-MiniLM-L6-v2's hidden size: the prompt embedder's output width.
EMBEDDER_DIM = 384
# Largest UNet batch in rows: eight requests' CFG pairs per execution. TensorRT tunes for UNET_OPT_BATCH rows.
DEFAULT_UNET_MAX_BATCH = 16
UNET_OPT_BATCH = 8
# Typical prompt length in MiniLM word pieces: the shape TensorRT tunes the embedder's kernels for.
_EMBEDDER_OPT_SEQ = 32


def _batch_profile(
    shape: tuple[int | str, ...], opt_batch: int, max_batch: int, min_batch: int = 1
) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) for a shape whose only dynamic axis is the leading "batch"."""
    fixed = tuple(int(d) for d in shape[1:])
    return (min_batch, *fixed), (opt_batch, *fixed), (max_batch, *fixed)


def _check_batch(max_batch: int) -> None:
    if max_batch < 1:
        raise SpecError(f"max_batch must be ≥ 1, got {max_batch}")


def text_encoder_spec(
    seq_len: int,
    hidden: int,
    max_batch: int = 2,
    *,
    name: str = "text_encoder",
    hidden_output: str = "last_hidden_state",
    pooled_dim: int | None = None,
) -> ModelSpec:
    """CLIP text encoder: ``input_ids`` int64 ``[batch, L]`` → ``last_hidden_state`` float32 ``[batch, L, D]``.

    SDXL's encoders answer with ``penultimate_hidden_state`` instead, and its second (``pooled_dim``) also with
    ``text_embeds`` ``[batch, P]``, its pooled projection. Profile opt batch 2: a request encodes its negative and
    its prompt in one call (see ``encode_prompts``).
    """
    _check_batch(max_batch)
    ids = TensorSpec("input_ids", "int64", ("batch", seq_len))
    outputs = (TensorSpec(hidden_output, "float32", ("batch", seq_len, hidden)),)
    if pooled_dim is not None:
        outputs += (TensorSpec("text_embeds", "float32", ("batch", pooled_dim)),)
    profile = _batch_profile(ids.shape, min(2, max_batch), max_batch)
    return ModelSpec(name, (ids,), outputs, {"input_ids": profile})


def prompt_embedder_spec(max_seq_len: int = 128, max_batch: int = 2) -> ModelSpec:
    """MiniLM with mean pooling + L2 norm in the graph: ids and mask int64 ``[batch, sequence]`` → ``embedding``
    float32 ``[batch, 384]`` of unit norm. ``sequence`` is the longest prompt in word pieces, ≤ ``max_seq_len``."""
    _check_batch(max_batch)
    if max_seq_len < 1:
        raise SpecError(f"embedder_seq_len must be ≥ 1, got {max_seq_len}")
    ids = TensorSpec("input_ids", "int64", ("batch", "sequence"))
    mask = TensorSpec("attention_mask", "int64", ("batch", "sequence"))
    out = TensorSpec("embedding", "float32", ("batch", EMBEDDER_DIM))
    opt_seq = min(_EMBEDDER_OPT_SEQ, max_seq_len)
    seq_profile = ((1, 1), (1, opt_seq), (max_batch, max_seq_len))
    return ModelSpec("prompt_embedder", (ids, mask), (out,), {"input_ids": seq_profile, "attention_mask": seq_profile})


def unet_spec(
    channels: int,
    latent_size: tuple[int, int],
    seq_len: int,
    hidden: int,
    max_batch: int = DEFAULT_UNET_MAX_BATCH,
    pooled_dim: int | None = None,
) -> ModelSpec:
    """UNet: ``sample`` ``[batch, C, h, w]``, ``timestep`` float32 ``[batch]`` (0..999, one per row),
    ``encoder_hidden_states`` ``[batch, L, D]`` → ``noise_pred`` ``[batch, C, h, w]``, all float32. SDXL
    (``pooled_dim``) adds ``text_embeds`` ``[batch, P]`` and ``time_ids`` ``[batch, 6]``, per row like the text.

    Batched across requests (``max_batch_size = max_batch`` rows, see the module docstring). Profile: min 2 rows
    (one request's CFG pair), opt ``min(8, max_batch)`` (four requests merged), max ``max_batch``.
    """
    if max_batch < 2:
        raise SpecError(f"unet max_batch must be ≥ 2 (one request's guidance pair), got {max_batch}")
    h, w = latent_size
    sample = TensorSpec("sample", "float32", ("batch", channels, h, w))
    timestep = TensorSpec("timestep", "float32", ("batch",))
    text = TensorSpec("encoder_hidden_states", "float32", ("batch", seq_len, hidden))
    out = TensorSpec("noise_pred", "float32", ("batch", channels, h, w))
    inputs = (sample, timestep, text)
    if pooled_dim is not None:
        inputs += (
            TensorSpec("text_embeds", "float32", ("batch", pooled_dim)),
            TensorSpec("time_ids", "float32", ("batch", TIME_IDS)),
        )
    opt = min(UNET_OPT_BATCH, max_batch)
    profile = {t.name: _batch_profile(t.shape, opt, max_batch, min_batch=2) for t in inputs}
    return ModelSpec("unet", inputs, (out,), profile, max_batch_size=max_batch)


def vae_decoder_spec(channels: int, latent_size: tuple[int, int], scale_factor: int, max_batch: int = 2) -> ModelSpec:
    """VAE decoder: ``latent`` ``[batch, C, h, w]`` (already divided by the scaling factor) → ``image``
    ``[batch, 3, h·f, w·f]`` float32 in ≈[-1, 1]. Profile opt batch 1: one image per request."""
    _check_batch(max_batch)
    h, w = latent_size
    latent = TensorSpec("latent", "float32", ("batch", channels, h, w))
    image = TensorSpec("image", "float32", ("batch", 3, h * scale_factor, w * scale_factor))
    return ModelSpec("vae_decoder", (latent,), (image,), {"latent": _batch_profile(latent.shape, 1, max_batch)})


def nirvana_spec(image_size: tuple[int, int]) -> ModelSpec:
    """The ``nirvana`` orchestrator's contract (docs/serving.md, "Triton tensor contract"): every input and output is
    one value of shape [1] except ``IMAGE`` and ``CONTROL_IMAGE``, uint8 ``[H, W, 3]``. ``TIMINGS`` is JSON of
    server-side ms per stage."""
    h, w = image_size
    one = (1,)
    inputs = (
        TensorSpec("PROMPT", "string", one),
        TensorSpec("NEGATIVE_PROMPT", "string", one, optional=True),
        TensorSpec("SEED", "int64", one, optional=True),
        TensorSpec("NUM_INFERENCE_STEPS", "int32", one, optional=True),
        TensorSpec("GUIDANCE_SCALE", "float32", one, optional=True),
        TensorSpec("CACHE_MODE", "string", one, optional=True),
        TensorSpec("TENANT", "string", one, optional=True),
        TensorSpec("LORA", "string", one, optional=True),
        TensorSpec("CONTROLNET", "string", one, optional=True),
        TensorSpec("CONTROL_IMAGE", "uint8", (h, w, 3), optional=True),
        TensorSpec("CONTROLNET_SCALE", "float32", one, optional=True),
    )
    outputs = (
        TensorSpec("IMAGE", "uint8", (h, w, 3)),
        TensorSpec("CACHE_HIT", "bool", one),
        TensorSpec("SKIPPED_STEPS", "int32", one),
        TensorSpec("SIMILARITY", "float32", one),
        TensorSpec("TIMINGS", "string", one),
    )
    return ModelSpec(NIRVANA_MODEL, inputs, outputs, profile=None)


def submodel_specs(
    checkpoint: CheckpointInfo,
    max_batch: int = 2,
    embedder_seq_len: int = 128,
    *,
    latent_size: tuple[int, int] | None = None,
    unet_max_batch: int = DEFAULT_UNET_MAX_BATCH,
) -> dict[str, ModelSpec]:
    """The specs for ``checkpoint``, keyed by Triton model name: ``MODEL_NAMES`` order, ``SDXL_MODEL_NAMES`` for an
    SDXL checkpoint (its second text encoder, the penultimate hidden states, the UNet's added inputs).

    ``max_batch`` bounds the explicit batch axis of the text encoder, embedder and VAE; ``unet_max_batch`` is the
    UNet's ``max_batch_size`` in rows (requests merged by Triton's dynamic batcher).

    ``latent_size`` (h, w) overrides the checkpoint's default resolution; spatial axes stay fixed (one engine
    per resolution), since the cache key pins the resolution anyway. SD 3 and FLUX (`nirvana.contract.dit`) take
    theirs from the checkpoint's ``nirvana.json`` only.
    """
    if checkpoint.family in DIT:  # the transformer families' own models (`nirvana.contract.dit`)
        from nirvana.contract.dit import dit_specs

        return dit_specs(checkpoint, max_batch, unet_max_batch)  # type: ignore[arg-type]
    size = latent_size or checkpoint.latent_size
    seq_len, hidden = checkpoint.text_max_length, checkpoint.text_hidden_size
    second = checkpoint.text_encoder_2_config  # SDXL only
    pooled = None if second is None else int(second.projection_dim)
    if second is None:
        encoders = (text_encoder_spec(seq_len, hidden, max_batch),)
    else:
        width_1 = int(checkpoint.text_encoder_config.hidden_size)
        encoders = (
            text_encoder_spec(seq_len, width_1, max_batch, hidden_output=PENULTIMATE),
            text_encoder_spec(
                seq_len,
                int(second.hidden_size),
                max_batch,
                name="text_encoder_2",
                hidden_output=PENULTIMATE,
                pooled_dim=pooled,
            ),
        )
    specs = (
        *encoders,
        prompt_embedder_spec(embedder_seq_len, max_batch),
        unet_spec(checkpoint.latent_channels, size, seq_len, hidden, unet_max_batch, pooled),
        # The VAE's own latent width: it differs from the UNet's input channels for inpainting UNets (9 vs 4).
        vae_decoder_spec(checkpoint.vae_latent_channels, size, checkpoint.vae_scale_factor, max_batch),
    )
    return {spec.name: spec for spec in specs}


# The one owner of the cache state: a single-instance python model the `nirvana` instances call through BLS.
CACHE_MODEL = "cache"


def cache_spec() -> ModelSpec:
    """The ``cache`` model's contract (wire format: ``nirvana.cache.wire``). ``REQUEST`` is JSON
    (``{"op": "lookup" | "admit", ...}``), ``VECTOR`` the prompt embedding float32 ``[dim]``, ``STATES`` (admit only)
    one safetensors blob of the latents to admit; ``RESPONSE`` is JSON, ``STATE`` the hit's resume arrays as one
    safetensors blob (empty on a miss)."""
    one = (1,)
    inputs = (
        TensorSpec("REQUEST", "string", one),
        TensorSpec("VECTOR", "float32", ("dim",)),
        TensorSpec("STATES", "string", one, optional=True),
    )
    outputs = (TensorSpec("RESPONSE", "string", one), TensorSpec("STATE", "string", one))
    return ModelSpec(CACHE_MODEL, inputs, outputs, profile=None)


STEP_SCHEDULER_MODEL = "step_scheduler"


def step_scheduler_spec() -> ModelSpec:
    """The decoupled ``step_scheduler`` model's contract (wire format: ``nirvana.handoff``): ``JOB`` is JSON
    (``{"op": "denoise" | "cancel", "id": ...}``), ``TENSORS`` one safetensors blob of the job's tensors; each answer
    is an ``EVENT`` (JSON: a step, or the final one) with its ``TENSORS``."""
    one = (1,)
    inputs = (TensorSpec("JOB", "string", one), TensorSpec("TENSORS", "string", one, optional=True))
    outputs = (TensorSpec("EVENT", "string", one), TensorSpec("TENSORS", "string", one))
    return ModelSpec(STEP_SCHEDULER_MODEL, inputs, outputs, profile=None)


ADAPTERS_MODEL = "adapters"


def adapters_spec() -> ModelSpec:
    """The decoupled ``adapters`` model's contract (`nirvana.serving.adapter_model`): ``ADAPTERS`` is an adapter set's
    canonical ``LORA`` text, ``BASE`` the UNet model to fuse it into (``unet``, the default, or ``unet_control``
    with a ControlNet), ``MODEL`` the name of the model that has it fused in."""
    one = (1,)
    inputs = (TensorSpec("ADAPTERS", "string", one), TensorSpec("BASE", "string", one, optional=True))
    return ModelSpec(ADAPTERS_MODEL, inputs, (TensorSpec("MODEL", "string", one),), profile=None)
