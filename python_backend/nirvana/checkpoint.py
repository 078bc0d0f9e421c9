"""Load a diffusers-format Stable Diffusion folder, fingerprint it, and build a tiny random-weight one for tests.

Layout (what ``StableDiffusionPipeline.save_pretrained`` writes)::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/

Nothing is downloaded: every ``from_pretrained`` call runs with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

__all__ = [
    "COMPONENTS",
    "Checkpoint",
    "CheckpointError",
    "build_clip_tokenizer",
    "clip_text_encoder",
    "fingerprint_checkpoint",
    "load_checkpoint",
    "make_tiny_model",
    "sd15_scheduler_config",
]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Files without which a component cannot load; the tokenizer is checked separately (two accepted layouts).
_REQUIRED_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Hashing a bounded sample of each file keeps fingerprinting a 3.4 GB SD 1.5 folder well under a second.
_SAMPLE_BYTES = 1 << 20


class CheckpointError(ValueError):
    """The checkpoint folder is incomplete or malformed; the message names the folder or file."""


@dataclass
class Checkpoint:
    """A loaded diffusers Stable Diffusion checkpoint (models in eval mode, on CPU)."""

    path: Path
    tokenizer: PreTrainedTokenizerBase
    text_encoder: torch.nn.Module
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    fingerprint: str

    @property
    def latent_channels(self) -> int:
        """Channels C of the latent the UNet denoises (4 for SD 1.x)."""
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> tuple[int, int]:
        """Default latent (h, w) in latent pixels, from ``unet.config.sample_size`` (64×64 for SD 1.5)."""
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along one axis (8 for SD 1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """Default image (H, W) in pixels."""
        h, w = self.latent_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling: the UNet works on ``vae_latent * scaling_factor`` (0.18215 for SD 1.5)."""
        return float(self.vae.config.scaling_factor)

    @property
    def text_max_length(self) -> int:
        """Token sequence length L every prompt is padded/truncated to (77 for CLIP)."""
        return int(self.tokenizer.model_max_length)

    @property
    def text_hidden_size(self) -> int:
        """Width D of the text embeddings ``[B, L, D]`` fed to the UNet's cross-attention."""
        return int(self.text_encoder.config.hidden_size)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint is missing {what}: {path}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(_require(path, path.name).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _component_files(root: Path) -> list[Path]:
    files = [root / "model_index.json"]
    for component in COMPONENTS:
        # Hidden entries (e.g. huggingface_hub's .cache/) hold download metadata, not model content.
        files += sorted(
            p
            for p in (root / component).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    return files


def fingerprint_checkpoint(root: str | Path) -> str:
    """sha256 hex over every file of model_index.json and the five component folders.

    Each file contributes its relative path, its size and the sha256 of its first and last MiB: small files
    (configs, tokenizer) are hashed whole, weight files cheaply but still change when they are retrained.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for file in _component_files(root):
        size = file.stat().st_size
        sample = hashlib.sha256()
        with file.open("rb") as handle:
            sample.update(handle.read(_SAMPLE_BYTES))
            if size > _SAMPLE_BYTES:
                handle.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
                sample.update(handle.read())
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0{sample.hexdigest()}\n".encode())
    return digest.hexdigest()


def _check_layout(root: Path) -> dict:
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder does not exist: {root}")
    index = _read_json(root / "model_index.json")
    for component in COMPONENTS:
        _require(root / component, f"folder '{component}/'")
    for component, name in _REQUIRED_FILES.items():
        _require(root / component / name, f"'{component}/{name}'")
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").exists() and not ((tok / "vocab.json").exists() and (tok / "merges.txt").exists()):
        raise CheckpointError(f"checkpoint is missing 'tokenizer/tokenizer.json' (or vocab.json + merges.txt): {tok}")
    return index


def _load_component(root: Path, component: str, loader, **kwargs):
    try:
        return loader(root / component, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load '{component}/' from {root}: {exc}") from exc


class _ConfigOnly:
    """Stands in for a module when only its config is needed (the BLS model: the weights live in other models)."""

    def __init__(self, config: object) -> None:
        self.config = config

    def eval(self) -> _ConfigOnly:
        return self


def _load_config_only(root: Path, component: str) -> _ConfigOnly:
    if component == "text_encoder":
        return _ConfigOnly(_load_component(root, component, transformers.AutoConfig.from_pretrained))
    return _ConfigOnly(SimpleNamespace(**_read_json(root / component / "config.json")))


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, weights: bool = True) -> Checkpoint:
    """Load a diffusers-format SD folder (tiny test model or a real SD 1.5) with weights in ``dtype``.

    ``weights=False`` loads tokenizer, configs and fingerprint only (the modules are config holders): enough for
    the request path when the sub-models are served elsewhere, without holding a UNet in memory.
    """
    root = Path(path)
    index = _check_layout(root)
    encoder_name = (index.get("text_encoder") or [None, "CLIPTextModel"])[1]
    if encoder_name not in _TEXT_ENCODER_CLASSES:
        raise CheckpointError(
            f"{root / 'model_index.json'}: text_encoder class {encoder_name!r} is not one of {_TEXT_ENCODER_CLASSES}"
        )
    if weights:
        encoder_cls = getattr(transformers, encoder_name)
        text_encoder = _load_component(root, "text_encoder", encoder_cls.from_pretrained, dtype=dtype)
        unet = _load_component(root, "unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype)
        vae = _load_component(root, "vae", AutoencoderKL.from_pretrained, torch_dtype=dtype)
    else:
        text_encoder, unet, vae = (_load_config_only(root, c) for c in ("text_encoder", "unet", "vae"))
    tokenizer = _load_component(root, "tokenizer", CLIPTokenizer.from_pretrained)
    if tokenizer.model_max_length > 10_000:
        # An unset model_max_length (~1e30) would make padding="max_length" allocate forever.
        raise CheckpointError(f"'tokenizer/' in {root} has no model_max_length (CLIP expects 77)")
    for module in (text_encoder, unet, vae):
        module.eval()
    return Checkpoint(
        path=root,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
        fingerprint=fingerprint_checkpoint(root),
    )


# --- tiny random-weight checkpoint ----------------------------------------------------------------------------

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken alphabetically, so deterministic)."""
    corpus = Counter((*w[:-1], w[-1] + "</w>") for w in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in corpus.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in corpus.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    return merges


def build_clip_tokenizer(out_dir: Path, words: list[str], n_merges: int, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer learned from ``words`` (byte vocab, byte+</w> vocab, up to ``n_merges`` learned
    merges, 2 specials), saved under ``out_dir/tokenizer``. Any text still tokenizes (bytes are in the vocab)."""
    chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(words, n_merges)
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # transformers 5 wants merges as tuples; model_max_length must be set or padding="max_length" breaks.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    # save_pretrained writes only tokenizer.json; vocab.json + merges.txt keep the folder loadable by the
    # slow/fast tokenizers of other transformers versions, as in a real SD 1.5 checkpoint.
    tok_dir = out_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tokenizer


def sd15_scheduler_config() -> dict:
    """SD 1.5's scheduler settings."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "epsilon",
    }


def clip_text_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int, intermediate_size: int, heads: int, layers: int = 2
) -> CLIPTextModel:
    """A random-weight CLIP text encoder sized for ``tokenizer`` (vocabulary, special tokens, max length)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            # Without these the pooled output silently comes from position 0.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_modules(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    """Random-weight text encoder (D=32, 2 layers), UNet (32/64 channels, 16×16 latent), VAE (×4 upsampling)."""
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, intermediate_size=37, heads=2)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    return text_encoder, unet, vae


def make_tiny_model(out_dir: str | Path, seed: int = 0, scheduler: str = "ddim") -> Path:
    """Write a random-weight SD checkpoint (16×16×4 latent, 64×64 image, text D=32, L=77) to ``out_dir``.

    ``scheduler`` is a name from ``nirvana.denoise.SCHEDULERS`` or "pndm"/"lms" (not resumable, for tests).
    Loadable by :func:`load_checkpoint` and by ``StableDiffusionPipeline.from_pretrained``. Same seed, same bytes.
    """
    # Imported here: denoise's registry is the source of scheduler names, and it imports nothing from here.
    from nirvana.denoise import SCHEDULERS, UnsupportedSchedulerError, make_scheduler

    out = Path(out_dir)
    if scheduler in SCHEDULERS:
        sched = make_scheduler(scheduler, sd15_scheduler_config())
    elif scheduler in ("pndm", "lms"):
        sched = {"pndm": PNDMScheduler, "lms": LMSDiscreteScheduler}[scheduler](**sd15_scheduler_config())
    else:
        raise UnsupportedSchedulerError(
            f"unknown tiny-model scheduler {scheduler!r}; use one of {[*SCHEDULERS, 'pndm', 'lms']}"
        )
    tokenizer = build_clip_tokenizer(out, _TINY_TEXT.split(), _TINY_MERGES)
    torch.manual_seed(seed)
    text_encoder, unet, vae = _tiny_modules(tokenizer)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
