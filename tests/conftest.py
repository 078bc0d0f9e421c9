"""Shared fixtures: one tiny random-weight Stable Diffusion checkpoint per test session."""

from __future__ import annotations

import os

# Idle OpenMP threads spinning on 2 cores made a UNet step 50× slower; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

from nirvana.checkpoint import Checkpoint, load_checkpoint
from nirvana_dev.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format tiny SD folder (DDIM scheduler config, 16×16×4 latent, 64×64 image), built once."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_sd"), seed=0, scheduler="ddim")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_dir: Path) -> Checkpoint:
    """The tiny checkpoint loaded through the production loader (fp32, eval)."""
    return load_checkpoint(tiny_checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x's layout at toy size: v-prediction, OpenCLIP-style text encoder, 24×24×4 latent, 96×96 image."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_sd2"), seed=3, architecture="tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL's layout at toy size: two text encoders, text_time added conditioning, 32×32×4 latent, 128×128 image."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_sdxl"), seed=5, architecture="tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SD 3's and FLUX.1's layouts at toy size (16-channel 16×16 latent, 64×64 image, T5 of 32 tokens), by family."""
    return {
        "sd3": make_tiny_model(tmp_path_factory.mktemp("tiny_sd3"), seed=7, architecture="tiny-sd3"),
        "flux": make_tiny_model(tmp_path_factory.mktemp("tiny_flux"), seed=8, architecture="tiny-flux"),
    }
