"""Random LoRA adapters and ControlNets for a checkpoint's UNet, made offline in diffusers' format (tests, demos,
benchmarks).

What a user's adapter folder holds: ``<name>/pytorch_lora_weights.safetensors``, written by
``StableDiffusionPipeline.save_lora_weights``. peft's default initialisation makes the up-projection zero (an adapter
that changes nothing), so both projections are drawn at random here: every adapter really changes the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

__all__ = ["make_tiny_controlnet", "make_tiny_lora"]

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def make_tiny_lora(
    out_dir: str | Path, checkpoint_dir: str | Path, seed: int = 0, rank: int = 4, std: float = 0.3
) -> Path:
    """Write a rank-``rank`` LoRA of the attention projections of the UNet in ``checkpoint_dir`` to ``out_dir``."""
    unet = UNet2DConditionModel.from_pretrained(Path(checkpoint_dir) / "unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTENTION))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
    return Path(out_dir)


def make_tiny_controlnet(out_dir: str | Path, checkpoint_dir: str | Path, seed: int = 0, std: float = 0.05) -> Path:
    """A ControlNet built from the checkpoint's UNet (``ControlNetModel.from_unet``), saved in diffusers' format.
    Its conditioning embedding downsamples the control image by the VAE's factor, to the latent's size; its zero
    convolutions are drawn at random, so the control image really steers the image."""
    root = Path(checkpoint_dir)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
    vae_levels = len(json.loads((root / "vae" / "config.json").read_text())["block_out_channels"])
    channels = (16,) + (32,) * (vae_levels - 1)  # one stride-2 block per VAE downsampling
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    controlnet.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
