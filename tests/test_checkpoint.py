"""nirvana.checkpoint: a checkpoint loads with or without weights, fingerprints track content, errors name the gap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from nirvana.checkpoint import (
    COMPONENTS,
    Checkpoint,
    CheckpointError,
    CheckpointInfo,
    fingerprint_checkpoint,
    load_checkpoint,
    load_checkpoint_info,
)


def test_tiny_layout_has_diffusers_folders(tiny_checkpoint_dir: Path) -> None:
    assert (tiny_checkpoint_dir / "model_index.json").is_file()
    for component in COMPONENTS:
        assert (tiny_checkpoint_dir / component).is_dir(), component
    index = json.loads((tiny_checkpoint_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert list(tiny_checkpoint_dir.glob("unet/*.safetensors"))


def test_load_checkpoint_gives_models_and_geometry(tiny_checkpoint: Checkpoint) -> None:
    ck = tiny_checkpoint
    assert isinstance(ck.unet, UNet2DConditionModel) and isinstance(ck.vae, AutoencoderKL)
    assert isinstance(ck.text_encoder, CLIPTextModel) and not ck.text_encoder.training
    assert ck.unet.dtype == torch.float32
    assert ck.latent_channels == 4
    assert ck.latent_size == (16, 16)
    assert ck.vae_scale_factor == 4
    assert ck.image_size == (64, 64)
    assert ck.scaling_factor == pytest.approx(0.18215)
    assert ck.text_max_length == 77
    assert ck.text_hidden_size == 32 == ck.unet.config.cross_attention_dim
    assert ck.scheduler_config["_class_name"] == "DDIMScheduler"
    assert ck.scheduler_config["beta_schedule"] == "scaled_linear"
    # The pooled output must come from the EOS position, not position 0.
    assert ck.text_encoder.config.eos_token_id == ck.tokenizer.eos_token_id


def test_checkpoint_info_has_the_geometry_and_no_weights(tiny_checkpoint: Checkpoint) -> None:
    info = load_checkpoint_info(tiny_checkpoint.path)
    assert type(info) is CheckpointInfo and not hasattr(info, "unet")
    geometry = ("latent_channels", "vae_latent_channels", "latent_size", "vae_scale_factor", "image_size")
    geometry += ("scaling_factor", "text_max_length", "text_hidden_size", "fingerprint", "scheduler_config")
    for name in geometry:
        assert getattr(info, name) == getattr(tiny_checkpoint, name), name
    assert info.tokenizer("a cat").input_ids == tiny_checkpoint.tokenizer("a cat").input_ids
    assert info.text_encoder_config.eos_token_id == info.tokenizer.eos_token_id


def test_checkpoint_info_fills_config_defaults(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    # Configs saved before diffusers added an argument lack it; its default applies, as for the loaded module.
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint_dir, old)
    config = json.loads((old / "vae" / "config.json").read_text())
    del config["scaling_factor"]
    (old / "vae" / "config.json").write_text(json.dumps(config))
    assert load_checkpoint_info(old).scaling_factor == load_checkpoint(old).scaling_factor == pytest.approx(0.18215)


def test_tiny_checkpoint_loads_through_diffusers(tiny_checkpoint_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint_dir,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 4


def test_fingerprint_is_stable_and_tracks_weights(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    first = load_checkpoint(tiny_checkpoint_dir).fingerprint
    assert load_checkpoint(tiny_checkpoint_dir).fingerprint == first
    assert len(first) == 64

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint_dir, copy)
    assert fingerprint_checkpoint(copy) == first  # content, not location

    # One byte changed in a small weight file (hashed whole).
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = fingerprint_checkpoint(copy)
    assert changed != first

    # Retrained UNet weights (same size, same config).
    unet = UNet2DConditionModel.from_pretrained(copy / "unet", local_files_only=True)
    with torch.no_grad():
        for param in unet.parameters():
            param.mul_(1.01)
    unet.save_pretrained(copy / "unet")
    assert fingerprint_checkpoint(copy) not in (first, changed)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_folder_is_named(component: str, tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    shutil.rmtree(broken / component)
    for load in (load_checkpoint, load_checkpoint_info):
        with pytest.raises(CheckpointError, match=f"'{component}/'"):
            load(broken)


@pytest.mark.parametrize("relative", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_missing_file_is_named(relative: str, tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    (broken / relative).unlink()
    for load in (load_checkpoint, load_checkpoint_info):
        with pytest.raises(CheckpointError, match=Path(relative).name):
            load(broken)


def test_missing_weights_are_named(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match="'vae/'"):
        load_checkpoint(broken)


def test_missing_checkpoint_folder(tmp_path: Path) -> None:
    for load in (load_checkpoint, load_checkpoint_info):
        with pytest.raises(CheckpointError, match="does-not-exist"):
            load(tmp_path / "does-not-exist")
