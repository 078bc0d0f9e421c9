"""Random-weight transformer (DiT, flow-matching) checkpoints: SD 3.x (``StableDiffusion3Pipeline``) and FLUX.1
(``FluxPipeline``), tiny for tests and at full size for GPU timings.

The folders are what ``save_pretrained`` writes for the real models (``transformer/``, ``vae/``, ``text_encoder*/``,
``tokenizer*/``, ``scheduler/``): the product loads them through the path a downloaded folder takes. The T5 tokenizer
is a unigram vocabulary of whole words and single characters, made offline without training (the unigram trainer
is not deterministic from run to run): same seed, same bytes.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import SentencePieceUnigramTokenizer
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from nirvana_dev.tiny_model import clip_config

__all__ = ["DIT_ARCHITECTURES", "TRANSFORMERS", "t5_tokenizer"]

# SD 3's VAE (16 channels) and FLUX.1's: their latent scaling and shift, from the released vae/config.json files.
_VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
# The transformers, by architecture: what differs from diffusers' defaults (for SD 3.5 Medium and FLUX.1 dev, their
# released transformer/config.json). `export/gpu_dit_timing.py` times these same ones.
TRANSFORMERS: dict[str, dict] = {
    "tiny-sd3": dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    ),
    "sd35m": dict(
        sample_size=128,
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "tiny-flux": dict(
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "flux1": dict(guidance_embeds=True),
}


def t5_tokenizer(words: list[str], max_length: int) -> T5TokenizerFast:
    """A T5-format unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁word`` pieces): each listed word is one
    piece, anything else falls back to single characters, so every text still tokenizes."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [(w, 0.0) for w in _T5_SPECIALS]
    pieces += [("▁" + w, -5.0) for w in dict.fromkeys(words)]
    pieces += [("▁", -8.0)] + [(c, -10.0) for c in chars + string.ascii_uppercase]
    backend = SentencePieceUnigramTokenizer(vocab=pieces)
    return T5TokenizerFast(
        tokenizer_object=backend._tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def _clip(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int, ff: int, act: str, projection: bool = True):
    """CLIP-L/G as SD 3 ships them (with the projection its pooled vector comes from); FLUX's CLIP-L has none."""
    config = clip_config(tokenizer, hidden, ff, heads, layers, act, projection_dim=hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(tokenizer: T5TokenizerFast, d_model: int, layers: int, heads: int, d_ff: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD 3 and FLUX ship it
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def _vae(family: str, block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int) -> AutoencoderKL:
    blocks = len(block_out_channels)
    scaling, shift = _VAE_SCALING[family]
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=layers_per_block,
        latent_channels=16,
        sample_size=sample_size,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@dataclass(frozen=True)
class DitArchitecture:
    """One random-weight DiT checkpoint: its family ("sd3" or "flux"), how to build its pipeline from the two
    tokenizers, its default image size and the T5 sequence length it is served with."""

    family: str
    build: Callable[[CLIPTokenizer, T5TokenizerFast], DiffusionPipeline]
    image_size: int
    max_sequence_length: int


def _sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3 / 3.5's static shift


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1 dev's: the shift grows with the image's token count (mu from base/max_shift).
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _tiny_sd3(clip: CLIPTokenizer, t5: T5TokenizerFast) -> DiffusionPipeline:
    """SD 3's layout at toy size: CLIP-L and CLIP-G with projections (32 each, so the pooled vector is 64), a T5 of
    width 64, a 2-layer MMDiT over a 16×16×16 latent in 2×2 patches, a VAE with ×4 upsampling (64×64 images)."""
    text_encoder = _clip(clip, 32, 2, 2, 37, "quick_gelu")
    text_encoder_2 = _clip(clip, 32, 2, 2, 37, "gelu")
    transformer = SD3Transformer2DModel(**TRANSFORMERS["tiny-sd3"])
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_sd3_scheduler(),
        vae=_vae("sd3", (32, 64, 64), 1, 64),
        text_encoder=text_encoder,
        tokenizer=clip,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip,  # one vocabulary for both: enough for a random-weight model
        text_encoder_3=_t5(t5, 64, 2, 4, 96),
        tokenizer_3=t5,
    )


def _sd35_medium(clip: CLIPTokenizer, t5: T5TokenizerFast) -> DiffusionPipeline:
    """Random weights in SD 3.5 Medium's architecture (1024×1024, 128×128×16 latent): CLIP-L (768, 12 layers),
    OpenCLIP bigG (1280, 32 layers), T5-XXL (4096, 24 layers), the MMDiT-X (24 layers, 24 heads of 64, dual
    attention in layers 0–12, RMS qk-norm) and the 16-channel VAE. For GPU timings."""
    transformer = SD3Transformer2DModel(**TRANSFORMERS["sd35m"])
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_sd3_scheduler(),
        vae=_vae("sd3", (128, 256, 512, 512), 2, 1024),
        text_encoder=_clip(clip, 768, 12, 12, 3072, "quick_gelu"),
        tokenizer=clip,
        text_encoder_2=_clip(clip, 1280, 32, 20, 5120, "gelu"),
        tokenizer_2=clip,
        text_encoder_3=_t5(t5, 4096, 24, 64, 10240),
        tokenizer_3=t5,
    )


def _tiny_flux(clip: CLIPTokenizer, t5: T5TokenizerFast) -> DiffusionPipeline:
    """FLUX.1 dev's layout at toy size: CLIP-L (32), T5 of width 64, one double and one single stream block with
    2 heads of 16 (RoPE axes 4+6+6), guidance embedding, a 16-channel VAE with ×4 upsampling (64×64 images)."""
    transformer = FluxTransformer2DModel(**TRANSFORMERS["tiny-flux"])
    text_encoder = _clip(clip, 32, 2, 2, 37, "quick_gelu", projection=False)
    return FluxPipeline(
        transformer=transformer,
        scheduler=_flux_scheduler(),
        vae=_vae("flux", (32, 64, 64), 1, 64),
        text_encoder=text_encoder,
        tokenizer=clip,
        text_encoder_2=_t5(t5, 64, 2, 4, 96),
        tokenizer_2=t5,
    )


def _flux1_dev(clip: CLIPTokenizer, t5: T5TokenizerFast) -> DiffusionPipeline:
    """Random weights in FLUX.1 dev's architecture (1024×1024): 19 double and 38 single stream blocks, 24 heads of
    128, guidance embedding, CLIP-L and T5-XXL, the 16-channel VAE. 12B parameters in the transformer: GPU only."""
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**TRANSFORMERS["flux1"]),
        scheduler=_flux_scheduler(),
        vae=_vae("flux", (128, 256, 512, 512), 2, 1024),
        text_encoder=_clip(clip, 768, 12, 12, 3072, "quick_gelu", projection=False),
        tokenizer=clip,
        text_encoder_2=_t5(t5, 4096, 24, 64, 10240),
        tokenizer_2=t5,
    )


DIT_ARCHITECTURES = {
    "tiny-sd3": DitArchitecture("sd3", _tiny_sd3, 64, 32),
    "sd35m": DitArchitecture("sd3", _sd35_medium, 1024, 256),
    "tiny-flux": DitArchitecture("flux", _tiny_flux, 64, 32),
    "flux1": DitArchitecture("flux", _flux1_dev, 1024, 512),
}


def build_dit_pipeline(
    architecture: str, clip: CLIPTokenizer, words: list[str], seed: int
) -> tuple[DitArchitecture, DiffusionPipeline]:
    """The pipeline of ``architecture`` with random weights drawn from ``seed``, and its settings."""
    arch = DIT_ARCHITECTURES[architecture]
    t5 = t5_tokenizer(words, arch.max_sequence_length)
    torch.manual_seed(seed)
    return arch, arch.build(clip, t5)
