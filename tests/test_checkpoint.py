"""nirvana.checkpoint: the tiny checkpoint loads like a real one, fingerprints track content, errors name the gap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer

from nirvana.checkpoint import COMPONENTS, CheckpointError, fingerprint_checkpoint, load_checkpoint, make_tiny_model


def test_tiny_layout_has_diffusers_folders(tiny_checkpoint_dir: Path) -> None:
    assert (tiny_checkpoint_dir / "model_index.json").is_file()
    for component in COMPONENTS:
        assert (tiny_checkpoint_dir / component).is_dir(), component
    index = json.loads((tiny_checkpoint_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert list(tiny_checkpoint_dir.glob("unet/*.safetensors"))


def test_load_checkpoint_gives_models_and_geometry(tiny_checkpoint) -> None:
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


def test_tokenizer_round_trips_and_pads_to_77(tiny_checkpoint, tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    tok = tiny_checkpoint.tokenizer
    ids = tok("A photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.pad_token_id == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # Learned merges make common words single tokens.
    assert tok.tokenize("cat") == ["cat</w>"]
    long_ids = tok(" ".join(["castle"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tok.eos_token_id

    auto = AutoTokenizer.from_pretrained(tiny_checkpoint_dir / "tokenizer", local_files_only=True)
    assert auto("A photo of a cat").input_ids == tok("A photo of a cat").input_ids
    # The vocab.json + merges.txt layout of a real SD 1.5 folder gives the same ids.
    legacy = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint_dir / "tokenizer", legacy)
    (legacy / "tokenizer.json").unlink()
    slow_layout = CLIPTokenizer.from_pretrained(legacy, local_files_only=True)
    assert slow_layout("A photo of a cat").input_ids == tok("A photo of a cat").input_ids


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


def test_make_tiny_model_is_deterministic(tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    same = make_tiny_model(tmp_path / "same", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert fingerprint_checkpoint(same) == fingerprint_checkpoint(tiny_checkpoint_dir)
    assert fingerprint_checkpoint(other) != fingerprint_checkpoint(tiny_checkpoint_dir)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_folder_is_named(component: str, tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(CheckpointError, match=f"'{component}/'"):
        load_checkpoint(broken)


@pytest.mark.parametrize("relative", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_missing_file_is_named(relative: str, tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    (broken / relative).unlink()
    with pytest.raises(CheckpointError, match=Path(relative).name):
        load_checkpoint(broken)


def test_missing_weights_are_named(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match="'vae/'"):
        load_checkpoint(broken)


def test_missing_checkpoint_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does-not-exist"):
        load_checkpoint(tmp_path / "does-not-exist")
