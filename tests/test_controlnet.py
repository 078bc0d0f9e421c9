"""ControlNet per request, in-process: images equal diffusers' `StableDiffusionControlNetPipeline` (alone and with a
LoRA adapter), a latent is reused only under the same ControlNet, scale and control image, bad inputs name the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from nirvana.config import load_config
from nirvana.embed import make_embedder
from nirvana.pipeline import Pipeline
from nirvana.request import RequestError
from nirvana_dev.tiny_addons import make_tiny_controlnet, make_tiny_lora

STEPS = 8
PROMPT = "a red fox in the snow, photograph"


def _edges(seed: int) -> np.ndarray:
    """A control image: white strokes on black, 64×64 (the tiny model's image size)."""
    image = np.zeros((64, 64, 3), np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        row, col = rng.integers(0, 56, 2)
        image[row : row + 8, col : col + 2] = 255
        image[row : row + 2, col : col + 8] = 255
    return image


@pytest.fixture(scope="module")
def folders(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    controlnets, adapters = tmp_path_factory.mktemp("controlnets"), tmp_path_factory.mktemp("adapters")
    make_tiny_controlnet(controlnets / "edges", tiny_checkpoint_dir, seed=1)
    make_tiny_lora(adapters / "ink", tiny_checkpoint_dir, seed=1)
    return controlnets, adapters


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, folders, tmp_path_factory: pytest.TempPathFactory):
    controlnets, adapters = folders
    config = load_config(
        {
            "checkpoint": str(tiny_checkpoint.path),
            "default_steps": STEPS,
            "controlnets": {"dir": str(controlnets)},
            "adapters": {"dir": str(adapters)},
            "cache": {"dir": str(tmp_path_factory.mktemp("cache")), "predictor": {"enabled": False}},
        }
    )
    pipeline = Pipeline(config, checkpoint=tiny_checkpoint, embedder=make_embedder("minilm"))
    yield pipeline
    pipeline.close()


def _reference(checkpoint_dir: Path, folders: tuple[Path, Path], image: np.ndarray, scale: float, lora: bool):
    controlnets, adapters = folders
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        checkpoint_dir,
        controlnet=ControlNetModel.from_pretrained(controlnets / "edges", local_files_only=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    reference.set_progress_bar_config(disable=True)
    if lora:
        reference.load_lora_weights(str(adapters / "ink"), adapter_name="ink")
        reference.set_adapters(["ink"], adapter_weights=[0.8])
    out = reference(
        PROMPT,
        image=Image.fromarray(image),
        num_inference_steps=STEPS,
        controlnet_conditioning_scale=scale,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images[0]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("scale", "lora"), [(1.0, ""), (0.6, ""), (1.0, "ink:0.8")])
def test_images_equal_diffusers_controlnet_pipeline(pipe, tiny_checkpoint_dir, folders, scale, lora) -> None:
    control = _edges(0)
    options = {"seed": 4, "cache_mode": "bypass", "lora": lora}
    ours = pipe.generate(PROMPT, controlnet="edges", control_image=control, controlnet_scale=scale, **options).image
    plain = pipe.generate(PROMPT, **options).image
    expected = _reference(tiny_checkpoint_dir, folders, control, scale, lora=bool(lora))
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 10  # the control really steers the image


def test_a_latent_is_reused_only_under_the_same_control(pipe) -> None:
    prompt, edges, other = "a blue lighthouse at night", _edges(1), _edges(2)
    control = {"controlnet": "edges", "control_image": edges}
    assert pipe.generate(prompt, seed=1, **control).admitted > 0
    assert pipe.generate(prompt, seed=1, **control).cache_hit
    assert not pipe.generate(prompt, seed=1, controlnet="edges", control_image=other).cache_hit  # another image
    assert not pipe.generate(prompt, seed=1, controlnet_scale=0.5, **control).cache_hit  # another scale
    assert not pipe.generate(prompt, seed=1, lora="ink", **control).cache_hit  # with an adapter too
    assert not pipe.generate(prompt, seed=1).cache_hit  # no control


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"controlnet": "depth", "control_image": _edges(0)}, "CONTROLNET='depth': unknown controlnet 'depth'"),
        ({"controlnet": "edges"}, "CONTROL_IMAGE must be uint8 [64, 64, 3]"),
        ({"controlnet": "edges", "control_image": np.zeros((32, 32, 3), np.uint8)}, "got (dtype('uint8'), (32, 32"),
        ({"controlnet": "edges", "control_image": _edges(0), "controlnet_scale": 3.0}, "CONTROLNET_SCALE=3.0"),
        ({"control_image": _edges(0)}, "CONTROL_IMAGE='<image>': given without CONTROLNET"),
    ],
)
def test_bad_control_inputs_are_errors_naming_the_field(pipe, options, needle) -> None:
    with pytest.raises(RequestError) as err:
        pipe.generate(PROMPT, cache_mode="bypass", **options)
    assert needle in str(err.value)
