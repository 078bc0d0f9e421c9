"""Transformer (DiT, flow-matching) checkpoint folders: SD 3.x (``StableDiffusion3Pipeline``) and FLUX.1
(``FluxPipeline``), their configuration alone or with their weights.

Layouts (what ``save_pretrained`` writes)::

    SD 3.x:  model_index.json  transformer/  vae/  text_encoder/ (CLIP-L)  text_encoder_2/ (CLIP-G)
             text_encoder_3/ (T5)  tokenizer/  tokenizer_2/  tokenizer_3/  scheduler/
    FLUX.1:  model_index.json  transformer/  vae/  text_encoder/ (CLIP-L)  text_encoder_2/ (T5)
             tokenizer/  tokenizer_2/  scheduler/

The transformer stands where a UNet stands in :class:`nirvana.checkpoint.CheckpointInfo` (``unet_config``, the
``unet`` module): it is the model every denoising step runs. Two settings are not in the diffusers folder, since the
pipelines take them per call: the image size and T5's sequence length. They come from ``nirvana.json`` beside
``model_index.json`` (``{"image_size": [H, W], "max_sequence_length": T}``), else the pipelines' defaults
(SD 3: the transformer's ``sample_size`` × 8 and 256 tokens; FLUX: 1024 px and 512 tokens). Both change the
trajectory, so the cache key carries both.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTokenizer, PretrainedConfig, PreTrainedTokenizerBase, T5TokenizerFast

from nirvana.checkpoint import Checkpoint, CheckpointError, CheckpointInfo, module_config, read_json, require
from nirvana.fingerprint import fingerprint_checkpoint
from nirvana.schedulers import IMAGE_SEQ_LEN, LINEAR_SIGMAS

__all__ = ["DIT_FAMILIES", "DitCheckpoint", "DitCheckpointInfo", "load_dit_checkpoint"]


@dataclass(frozen=True)
class DitFamily:
    """What one transformer family's folder holds: its text encoders (folder → accepted classes) and tokenizers in
    the order the pipeline reads them, the transformer class and the pipeline's defaults."""

    label: str
    transformer: type
    text_encoders: Mapping[str, tuple[str, ...]]
    t5: str  # the T5 encoder's folder; its tokenizer is "tokenizer" + the same suffix
    default_image_size: int | None  # None: the transformer's sample_size × the VAE's scale
    default_max_sequence_length: int
    linear_sigmas: bool  # FLUX passes sigmas = linspace(1, 1/N, N)
    patch: int  # latent pixels per image token along one axis


