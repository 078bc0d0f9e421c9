"""The shapes model trains into a checkpoint the engine loads and generates with; training resumes."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana.checkpoint import load_checkpoint
from nirvana.denoise import decode, denoise, encode_prompts, initial_latent, make_scheduler
from nirvana.runtime.torch_runtime import TorchSubModels
from nirvana_dev.shapes.judge import Judge
from nirvana_dev.shapes.train import TEXT_MAX_LENGTH, TrainConfig, train_model

TOY = TrainConfig(
    minutes=10,
    pool_size=64,
    batch_size=4,
    max_vae_steps=2,
    max_clip_steps=2,
    max_unet_steps=3,
    judge_steps=3,
    progress=False,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_model")
    return out, train_model(out, TOY)


def test_toy_training_writes_a_loadable_checkpoint_that_generates_an_image(trained):
    out, report = trained
    assert (report["vae_steps"], report["clip_steps"], report["unet_steps"]) == (2, 2, 3)
    assert report["scaling_factor"] > 0 and np.isfinite(report["losses"]["unet"])
    checkpoint = load_checkpoint(out)
    assert checkpoint.image_size == (64, 64) and checkpoint.latent_size == (16, 16)
    assert checkpoint.text_max_length == TEXT_MAX_LENGTH
    assert checkpoint.scaling_factor == pytest.approx(report["scaling_factor"])
    # Every caption word is a single token: the tokenizer was built from the dataset's vocabulary.
    assert checkpoint.tokenizer.tokenize("upper-left corner: a little crimson disc") == [
        "upper</w>", "-</w>", "left</w>", "corner</w>", ":</w>", "a</w>", "little</w>", "crimson</w>", "disc</w>"
    ]  # fmt: skip
    models = TorchSubModels(checkpoint)
    scheduler = make_scheduler("ddim", checkpoint.scheduler_config)
    import torch

    gen = torch.Generator().manual_seed(0)
    latent = initial_latent((1, 4, 16, 16), gen, scheduler, num_steps=4)
    text = encode_prompts(checkpoint.tokenizer, models, "a small red circle in the centre on a white background")
    image = decode(models, denoise(models, scheduler, 4, text, 7.5, generator=gen, latent=latent).latent, 1.0)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    judge = Judge.load(out / "judge")
    assert len(judge.predict((image * 255).astype(np.uint8)[None])) == 1


def test_resumed_training_continues_from_the_saved_state(trained, tmp_path):
    out, _ = trained
    more = train_model(out, TrainConfig(**{**TOY.__dict__, "max_unet_steps": 5}))
    assert (more["vae_steps"], more["unet_steps"]) == (2, 5)  # VAE not retrained, UNet continued 3 → 5
    fresh = train_model(out, TrainConfig(**{**TOY.__dict__, "max_unet_steps": 1}), resume=False)
    assert (fresh["vae_steps"], fresh["unet_steps"]) == (2, 1)


def test_the_checkpoint_serves_the_ema_of_the_unet(trained):
    import torch
    from diffusers import UNet2DConditionModel

    out, _ = trained
    state = torch.load(out / "training" / "state.pt", weights_only=False)["modules"]
    served = UNet2DConditionModel.from_pretrained(out / "unet")
    names = [name for name, _ in served.named_parameters()]
    assert all(torch.equal(p, e) for p, e in zip(served.parameters(), state["ema"]["shadow_params"], strict=True))
    assert not all(torch.equal(state["unet"][n], e) for n, e in zip(names, state["ema"]["shadow_params"], strict=True))


def test_a_non_positive_budget_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="minutes must be > 0, got 0"):
        train_model(tmp_path, TrainConfig(minutes=0))


def test_the_trained_checkpoint_exports_to_onnx_that_matches_torch(trained, tmp_path):
    from nirvana_export.onnx_export import export_all

    out, _ = trained
    paths = export_all(out, tmp_path / "onnx")  # raises ExportCheckError when ONNX and torch disagree
    assert set(paths) == {"text_encoder", "prompt_embedder", "unet", "vae_decoder"}


def test_contrastive_loss_is_low_for_matching_captions_and_counts_same_scenes_as_positives():
    import torch

    from nirvana_dev.shapes.text_pretrain import contrastive_loss

    torch.manual_seed(0)
    emb = torch.randn(8, 16)
    scale = torch.tensor(np.log(1 / 0.07))
    eye = torch.eye(8, dtype=torch.bool)
    matched, shuffled = contrastive_loss(emb, emb, eye, scale), contrastive_loss(emb, emb.roll(1, 0), eye, scale)
    assert matched < 0.01 < 1.0 < shuffled
    # Rows 0 and 1 show the same scene: counted as positives, telling them apart is penalised, not rewarded.
    twin = emb.clone()
    twin[1] = twin[0]
    same = eye.clone()
    same[0, 1] = same[1, 0] = True
    assert contrastive_loss(twin, twin, same, scale) < contrastive_loss(emb, emb, same, scale)
    assert contrastive_loss(twin, twin, eye, scale) > contrastive_loss(emb, emb, eye, scale)


def test_v_prediction_training_saves_a_v_prediction_checkpoint_and_weights_noisy_steps(tmp_path):
    import torch
    from diffusers import DDPMScheduler

    from nirvana_dev.shapes.train import _min_snr_weights
    from nirvana_dev.tiny_model import sd15_scheduler_config

    report = train_model(tmp_path, TrainConfig(**{**TOY.__dict__, "prediction_type": "v_prediction"}))
    assert np.isfinite(report["losses"]["unet"])
    assert load_checkpoint(tmp_path).prediction_type == "v_prediction"
    scheduler = DDPMScheduler.from_config(sd15_scheduler_config("v_prediction"))
    t = torch.tensor([10, 500, 800, 999])
    eps, v = (_min_snr_weights(scheduler, t, 5.0, kind) for kind in ("epsilon", "v_prediction"))
    snr = (scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])).float()
    # in x0 terms (ε loss = SNR·x0 error, v loss = (SNR + 1)·x0 error): ε weighs a noisy step by its SNR, v by ≥ 1
    assert (eps * snr)[2:].max() < 0.1 and ((v * (snr + 1)) >= 1 - 1e-5).all()
    assert ((v * (snr + 1)) <= 5 + 1e-5).all()
