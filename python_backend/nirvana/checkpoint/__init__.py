"""Load a diffusers-format Stable Diffusion folder: its configuration alone, or with its weights; fingerprint it.

Layout (what ``StableDiffusionPipeline.save_pretrained`` writes; SD 1.x and 2.x, epsilon or v-prediction)::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/

and for SDXL (``StableDiffusionXLPipeline``) also ``text_encoder_2/  tokenizer_2/``.

Nothing is downloaded: every ``from_pretrained`` call runs with ``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from transformers import CLIPTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from nirvana.families import DIT, FAMILIES, CheckpointError, model_family
from nirvana.fingerprint import fingerprint_checkpoint

__all__ = [
    "COMPONENTS",
    "FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "fingerprint_checkpoint",
    "load_checkpoint",
    "load_checkpoint_info",
]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# SDXL's second text encoder (with projection: its pooled text_embeds condition the UNet) and its tokenizer.
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
# Files without which a component cannot load; the tokenizer is checked separately (two accepted layouts).
_REQUIRED_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint folder says without its weights: tokenizer, component configs, geometry, fingerprint.

    Enough for the request path when the sub-models run elsewhere (the BLS model) and for the tensor specs.
    The component configs hold every constructor argument, defaults included, like a loaded module's ``config``.
    """

    path: Path
    tokenizer: PreTrainedTokenizerBase
    text_encoder_config: PretrainedConfig
    unet_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    scheduler_config: dict
    fingerprint: str
    family: str  # "sd" (SD 1.x and 2.x), "sdxl", "sd3" or "flux" (`nirvana.families`), from model_index.json
    # SDXL only: the second tokenizer and text encoder, and whether an empty negative prompt is all zeros.
    tokenizer_2: PreTrainedTokenizerBase | None = None
    text_encoder_2_config: PretrainedConfig | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" (SD 1.x, SD 2.x base) or "v_prediction" (SD 2.x at 768 px)."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def latent_channels(self) -> int:
        """Channels C of the latent the UNet denoises (4 for SD 1.x)."""
        return int(self.unet_config["in_channels"])

    @property
    def vae_latent_channels(self) -> int:
        """Channels of the latent the VAE decodes; differs from :attr:`latent_channels` for inpainting UNets."""
        return int(self.vae_config["latent_channels"])

    @property
    def latent_size(self) -> tuple[int, int]:
        """Default latent (h, w) in latent pixels, from the UNet's ``sample_size`` (64×64 for SD 1.5)."""
        size = self.unet_config["sample_size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along one axis (8 for SD 1.5)."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """Default image (H, W) in pixels."""
        h, w = self.latent_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling: the UNet works on ``vae_latent * scaling_factor`` (0.18215 for SD 1.5)."""
        return float(self.vae_config["scaling_factor"])

    @property
    def shift_factor(self) -> float | None:
        """VAE latent shift (SD 3, FLUX: the transformer works on ``(vae_latent - shift) * scaling``); None for SD."""
        shift = self.vae_config.get("shift_factor")
        return None if shift is None else float(shift)

    @property
    def text_max_length(self) -> int:
        """Token sequence length L every prompt is padded/truncated to (77 for CLIP)."""
        return int(self.tokenizer.model_max_length)

    @property
    def text_hidden_size(self) -> int:
        """Width D of the text embeddings ``[B, L, D]`` fed to the UNet's cross-attention (SDXL: both encoders')."""
        second = 0 if self.text_encoder_2_config is None else int(self.text_encoder_2_config.hidden_size)
        return int(self.text_encoder_config.hidden_size) + second


@dataclass(frozen=True, kw_only=True)
class Checkpoint(CheckpointInfo):
    """A loaded checkpoint: its :class:`CheckpointInfo` (configs taken from the modules) and the modules
    themselves, in eval mode on CPU."""

    text_encoder: torch.nn.Module
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint is missing {what}: {path}")
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(require(path, path.name).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _check_scheduler(root: Path, config: dict) -> dict:
    kind = config.get("prediction_type", "epsilon")
    if kind not in _PREDICTION_TYPES:
        where = root / "scheduler" / "scheduler_config.json"
        raise CheckpointError(f"{where}: prediction_type {kind!r} is not one of {_PREDICTION_TYPES}")
    return config


def _check_layout(root: Path) -> dict:
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder does not exist: {root}")
    index = read_json(root / "model_index.json")
    family = model_family(root, index)
    if family in DIT:  # nirvana.checkpoint.dit checks its own layout
        return index
    sdxl = family == "sdxl"
    for component in COMPONENTS + (SDXL_COMPONENTS if sdxl else ()):
        require(root / component, f"folder '{component}/'")
    required = {**_REQUIRED_FILES, **({"text_encoder_2": "config.json"} if sdxl else {})}
    for component, name in required.items():
        require(root / component / name, f"'{component}/{name}'")
    for folder in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        tok = root / folder
        if not (tok / "tokenizer.json").exists() and not (
            (tok / "vocab.json").exists() and (tok / "merges.txt").exists()
        ):
            raise CheckpointError(
                f"checkpoint is missing '{folder}/tokenizer.json' (or vocab.json + merges.txt): {tok}"
            )
    return index


def _load_component(root: Path, component: str, loader, **kwargs):
    try:
        return loader(root / component, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load '{component}/' from {root}: {exc}") from exc


def _text_encoder_class(root: Path, index: dict) -> type[torch.nn.Module]:
    name = (index.get("text_encoder") or [None, "CLIPTextModel"])[1]
    if name not in _TEXT_ENCODER_CLASSES:
        raise CheckpointError(
            f"{root / 'model_index.json'}: text_encoder class {name!r} is not one of {_TEXT_ENCODER_CLASSES}"
        )
    return getattr(transformers, name)


def _load_tokenizer(root: Path, folder: str = "tokenizer") -> PreTrainedTokenizerBase:
    tokenizer = _load_component(root, folder, CLIPTokenizer.from_pretrained)
    if tokenizer.model_max_length > 10_000:
        # An unset model_max_length (~1e30) would make padding="max_length" allocate forever.
        raise CheckpointError(f"'{folder}/' in {root} has no model_max_length (CLIP expects 77)")
    return tokenizer


def _sdxl_info(root: Path, index: dict, family: str) -> dict:
    """The SDXL-only fields of :class:`CheckpointInfo` (none for other families)."""
    if family != "sdxl":
        return {}
    return {
        "tokenizer_2": _load_tokenizer(root, "tokenizer_2"),
        "text_encoder_2_config": _load_component(root, "text_encoder_2", transformers.AutoConfig.from_pretrained),
        # The pipeline's own default when the key is absent.
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
    }


def module_config(root: Path, component: str, cls: type) -> FrozenDict:
    """``component/config.json`` over ``cls``'s constructor defaults: what ``cls.from_pretrained(...).config`` holds.

    Configs saved by older diffusers lack the arguments added since (``scaling_factor`` of the VAE, for one).
    """
    defaults = {
        name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty
    }
    return FrozenDict({**defaults, **read_json(root / component / "config.json")})


def load_checkpoint_info(path: str | Path, fingerprint: str | None = None) -> CheckpointInfo:
    """Tokenizer, configs and fingerprint of a diffusers-format SD folder, without loading any weights.

    For the request path when the sub-models are served elsewhere: no UNet held in memory. Rejects every
    folder :func:`load_checkpoint` rejects for its layout, configs or tokenizer (not for missing weights).
    """
    root = Path(path)
    index = _check_layout(root)
    family = model_family(root, index)
    if family in DIT:
        from nirvana.checkpoint.dit import load_dit_info

        return load_dit_info(root, index, family, fingerprint)
    _text_encoder_class(root, index)
    return CheckpointInfo(
        **_sdxl_info(root, index, family),
        path=root,
        tokenizer=_load_tokenizer(root),
        text_encoder_config=_load_component(root, "text_encoder", transformers.AutoConfig.from_pretrained),
        unet_config=module_config(root, "unet", UNet2DConditionModel),
        vae_config=module_config(root, "vae", AutoencoderKL),
        scheduler_config=_check_scheduler(root, read_json(root / "scheduler" / "scheduler_config.json")),
        fingerprint=fingerprint or fingerprint_checkpoint(root),
        family=family,
    )


MODULES = ("text_encoder", "text_encoder_2", "unet", "vae")


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    components: Collection[str] | None = None,
    fingerprint: str | None = None,
) -> Checkpoint:
    """Load a diffusers-format SD folder (tiny test model or a real SD 1.5) with weights in ``dtype``.

    ``components``: only these of `MODULES` (the others are None; the configs are read from the folder): what one
    sub-model's export needs, so an SDXL export does not hold its 10 GB UNet while it exports a text encoder; then a
    known ``fingerprint`` saves hashing the weights again."""
    if components is not None:
        return _load_some(Path(path), dtype, components, fingerprint)
    root = Path(path)
    index = _check_layout(root)
    if model_family(root, index) in DIT:
        from nirvana.checkpoint.dit import load_dit_checkpoint

        return load_dit_checkpoint(root, index, model_family(root, index), dtype)
    encoder_cls = _text_encoder_class(root, index)
    text_encoder = _load_component(root, "text_encoder", encoder_cls.from_pretrained, dtype=dtype)
    unet = _load_component(root, "unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype)
    vae = _load_component(root, "vae", AutoencoderKL.from_pretrained, torch_dtype=dtype)
    family = model_family(root, index)
    extra = _sdxl_info(root, index, family)
    if extra:
        loader = transformers.CLIPTextModelWithProjection.from_pretrained
        extra["text_encoder_2"] = _load_component(root, "text_encoder_2", loader, dtype=dtype)
        extra["text_encoder_2_config"] = extra["text_encoder_2"].config
    for module in (text_encoder, unet, vae, extra.get("text_encoder_2")):
        if module is not None:
            module.eval()
    return Checkpoint(
        **extra,
        path=root,
        tokenizer=_load_tokenizer(root),
        text_encoder_config=text_encoder.config,
        unet_config=unet.config,
        vae_config=vae.config,
        scheduler_config=_check_scheduler(root, read_json(root / "scheduler" / "scheduler_config.json")),
        fingerprint=fingerprint_checkpoint(root),
        family=family,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
    )


def _load_some(root: Path, dtype: torch.dtype, components: Collection[str], fingerprint: str | None) -> Checkpoint:
    index = _check_layout(root)
    if model_family(root, index) in DIT:  # its own modules (a transformer, up to three text encoders)
        from nirvana.checkpoint.dit import load_dit_checkpoint

        return load_dit_checkpoint(root, index, model_family(root, index), dtype, components, fingerprint)
    unknown = set(components) - set(MODULES)
    if unknown:
        raise ValueError(f"components={sorted(unknown)}: not modules of a checkpoint {MODULES}")
    info = load_checkpoint_info(root, fingerprint)
    loaders = {
        "text_encoder": lambda: _load_component(
            root, "text_encoder", _text_encoder_class(root, index).from_pretrained, dtype=dtype
        ),
        "text_encoder_2": lambda: _load_component(
            root, "text_encoder_2", transformers.CLIPTextModelWithProjection.from_pretrained, dtype=dtype
        ),
        "unet": lambda: _load_component(root, "unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype),
        "vae": lambda: _load_component(root, "vae", AutoencoderKL.from_pretrained, torch_dtype=dtype),
    }
    if "text_encoder_2" in components and info.family != "sdxl":
        raise CheckpointError(f"{root}: text_encoder_2 asked for, but the checkpoint is not SDXL")
    modules = {name: loaders[name]().eval() if name in components else None for name in MODULES}
    return Checkpoint(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info)}, **modules)