DIT_FAMILIES = {
    "sd3": DitFamily(
        "SD 3.x",
        SD3Transformer2DModel,
        {
            "text_encoder": ("CLIPTextModelWithProjection",),
            "text_encoder_2": ("CLIPTextModelWithProjection",),
            "text_encoder_3": ("T5EncoderModel",),
        },
        "text_encoder_3",
        None,
        256,
        False,
        2,
    ),
    "flux": DitFamily(
        "FLUX.1",
        FluxTransformer2DModel,
        {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",)},
        "text_encoder_2",
        1024,
        512,
        True,
        2,
    ),
}


@dataclass(frozen=True, kw_only=True)
class DitCheckpointInfo(CheckpointInfo):
    """A transformer checkpoint's configuration. ``tokenizer``/``text_encoder_config`` are CLIP-L's; every tokenizer
    and text encoder config is in ``tokenizers``/``text_encoder_configs`` by folder."""

    tokenizers: Mapping[str, PreTrainedTokenizerBase]
    text_encoder_configs: Mapping[str, PretrainedConfig]
    max_sequence_length: int
    configured_image_size: tuple[int, int]

    @property
    def dit(self) -> DitFamily:
        return DIT_FAMILIES[self.family]

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent: the VAE's 16; FLUX's transformer sees them packed 2×2 (64)."""
        return int(self.vae_config["latent_channels"])

    @property
    def image_size(self) -> tuple[int, int]:
        return self.configured_image_size

    @property
    def latent_size(self) -> tuple[int, int]:
        h, w = self.configured_image_size
        return h // self.vae_scale_factor, w // self.vae_scale_factor

    @property
    def text_hidden_size(self) -> int:
        """Width of the text sequence the transformer attends to (T5's, CLIP's padded to it for SD 3)."""
        return int(self.unet_config["joint_attention_dim"])

    @property
    def pooled_size(self) -> int:
        """Width of ``pooled_projections``: CLIP-L + CLIP-G projections (SD 3), CLIP-L's pooled output (FLUX)."""
        return int(self.unet_config["pooled_projection_dim"])

    @property
    def t5_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizers[self.dit.t5.replace("text_encoder", "tokenizer")]


@dataclass(frozen=True, kw_only=True)
class DitCheckpoint(DitCheckpointInfo, Checkpoint):
    """The loaded modules too: ``unet`` is the transformer, ``text_encoder_2`` the second text encoder (CLIP-G for
    SD 3, T5 for FLUX), ``text_encoder_3`` SD 3's T5."""

    text_encoder_3: torch.nn.Module | None = None


def _settings(root: Path) -> dict[str, Any]:
    path = root / "nirvana.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return settings if isinstance(settings, dict) else {}


def _image_size(root: Path, family: DitFamily, transformer: Mapping[str, Any], scale: int) -> tuple[int, int]:
    default = family.default_image_size or int(transformer["sample_size"]) * scale
    size = _settings(root).get("image_size", [default, default])
    multiple = scale * family.patch
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise CheckpointError(f"{root / 'nirvana.json'}: image_size {size!r} is not [height, width] in pixels")
    if any(v % multiple for v in size):
        raise CheckpointError(f"{root / 'nirvana.json'}: image_size {size} is not a multiple of {multiple} pixels")
    return int(size[0]), int(size[1])


def _tokenizer(root: Path, folder: str, t5: bool) -> PreTrainedTokenizerBase:
    require(root / folder, f"folder '{folder}/'")
    cls = T5TokenizerFast if t5 else CLIPTokenizer
    try:
        return cls.from_pretrained(root / folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load '{folder}/' from {root}: {exc}") from exc


def _check_encoders(root: Path, index: dict, family: DitFamily) -> None:
    for folder, classes in family.text_encoders.items():
        require(root / folder / "config.json", f"'{folder}/config.json'")
        name = (index.get(folder) or [None, None])[1]
        if name not in classes:
            raise CheckpointError(f"{root / 'model_index.json'}: {folder} class {name!r} is not one of {classes}")


def load_dit_info(root: Path, index: dict, family_name: str, fingerprint: str | None = None) -> DitCheckpointInfo:
    """Configs, tokenizers and settings of an SD 3.x or FLUX.1 folder, without weights."""
    family = DIT_FAMILIES[family_name]
    for folder in ("transformer", "vae"):
        require(root / folder / "config.json", f"'{folder}/config.json'")
    _check_encoders(root, index, family)
    scheduler = read_json(require(root / "scheduler" / "scheduler_config.json", "'scheduler/scheduler_config.json'"))
    transformer = module_config(root, "transformer", family.transformer)
    vae = module_config(root, "vae", AutoencoderKL)
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    size = _image_size(root, family, transformer, scale)
    patch = int(transformer.get("patch_size") or 1) if family_name == "sd3" else family.patch  # FLUX packs 2×2
    tokens = (size[0] // scale // patch) * (size[1] // scale // patch)
    tokenizers = {
        folder.replace("text_encoder", "tokenizer"): _tokenizer(
            root, folder.replace("text_encoder", "tokenizer"), folder == family.t5
        )
        for folder in family.text_encoders
    }
    auto = transformers.AutoConfig.from_pretrained
    configs = {folder: auto(root / folder, local_files_only=True) for folder in family.text_encoders}
    max_seq = _settings(root).get("max_sequence_length", family.default_max_sequence_length)
    if not isinstance(max_seq, int) or max_seq < 1:
        raise CheckpointError(f"{root / 'nirvana.json'}: max_sequence_length {max_seq!r} is not a positive integer")
    return DitCheckpointInfo(
        path=root,
        tokenizer=tokenizers["tokenizer"],
        text_encoder_config=configs["text_encoder"],
        unet_config=transformer,
        vae_config=vae,
        scheduler_config={**scheduler, IMAGE_SEQ_LEN: tokens, LINEAR_SIGMAS: family.linear_sigmas},
        fingerprint=fingerprint or fingerprint_checkpoint(root),
        family=family_name,
        tokenizers=tokenizers,
        text_encoder_configs=configs,
        max_sequence_length=max_seq,
        configured_image_size=size,
    )


def _load(root: Path, folder: str, loader, **kwargs) -> torch.nn.Module:
    try:
        return loader(root / folder, local_files_only=True, **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load '{folder}/' from {root}: {exc}") from exc


def load_dit_checkpoint(
    root: Path,
    index: dict,
    family_name: str,
    dtype: torch.dtype,
    components: Collection[str] | None = None,
    fingerprint: str | None = None,
) -> DitCheckpoint:
    """:func:`load_dit_info` and the modules in ``dtype``, in eval mode on CPU; ``components``: only these of
    ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, ``unet`` (the transformer) and ``vae`` (the others
    None), what one served model's export needs; a known ``fingerprint`` saves hashing the weights again."""
    family = DIT_FAMILIES[family_name]
    loaders = {
        folder: lambda folder=folder: _load(
            root, folder, getattr(transformers, index[folder][1]).from_pretrained, dtype=dtype
        )
        for folder in family.text_encoders
    }
    loaders["unet"] = lambda: _load(root, "transformer", family.transformer.from_pretrained, torch_dtype=dtype)
    loaders["vae"] = lambda: _load(root, "vae", AutoencoderKL.from_pretrained, torch_dtype=dtype)
    wanted = set(loaders) if components is None else set(components)
    if wanted - set(loaders):  # before anything is read or hashed
        raise CheckpointError(f"{root}: an {family.label} checkpoint has no {sorted(wanted - set(loaders))}")
    info = load_dit_info(root, index, family_name, fingerprint)
    modules = {name: loaders[name]() if name in wanted else None for name in loaders}
    fields = {name: getattr(info, name) for name in info.__dataclass_fields__}
    return DitCheckpoint(
        **fields,
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules.get("text_encoder_2"),
        text_encoder_3=modules.get("text_encoder_3"),
        unet=modules["unet"],
        vae=modules["vae"],
    )
