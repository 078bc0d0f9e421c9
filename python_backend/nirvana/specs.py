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

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nirvana.checkpoint import CheckpointInfo

__all__ = [
    "DEFAULT_UNET_MAX_BATCH",
    "EMBEDDER_DIM",
    "MODEL_NAMES",
    "NIRVANA_MODEL",
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
NIRVANA_MODEL = "nirvana"
# all-MiniLM-L6-v2's hidden size: the prompt embedder's output width.
EMBEDDER_DIM = 384
# numpy dtype name ("string" for Triton's BYTES) → Triton config data_type.
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",
}
# Largest UNet batch in rows: eight requests' CFG pairs per execution. TensorRT tunes for UNET_OPT_BATCH rows.
DEFAULT_UNET_MAX_BATCH = 16
UNET_OPT_BATCH = 8
# Typical prompt length in MiniLM word pieces: the shape TensorRT tunes the embedder's kernels for.
_EMBEDDER_OPT_SEQ = 32

Shape = tuple[int, ...]


class SpecError(ValueError):
    """A spec or its arguments are inconsistent; the message names the model, tensor and values."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``dtype`` is a numpy dtype name (or ``"string"``); in ``shape`` ints are fixed, strings
    dynamic axes. ``optional`` inputs may be left out of a request (``optional: true`` in config.pbtxt)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise SpecError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(TRITON_DTYPES)}")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index → axis name for the dynamic axes (the form ``torch.onnx.export`` takes)."""
        return {i: dim for i, dim in enumerate(self.shape) if isinstance(dim, str)}

    def concrete(self, **axes: int) -> Shape:
        """The shape with each dynamic axis replaced by ``axes[name]``, e.g. ``concrete(batch=2)``."""
        missing = sorted(set(self.dynamic_axes.values()) - set(axes))
        if missing:
            raise SpecError(f"tensor {self.name!r} needs sizes for dynamic axes {missing}")
        return tuple(axes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """A model's Triton name, tensors, TensorRT profile ``{input: (min, opt, max)}`` and max_batch_size.

    Models built as engines (the sub-models) need a profile covering every input; the python ``nirvana``
    orchestrator is no engine and has none (``profile=None``)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[Shape, Shape, Shape]] | None
    max_batch_size: int = 0

    def __post_init__(self) -> None:
        names = [t.name for t in self.inputs]
        if self.profile is not None and set(self.profile) != set(names):
            raise SpecError(f"model {self.name!r}: profile covers {sorted(self.profile)}, inputs are {names}")
        for tensor in self.inputs if self.profile is not None else ():
            lo, opt, hi = self.profile[tensor.name]
            for shape in (lo, opt, hi):
                fits = len(shape) == len(tensor.shape) and all(
                    isinstance(d, str) or d == s for d, s in zip(tensor.shape, shape, strict=False)
                )
                if not fits:
                    raise SpecError(f"model {self.name!r}: profile shape {shape} does not fit {tensor.shape}")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise SpecError(f"model {self.name!r}, input {tensor.name!r}: need min ≤ opt ≤ max, got {lo, opt, hi}")
        if self.max_batch_size < 0:
            raise SpecError(f"model {self.name!r}: max_batch_size must be ≥ 0, got {self.max_batch_size}")
        if self.max_batch_size > 0:
            self._check_batched()

    def _check_batched(self) -> None:
        """Under Triton batching every tensor leads with the "batch" axis and the profile stays within it."""
        for tensor in (*self.inputs, *self.outputs):
            if not tensor.shape or tensor.shape[0] != "batch":
                raise SpecError(f"model {self.name!r}: max_batch_size > 0 needs a leading 'batch' axis on {tensor}")
        for name, (_, _, hi) in (self.profile or {}).items():
            if hi[0] > self.max_batch_size:
                raise SpecError(
                    f"model {self.name!r}, input {name!r}: profile max batch {hi[0]} exceeds "
                    f"max_batch_size {self.max_batch_size}"
                )

    def tensor(self, name: str) -> TensorSpec:
        """The input or output tensor called ``name``."""
        for tensor in (*self.inputs, *self.outputs):
            if tensor.name == name:
                return tensor
        raise SpecError(f"model {self.name!r} has no tensor {name!r}")

    def input(self, name: str) -> TensorSpec:
        """The input tensor called ``name``."""
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise SpecError(f"model {self.name!r} has no input {name!r}; inputs: {[t.name for t in self.inputs]}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: name}}`` over inputs and outputs, as ``torch.onnx.export(dynamic_axes=...)`` takes."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def to_dict(self) -> dict:
        """JSON-ready form (tuples become lists), for manifests."""
        return asdict(self)


def triton_dims(tensor: TensorSpec, batched: bool = False) -> list[int]:
    """``dims`` of a config.pbtxt input/output, dynamic axes as -1: the full shape under ``max_batch_size: 0``;
    with ``batched`` (``max_batch_size > 0``) the shape without its leading batch axis, which Triton prepends.

    A batched tensor of shape ``[batch]`` (the UNet's ``timestep``) has no dims left; Triton refuses empty dims,
    so it is ``[1]`` here and the config adds ``reshape: { shape: [] }`` (see :func:`needs_reshape`): clients send
    ``[rows, 1]``, the model receives ``[rows]``."""
    shape = tensor.shape[1:] if batched else tensor.shape
    return [-1 if isinstance(d, str) else int(d) for d in shape] or [1]


def needs_reshape(tensor: TensorSpec, batched: bool) -> bool:
    """Whether the config must reshape ``dims: [1]`` to ``[]``: a batched tensor whose only axis is the batch."""
    return batched and len(tensor.shape) == 1


def _batch_profile(
    shape: tuple[int | str, ...], opt_batch: int, max_batch: int, min_batch: int = 1
) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) for a shape whose only dynamic axis is the leading "batch"."""
    fixed = tuple(int(d) for d in shape[1:])
    return (min_batch, *fixed), (opt_batch, *fixed), (max_batch, *fixed)


def _check_batch(max_batch: int) -> None:
    if max_batch < 1:
        raise SpecError(f"max_batch must be ≥ 1, got {max_batch}")


def text_encoder_spec(seq_len: int, hidden: int, max_batch: int = 2) -> ModelSpec:
    """CLIP text encoder: ``input_ids`` int64 ``[batch, L]`` → ``last_hidden_state`` float32 ``[batch, L, D]``.

    Profile opt batch 2: a request encodes its negative and its prompt in one call (see ``encode_prompts``).
    """
    _check_batch(max_batch)
    ids = TensorSpec("input_ids", "int64", ("batch", seq_len))
    out = TensorSpec("last_hidden_state", "float32", ("batch", seq_len, hidden))
    profile = _batch_profile(ids.shape, min(2, max_batch), max_batch)
    return ModelSpec("text_encoder", (ids,), (out,), {"input_ids": profile})


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
    channels: int, latent_size: tuple[int, int], seq_len: int, hidden: int, max_batch: int = DEFAULT_UNET_MAX_BATCH
) -> ModelSpec:
    """UNet: ``sample`` ``[batch, C, h, w]``, ``timestep`` float32 ``[batch]`` (0..999, one per row),
    ``encoder_hidden_states`` ``[batch, L, D]`` → ``noise_pred`` ``[batch, C, h, w]``, all float32.

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
    opt = min(UNET_OPT_BATCH, max_batch)
    profile = {t.name: _batch_profile(t.shape, opt, max_batch, min_batch=2) for t in (sample, timestep, text)}
    return ModelSpec("unet", (sample, timestep, text), (out,), profile, max_batch_size=max_batch)


def vae_decoder_spec(channels: int, latent_size: tuple[int, int], scale_factor: int, max_batch: int = 2) -> ModelSpec:
    """VAE decoder: ``latent`` ``[batch, C, h, w]`` (already divided by the scaling factor) → ``image``
    ``[batch, 3, h·f, w·f]`` float32 in ≈[-1, 1]. Profile opt batch 1: one image per request."""
    _check_batch(max_batch)
    h, w = latent_size
    latent = TensorSpec("latent", "float32", ("batch", channels, h, w))
    image = TensorSpec("image", "float32", ("batch", 3, h * scale_factor, w * scale_factor))
    return ModelSpec("vae_decoder", (latent,), (image,), {"latent": _batch_profile(latent.shape, 1, max_batch)})


def nirvana_spec(image_size: tuple[int, int]) -> ModelSpec:
    """The ``nirvana`` orchestrator's contract (README, "Triton tensor contract"): every input and output is one
    value of shape [1] except ``IMAGE``, uint8 ``[H, W, 3]``. ``TIMINGS`` is JSON of server-side ms per stage."""
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
    """The four specs for ``checkpoint``, keyed by Triton model name (``MODEL_NAMES`` order).

    ``max_batch`` bounds the explicit batch axis of the text encoder, embedder and VAE; ``unet_max_batch`` is the
    UNet's ``max_batch_size`` in rows (requests merged by Triton's dynamic batcher).

    ``latent_size`` (h, w) overrides the checkpoint's default resolution; spatial axes stay fixed (one engine
    per resolution), since the cache key pins the resolution anyway.
    """
    if checkpoint.family != "sd":
        raise SpecError(
            f"{checkpoint.path}: a {checkpoint.family!r} checkpoint runs in-process (nirvana.pipeline) but has no "
            "Triton repository yet: its second text encoder and added UNet inputs are not in the specs"
        )
    size = latent_size or checkpoint.latent_size
    seq_len, hidden = checkpoint.text_max_length, checkpoint.text_hidden_size
    specs = (
        text_encoder_spec(seq_len, hidden, max_batch),
        prompt_embedder_spec(embedder_seq_len, max_batch),
        unet_spec(checkpoint.latent_channels, size, seq_len, hidden, unet_max_batch),
        # The VAE's own latent width: it differs from the UNet's input channels for inpainting UNets (9 vs 4).
        vae_decoder_spec(checkpoint.vae_latent_channels, size, checkpoint.vae_scale_factor, max_batch),
    )
    return {spec.name: spec for spec in specs}


# The one owner of the cache state: a single-instance python model the `nirvana` instances call through BLS.
CACHE_MODEL = "cache"


def cache_spec() -> ModelSpec:
    """The ``cache`` model's contract (wire format: ``nirvana.runtime.bls_cache``). ``REQUEST`` is JSON
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
