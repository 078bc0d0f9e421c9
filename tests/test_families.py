"""Model families: SD 2.x (v-prediction) and SDXL checkpoints generate like diffusers' own pipelines and resume at
K; a family this server cannot run is refused at load, naming it; a latent never crosses checkpoints or
resolutions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from nirvana.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_info
from nirvana.config import load_config
from nirvana.denoise import make_scheduler
from nirvana.embed import make_embedder
from nirvana.pipeline import Pipeline

STEPS = 12
PROMPT = "a red fox in the snow, photograph"


@pytest.fixture(scope="module")
def sd2_dir(tiny_sd2_dir: Path) -> Path:
    return tiny_sd2_dir


@pytest.fixture(scope="module")
def sd2(sd2_dir: Path):
    return load_checkpoint(sd2_dir)


@pytest.fixture(scope="module")
def embedder():
    return make_embedder("minilm")


def _pipe(checkpoint, embedder, cache_dir: Path, scheduler: str = "ddim") -> Pipeline:
    config = load_config(
        {
            "checkpoint": str(checkpoint.path),
            "scheduler": scheduler,
            "default_steps": STEPS,
            "cache": {"dir": str(cache_dir), "latent_dtype": "float32", "predictor": {"enabled": False}},
        }
    )
    return Pipeline(config, checkpoint=checkpoint, embedder=embedder)


def test_sd2_checkpoint_is_read_as_v_prediction_at_its_own_resolution(sd2, sd2_dir) -> None:
    info = load_checkpoint_info(sd2_dir)
    assert sd2.family == info.family == "sd"
    assert sd2.prediction_type == info.prediction_type == "v_prediction"
    assert sd2.image_size == (96, 96) and sd2.latent_size == (24, 24)
    assert sd2.unet_config["use_linear_projection"] is True


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_sd2_images_equal_diffusers_pipeline_with_v_prediction(sd2, sd2_dir, embedder, tmp_path, scheduler) -> None:
    reference = StableDiffusionPipeline.from_pretrained(
        sd2_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = make_scheduler(scheduler, dict(reference.scheduler.config))
    assert reference.scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(4)
    expected = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=generator, output_type="np")
    expected = expected.images[0]
    pipe = _pipe(sd2, embedder, tmp_path / "cache", scheduler)
    try:
        ours = pipe.generate(PROMPT, seed=4, cache_mode="bypass")
    finally:
        pipe.close()
    expected_u8 = (expected * 255).round().clip(0, 255).astype(np.uint8)
    assert ours.image.shape == expected_u8.shape == (96, 96, 3)
    assert ours.image.std() > 2  # not blank: the comparison means something
    assert np.abs(ours.image.astype(int) - expected_u8.astype(int)).max() <= 1


def test_sd2_resumes_at_k_to_the_uninterrupted_image(sd2, embedder, tmp_path) -> None:
    pipe = _pipe(sd2, embedder, tmp_path / "cache")
    try:
        miss = pipe.generate(PROMPT, seed=6)
        hit = pipe.generate(PROMPT, seed=6)
        paraphrase = pipe.generate("photo of a red fox in snow", seed=6)
    finally:
        pipe.close()
    assert not miss.cache_hit and miss.admitted > 0
    assert hit.cache_hit and hit.skipped_steps > 0
    assert np.abs(hit.image.astype(int) - miss.image.astype(int)).max() <= 1
    assert paraphrase.cache_hit and paraphrase.skipped_steps > 0 and paraphrase.image.std() > 2


def test_a_latent_never_crosses_checkpoints_or_resolutions(sd2, tiny_checkpoint, embedder, tmp_path) -> None:
    shared = tmp_path / "shared-cache"
    sd2_pipe = _pipe(sd2, embedder, shared)
    try:
        assert sd2_pipe.generate(PROMPT, seed=1).admitted > 0
        assert sd2_pipe.generate(PROMPT, seed=1).cache_hit
    finally:
        sd2_pipe.close()
    sd1_pipe = _pipe(tiny_checkpoint, embedder, shared)
    try:
        other = sd1_pipe.generate(PROMPT, seed=1)
        assert sd1_pipe.cache_key(STEPS, 7.5) != sd2_pipe.cache_key(STEPS, 7.5)
    finally:
        sd1_pipe.close()
    assert not other.cache_hit and other.image.shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("class_name", "named"),
    [
        ("PixArtAlphaPipeline", "PixArt"),
        ("StableCascadeCombinedPipeline", "Stable Cascade"),
        ("KandinskyPipeline", "unknown model family"),
    ],
)
def test_an_unsupported_family_is_refused_naming_it(sd2_dir, tmp_path, class_name, named) -> None:
    copy = Path(shutil.copytree(sd2_dir, tmp_path / "model"))
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    for load in (load_checkpoint, load_checkpoint_info):
        with pytest.raises(CheckpointError, match=rf"{class_name}.*{named}.*StableDiffusionPipeline"):
            load(copy)


def test_an_unknown_prediction_type_is_refused_naming_it(sd2_dir, tmp_path) -> None:
    copy = Path(shutil.copytree(sd2_dir, tmp_path / "model"))
    config_path = copy / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "flow"}))
    with pytest.raises(CheckpointError, match="prediction_type 'flow'"):
        load_checkpoint_info(copy)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path):
    return load_checkpoint(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_reference(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_checkpoint_has_both_encoders_and_its_own_retrieval_vector(sdxl) -> None:
    assert sdxl.family == "sdxl" and sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    assert sdxl.text_hidden_size == 64 == sdxl.unet_config["cross_attention_dim"]
    assert sdxl.image_size == (128, 128) and sdxl.force_zeros_for_empty_prompt
    clip = make_embedder("clip", sdxl)
    assert clip.pools_from_conditioning and clip.dim == sdxl.text_encoder_2_config.projection_dim


@pytest.mark.parametrize(("scheduler", "negative"), [("ddim", ""), ("euler", ""), ("ddim", "blurry, low quality")])
def test_sdxl_images_equal_diffusers_pipeline(sdxl, sdxl_reference, tmp_path, scheduler, negative) -> None:
    sdxl_reference.scheduler = make_scheduler(scheduler, dict(sdxl_reference.scheduler.config))
    expected = sdxl_reference(
        PROMPT,
        negative_prompt=negative or None,  # None: SDXL's zeros for an empty negative prompt
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images[0]
    pipe = _pipe(sdxl, make_embedder("clip", sdxl), tmp_path / "cache", scheduler)
    try:
        ours = pipe.generate(PROMPT, negative_prompt=negative, seed=4, guidance=5.0, cache_mode="bypass")
    finally:
        pipe.close()
    expected_u8 = (expected * 255).round().clip(0, 255).astype(np.uint8)
    assert ours.image.shape == expected_u8.shape == (128, 128, 3)
    assert ours.image.std() > 2
    assert np.abs(ours.image.astype(int) - expected_u8.astype(int)).max() <= 1


def test_sdxl_resumes_at_k_and_retrieves_from_its_conditioning_pass(sdxl, tmp_path) -> None:
    clip = make_embedder("clip", sdxl)
    pipe = _pipe(sdxl, clip, tmp_path / "cache")
    try:
        miss = pipe.generate(PROMPT, seed=6)
        hit = pipe.generate(PROMPT, seed=6)
        other = pipe.generate("a blue lighthouse at night", seed=6)
    finally:
        pipe.close()
    assert not miss.cache_hit and miss.admitted > 0
    assert hit.cache_hit and hit.skipped_steps > 0 and hit.similarity > 0.999
    assert np.abs(hit.image.astype(int) - miss.image.astype(int)).max() <= 1
    # the similarity the request path searched with is the cosine of text_encoder_2's pooled projections, as the
    # embedder computes them with its own encoder call: retrieval comes from the conditioning pass
    expected = float(clip.embed([PROMPT])[0] @ clip.embed(["a blue lighthouse at night"])[0])
    assert abs(other.similarity - expected) < 1e-4


def test_sdxl_paraphrase_hits_with_minilm_and_latents_stay_apart(sdxl, tiny_checkpoint, embedder, tmp_path) -> None:
    shared = tmp_path / "shared-cache"
    pipe = _pipe(sdxl, embedder, shared)
    try:
        pipe.generate(PROMPT, seed=1)
        paraphrase = pipe.generate("photo of a red fox in snow", seed=2)
    finally:
        pipe.close()
    assert paraphrase.cache_hit and paraphrase.skipped_steps > 0 and paraphrase.image.shape == (128, 128, 3)
    sd1 = _pipe(tiny_checkpoint, embedder, shared)
    try:
        assert not sd1.generate(PROMPT, seed=1).cache_hit
    finally:
        sd1.close()
