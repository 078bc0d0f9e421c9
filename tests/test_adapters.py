"""LoRA adapters per request, in-process: images equal diffusers' own `load_lora_weights` + `set_adapters`, latents
never cross adapter sets, and a bad adapter or LORA value is refused naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from nirvana.addons.lora import WEIGHTS_NAME, AdapterError, AdapterLibrary
from nirvana.addons.registry import AddOns
from nirvana.config import load_config
from nirvana.embed import make_embedder
from nirvana.pipeline import Pipeline
from nirvana.request import RequestError
from nirvana_dev.tiny_addons import make_tiny_lora

STEPS = 8
PROMPT = "a red fox in the snow, photograph"


@pytest.fixture(scope="module")
def adapters_dir(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_tiny_lora(root / "ink", tiny_checkpoint_dir, seed=1)
    make_tiny_lora(root / "glow", tiny_checkpoint_dir, seed=2)
    return root


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = load_config(
        {
            "checkpoint": str(tiny_checkpoint.path),
            "default_steps": STEPS,
            "adapters": {"dir": str(adapters_dir), "max_loaded": 2},
            "cache": {"dir": str(tmp_path_factory.mktemp("cache")), "predictor": {"enabled": False}},
        }
    )
    pipeline = Pipeline(config, checkpoint=tiny_checkpoint, embedder=make_embedder("minilm"))
    yield pipeline
    pipeline.close()


def _reference(checkpoint_dir: Path, adapters_dir: Path, adapters: dict[str, float]) -> np.ndarray:
    """diffusers' own pipeline with the adapters loaded unfused, at their scales; uint8 like ours."""
    reference = StableDiffusionPipeline.from_pretrained(
        checkpoint_dir,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    reference.set_progress_bar_config(disable=True)
    for name in adapters:
        reference.load_lora_weights(str(adapters_dir / name), adapter_name=name)
    reference.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    generator = torch.Generator().manual_seed(4)
    image = reference(PROMPT, num_inference_steps=STEPS, generator=generator, output_type="np").images[0]
    return (image * 255).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("lora", "adapters"), [("ink:0.8", {"ink": 0.8}), ("glow:0.5, ink", {"ink": 1.0, "glow": 0.5})]
)
def test_images_equal_diffusers_with_the_same_adapters(pipe, tiny_checkpoint_dir, adapters_dir, lora, adapters) -> None:
    ours = pipe.generate(PROMPT, seed=4, lora=lora, cache_mode="bypass").image
    plain = pipe.generate(PROMPT, seed=4, cache_mode="bypass").image
    expected = _reference(tiny_checkpoint_dir, adapters_dir, adapters)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1  # fused vs unfused: float rounding only
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 10  # the adapters really change the image


def test_a_latent_is_reused_only_within_its_adapter_set(pipe) -> None:
    prompt = "a blue lighthouse at night"
    assert pipe.generate(prompt, seed=1, lora="ink:0.8").admitted > 0
    assert pipe.generate(prompt, seed=1, lora="ink:0.8").cache_hit
    assert not pipe.generate(prompt, seed=1, lora="ink:0.5").cache_hit  # another scale
    assert not pipe.generate(prompt, seed=1, lora="glow").cache_hit  # another adapter
    assert not pipe.generate(prompt, seed=1).cache_hit  # no adapter
    sets = [(), (("ink", 0.8),), (("ink", 0.5),), (("glow", 1.0),)]
    keys = {pipe.cache_key(STEPS, 7.5, AddOns(adapters=s)) for s in sets}
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("lora", "needle"),
    [
        ("sepia", "unknown adapter 'sepia'; available: ['glow', 'ink']"),
        ("ink:lots", "scale of 'ink' is not a number"),
        ("ink:3", "scale of 'ink' is 3.0: must be in (0, 2.0]"),
        ("ink:0", "must be in (0, 2.0]"),
        ("ink,ink:0.5", "adapter 'ink' is named twice"),
        ("ink,,glow", "empty entry"),
    ],
)
def test_a_bad_lora_value_is_an_error_naming_the_field(pipe, lora, needle) -> None:
    with pytest.raises(RequestError, match="LORA=") as err:
        pipe.generate(PROMPT, lora=lora, cache_mode="bypass")
    assert needle in str(err.value)


def test_a_corrupt_or_foreign_adapter_is_refused_at_start_naming_it(
    tiny_checkpoint, tiny_sdxl_dir, adapters_dir, tmp_path
) -> None:
    corrupt = tmp_path / "corrupt"
    (corrupt / "broken").mkdir(parents=True)
    (corrupt / "broken" / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=r"adapter 'broken' .* cannot be read"):
        AdapterLibrary(corrupt, tiny_checkpoint.unet)
    foreign = tmp_path / "foreign"
    make_tiny_lora(foreign / "xl", tiny_sdxl_dir)  # cross-attention reads 64-wide text, this UNet 32
    with pytest.raises(AdapterError, match=r"adapter 'xl': .*attn2.to_k down weight \(4, 64\) does not fit"):
        AdapterLibrary(foreign, tiny_checkpoint.unet)
    with pytest.raises(AdapterError, match="adapters folder does not exist"):
        AdapterLibrary(tmp_path / "nowhere", tiny_checkpoint.unet)


def test_merged_sets_are_kept_least_recently_used(tiny_checkpoint, adapters_dir) -> None:
    library = AdapterLibrary(adapters_dir, tiny_checkpoint.unet, max_loaded=1)
    try:
        ink = library.unet((("ink", 1.0),))
        assert library.unet((("ink", 1.0),)) is ink and len(library.load_seconds) == 1  # kept, not merged again
        library.unet((("glow", 1.0),))
        assert library.unet((("ink", 1.0),)) is not ink and len(library.load_seconds) == 3  # pushed out, merged again
        assert library.unet(()) is tiny_checkpoint.unet
    finally:
        library.close()


def test_a_failed_merge_is_an_error_and_is_tried_again(tiny_checkpoint, adapters_dir, monkeypatch) -> None:
    library = AdapterLibrary(adapters_dir, tiny_checkpoint.unet)
    calls = []

    def broken(adapters):  # a fault that cannot be caused otherwise (peft failing inside the merge)
        calls.append(adapters)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(library, "merge", broken)
    try:
        for _ in range(2):
            with pytest.raises(AdapterError, match="could not be merged: RuntimeError: out of memory"):
                library.unet((("ink", 1.0),))
        assert len(calls) == 2  # not cached as loaded
    finally:
        library.close()
