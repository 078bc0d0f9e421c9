"""Tensor contracts of the transformer families' (SD 3.x, FLUX.1) Triton models.

The transformer is served under the denoiser's model name, ``unet``, so the step scheduler, the batcher and the
repository treat it as they treat a UNet: ``sample [rows, C, h, w]`` (the VAE's 16 channels), ``timestep [rows]``
(the scheduler's, 0..1000), ``encoder_hidden_states [rows, T, D]`` and ``pooled_projections [rows, P]`` (FLUX.1 dev:
also ``guidance [rows]``) → ``noise_pred`` (the velocity). FLUX's 2×2 packing happens inside the model, so the latent
has one layout for every family. The text encoders are one model each:

- SD 3: ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (CLIP-G) answer ``penultimate_hidden_state`` and their
  projection ``text_embeds``; ``text_encoder_3`` (T5) answers ``last_hidden_state`` ``[b, T, 4096]``.
- FLUX: ``text_encoder`` (CLIP-L) answers ``text_embeds`` (its pooled output); ``text_encoder_2`` (T5) answers
  ``last_hidden_state``.

The orchestrator assembles what the transformer attends to (`nirvana.dit.modules.combine_sd3`), as the pipelines do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirvana.contract.specs import (
    DEFAULT_UNET_MAX_BATCH,
    PENULTIMATE,
    UNET_OPT_BATCH,
    ModelSpec,
    SpecError,
    TensorSpec,
    prompt_embedder_spec,
    vae_decoder_spec,
)

if TYPE_CHECKING:
    from nirvana.checkpoint.dit import DitCheckpointInfo

__all__ = ["DIT_MODEL_NAMES", "dit_specs", "transformer_spec"]

DIT_MODEL_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "prompt_embedder", "unet", "vae_decoder")
LAST = "last_hidden_state"


def _encoder(name: str, seq: int, outputs: tuple[tuple[str, tuple[int, ...]], ...], max_batch: int) -> ModelSpec:
    ids = TensorSpec("input_ids", "int64", ("batch", seq))
    tensors = tuple(TensorSpec(out, "float32", ("batch", *shape)) for out, shape in outputs)
    profile = ((1, seq), (min(2, max_batch), seq), (max_batch, seq))
    return ModelSpec(name, (ids,), tensors, {"input_ids": profile})


def transformer_spec(
    channels: int, latent_size: tuple[int, int], seq: int, hidden: int, pooled: int, guidance: bool, max_batch: int
) -> ModelSpec:
    """The transformer under the name ``unet`` (see the module docstring); batched across requests like the UNet."""
    if max_batch < 2:
        raise SpecError(f"unet max_batch must be ≥ 2, got {max_batch}")
    h, w = latent_size
    inputs = (
        TensorSpec("sample", "float32", ("batch", channels, h, w)),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", seq, hidden)),
        TensorSpec("pooled_projections", "float32", ("batch", pooled)),
    )
    if guidance:
        inputs += (TensorSpec("guidance", "float32", ("batch",)),)
    out = TensorSpec("noise_pred", "float32", ("batch", channels, h, w))
    opt = min(UNET_OPT_BATCH, max_batch)
    profile = {t.name: ((1, *t.shape[1:]), (opt, *t.shape[1:]), (max_batch, *t.shape[1:])) for t in inputs}
    return ModelSpec("unet", inputs, (out,), profile, max_batch_size=max_batch)


def dit_specs(
    checkpoint: DitCheckpointInfo, max_batch: int = 2, unet_max_batch: int = DEFAULT_UNET_MAX_BATCH
) -> dict[str, ModelSpec]:
    """The specs of an SD 3.x or FLUX.1 checkpoint, keyed by Triton model name (`DIT_MODEL_NAMES` order)."""
    configs, clip_len = checkpoint.text_encoder_configs, checkpoint.text_max_length
    t5_len = checkpoint.max_sequence_length
    width = {name: int(getattr(config, "hidden_size", None) or config.d_model) for name, config in configs.items()}
    if checkpoint.family == "flux":
        encoders = (
            _encoder("text_encoder", clip_len, (("text_embeds", (width["text_encoder"],)),), max_batch),
            _encoder("text_encoder_2", t5_len, ((LAST, (t5_len, width["text_encoder_2"])),), max_batch),
        )
        seq = t5_len
    else:
        clips = tuple(
            _encoder(
                name,
                clip_len,
                ((PENULTIMATE, (clip_len, width[name])), ("text_embeds", (int(configs[name].projection_dim),))),
                max_batch,
            )
            for name in ("text_encoder", "text_encoder_2")
        )
        encoders = (*clips, _encoder("text_encoder_3", t5_len, ((LAST, (t5_len, width["text_encoder_3"])),), max_batch))
        seq = clip_len + t5_len
    guidance = bool(checkpoint.unet_config.get("guidance_embeds", False))
    size = checkpoint.latent_size
    specs = (
        *encoders,
        prompt_embedder_spec(128, max_batch),
        transformer_spec(
            checkpoint.latent_channels,
            size,
            seq,
            checkpoint.text_hidden_size,
            checkpoint.pooled_size,
            guidance,
            unet_max_batch,
        ),
        vae_decoder_spec(checkpoint.vae_latent_channels, size, checkpoint.vae_scale_factor, max_batch),
    )
    return {spec.name: spec for spec in specs}
