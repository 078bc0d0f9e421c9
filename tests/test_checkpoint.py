"""nirvana.checkpoint: a checkpoint loads with or without weights, fingerprints track content, errors name the gap."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from nirvana import fingerprint as fingerprint_module
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


def _weights_folder(root: Path, size: int = 3 << 20) -> Path:
    """A folder laid out as fingerprint_checkpoint reads it, with one weight file larger than 2 MiB."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(size))
    return root / "unet" / "model.safetensors"


def test_fingerprint_covers_the_middle_of_a_large_file(tmp_path: Path) -> None:
    """A same-size change between the first and last MiB (what a fine-tune may be) changes the fingerprint."""
    weights = _weights_folder(tmp_path / "ckpt")
    first = fingerprint_checkpoint(tmp_path / "ckpt")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert fingerprint_checkpoint(tmp_path / "ckpt") != first


def test_fingerprint_digests_are_cached_and_a_changed_file_is_hashed_again(tmp_path: Path, monkeypatch) -> None:
    weights = _weights_folder(tmp_path / "ckpt")
    hashed: list[str] = []
    real = fingerprint_module._sha256_of
    monkeypatch.setattr(fingerprint_module, "_sha256_of", lambda path: hashed.append(path.name) or real(path))
    first = fingerprint_checkpoint(tmp_path / "ckpt")
    assert sorted(hashed) == ["model.safetensors", "model_index.json"]
    assert (tmp_path / "ckpt" / fingerprint_module.FINGERPRINT_CACHE).is_file()
    hashed.clear()
    assert fingerprint_checkpoint(tmp_path / "ckpt") == first and hashed == []  # nothing read again
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: same size, another mtime
    assert fingerprint_checkpoint(tmp_path / "ckpt") == first and hashed == ["model.safetensors"]


def test_fingerprint_of_a_read_only_checkpoint_is_recomputed(tmp_path: Path, monkeypatch, caplog) -> None:
    _weights_folder(tmp_path / "ckpt")

    def read_only(*args, **kwargs):  # tests run as root, for whom chmod does not make a folder read-only
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fingerprint_module.os, "replace", read_only)
    with caplog.at_level(logging.INFO, logger="nirvana.fingerprint"):
        first = fingerprint_checkpoint(tmp_path / "ckpt")
    assert fingerprint_checkpoint(tmp_path / "ckpt") == first
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model_index.json", "unet"]  # no temp left
    assert "recomputed at each load" in caplog.text


def test_fingerprint_speed(tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    """Prints the hashing speed (MB/s) and the tiny model's fingerprint time, cold and cached."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint_dir, copy, ignore=shutil.ignore_patterns(fingerprint_module.FINGERPRINT_CACHE))
    size = sum(p.stat().st_size for p in fingerprint_module._component_files(copy))
    t0 = time.perf_counter()
    fingerprint_checkpoint(copy)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fingerprint_checkpoint(copy)
    cached = time.perf_counter() - t0
    big = _weights_folder(tmp_path / "big", 256 << 20).parent.parent
    t0 = time.perf_counter()
    fingerprint_checkpoint(big)
    rate = 256 / (time.perf_counter() - t0)
    print(
        f"\ntiny checkpoint {size / 1e6:.2f} MB: cold {cold * 1e3:.1f} ms, cached {cached * 1e3:.1f} ms; "
        f"sha256 {rate:.0f} MiB/s -> SD 1.5 (4 GB) cold ~{4000 / rate:.0f} s"
    )
    assert cached < cold * 2 + 0.05


def test_a_checkpoint_can_be_loaded_one_module_at_a_time(tiny_checkpoint_dir: Path, tiny_checkpoint) -> None:
    """What an export child loads: its own module, with every config of the full checkpoint."""
    vae_only = load_checkpoint(tiny_checkpoint_dir, components=["vae"])
    assert vae_only.vae is not None and vae_only.unet is None and vae_only.text_encoder is None
    for key in ("sample_size", "in_channels", "cross_attention_dim", "block_out_channels"):
        assert vae_only.unet_config[key] == tiny_checkpoint.unet_config[key]
    assert (vae_only.latent_size, vae_only.fingerprint) == (tiny_checkpoint.latent_size, tiny_checkpoint.fingerprint)
    assert sum(p.numel() for p in vae_only.vae.parameters()) == sum(p.numel() for p in tiny_checkpoint.vae.parameters())
    with pytest.raises(ValueError, match="controlnet"):
        load_checkpoint(tiny_checkpoint_dir, components=["controlnet"])
    with pytest.raises(CheckpointError, match="not SDXL"):
        load_checkpoint(tiny_checkpoint_dir, components=["text_encoder_2"])
