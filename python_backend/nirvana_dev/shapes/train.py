"""Train a small latent diffusion model on the shapes task, on a CPU, within a time budget; resumable.

Phases, each with a share of ``minutes`` (the whole run, judge included, stays inside it):

1. tokenizer: a CLIP BPE learned from the captions' vocabulary (every word one token);
2. VAE: ``AutoencoderKL`` 64×64×3 → 16×16×4 on the posterior mean, MSE + L1 weighted ×10 on the shape, a tiny
   KL term, decaying LR; the latent scaling factor is 1/std of the pool's latents, as SD 1.x's 0.18215 was chosen;
3. text encoder, CLIP-style, against the VAE latents (:mod:`nirvana_dev.shapes.text_pretrain`);
4. UNet + text encoder, jointly, on ε-prediction with min-SNR-γ weighting, 10% empty captions (so classifier-free
   guidance works), an EMA of the UNet weights (diffusers' ``EMAModel``; the EMA weights are the ones saved);
5. the attribute judge (:mod:`nirvana_dev.shapes.judge`), unless ``DIR/judge`` exists.

Resuming (the default) reloads ``DIR/training/state.pt``: an interrupted run picks up where its last save was, and
a finished one trains its UNet on if given a larger ``minutes`` (or step cap).

The result is a diffusers folder (``StableDiffusionPipeline.save_pretrained``, DDIM scheduler) that ``nirvana serve
--checkpoint DIR`` serves unchanged; ``DIR/judge`` holds the judge, ``DIR/training`` the resumable state
(``state.pt``, written every ``save_every_s`` and at each phase end).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from nirvana_dev.shapes import scenes as shapes
from nirvana_dev.shapes.text_pretrain import pretrain_text_encoder
from nirvana_dev.tiny_model import build_clip_tokenizer, clip_text_encoder, sd15_scheduler_config

__all__ = ["TrainConfig", "train_model"]

log = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 32  # the longest caption is ≈ 22 tokens with its start/end tokens
_STATE = "training/state.pt"
# Everything of a _Run but its modules: progress, optimiser states, losses.
_SCALARS = (
    *("phase", "vae_step", "clip_step", "unet_step", "elapsed_s", "scaling_factor"),
    *("vae_opt", "unet_opt", "losses"),
)


@dataclass(frozen=True)
class TrainConfig:
    """Budget and sizes. ``max_*_steps`` cap a phase by steps (tests); otherwise time decides."""

    minutes: float = 26.0
    seed: int = 0
    batch_size: int = 32
    vae_batch_size: int = 8
    # A fourth (2x2) level learnt position worse in equal GPU time (0.42 vs 0.93 with three levels).
    unet_channels: tuple[int, ...] = (32, 64, 64)
    pool_size: int = 16384
    vae_share: float = 0.25
    clip_share: float = 0.08
    judge_share: float = 0.07
    lr: float = 1e-3
    vae_lr: float = 2e-3
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    save_every_s: float = 60.0
    max_vae_steps: int | None = None
    max_clip_steps: int | None = None
    max_unet_steps: int | None = None
    judge_steps: int | None = None
    # "epsilon" (SD 1.x) or "v_prediction" (SD 2.x); the saved scheduler says which. With ε and min-SNR-γ the loss
    # weighs a noisy step's x0 error by its SNR (0.09 at t = 700), so where a shape goes, decided in DDIM's first
    # steps, is learnt last; with v it is weighted min(SNR + 1, γ): at least 1 at every t. On this 2-core CPU in
    # 27 minutes: v 0.973 uncached accuracy (position 0.988), ε 0.619 (position 0.20, chance) in docs/caching.md's run.
    prediction_type: str = "epsilon"
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True


# --- modules -------------------------------------------------------------------------------------------------


def _make_tokenizer(out: Path) -> CLIPTokenizer:
    return build_clip_tokenizer(out, shapes.vocabulary(), n_merges=4000, max_length=TEXT_MAX_LENGTH)


def _make_modules(
    tokenizer: CLIPTokenizer, unet_channels: tuple[int, ...]
) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    text_encoder = clip_text_encoder(tokenizer, hidden_size=64, intermediate_size=128, heads=4)
    attention_levels = len(unet_channels) - 1  # the full-resolution level has none: it is the costliest on a CPU
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
        # An attention-pooled summary of the text joins the timestep embedding, so colour, shape and background
        # reach every ResNet block, not only the cross-attention layers; it is computed from the same
        # encoder_hidden_states, so the UNet's inputs (and the served tensor contract) stay SD's.
        addition_embed_type="text",
        encoder_hid_dim=64,
    )
    vae = AutoencoderKL(  # 16 channels at full resolution: the shapes are flat colours, and CPU time is scarce
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,  # flat shapes need no global attention; it costs CPU time
        sample_size=64,
    )
    return text_encoder, unet, vae


# --- state -----------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything a resumed run needs; ``elapsed_s`` counts time spent in earlier attempts too."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    ema: EMAModel  # of the UNet's parameters
    phase: str = "vae"
    vae_step: int = 0
    clip_step: int = 0
    unet_step: int = 0
    elapsed_s: float = 0.0
    scaling_factor: float = 1.0
    vae_opt: dict | None = None
    unet_opt: dict | None = None
    losses: dict | None = None

    def save(self, out: Path, config: TrainConfig) -> None:
        path = out / _STATE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(config),
            "modules": {n: getattr(self, n).state_dict() for n in ("text_encoder", "unet", "vae", "ema")},
            **{k: getattr(self, k) for k in _SCALARS},
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a kill mid-save leaves the previous state intact

    @classmethod
    def start(cls, out: Path, tokenizer: CLIPTokenizer, config: TrainConfig, resume: bool) -> _Run:
        torch.manual_seed(config.seed)
        text_encoder, unet, vae = _make_modules(tokenizer, config.unet_channels)
        # foreach: one fused update per step instead of one per tensor (hundreds of launches less on a GPU).
        ema = EMAModel(unet.parameters(), decay=config.ema_decay, foreach=True)
        run = cls(text_encoder, unet, vae, ema=ema, losses={})
        path = out / _STATE
        if resume and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            modules = state.pop("modules")
            for name in ("text_encoder", "unet", "vae"):
                getattr(run, name).load_state_dict(modules[name])
            _load_ema(run.ema, modules["ema"], unet, state["unet_step"], config.ema_decay)
            state.pop("config")
            for key, value in state.items():
                setattr(run, key, value)
            log.info("resuming %s at phase %s (%.0f s spent)", path, run.phase, run.elapsed_s)
        return run


def _load_ema(ema: EMAModel, saved: dict, unet: UNet2DConditionModel, unet_step: int, decay: float) -> None:
    """Restore ``ema`` from ``saved``: an ``EMAModel.state_dict()``, or the UNet-shaped module state that runs saved
    before the EMA was diffusers' (its parameters in ``unet.named_parameters()`` order, one update per UNet step)."""
    if "shadow_params" not in saved:
        names = [name for name, _ in unet.named_parameters()]
        saved = {"shadow_params": [saved[name] for name in names], "optimization_step": unet_step}
    ema.load_state_dict(saved)
    ema.decay = decay  # this run's setting, as for the learning rate, not the one saved


# --- training phases ---------------------------------------------------------------------------------------------


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Clock:
    """Wall-clock budget of one phase, continuing ``run.elapsed_s``; saves the run every ``save_every_s``."""

    def __init__(self, run: _Run, out: Path, config: TrainConfig, budget_s: float, desc: str) -> None:
        self.run, self.out, self.config, self.budget_s = run, out, config, budget_s
        self.start = time.perf_counter()
        self.phase_start = run.elapsed_s
        self.last_save = self.start
        self.bar = tqdm(total=round(budget_s), desc=desc, unit="s", disable=not config.progress, leave=True)

    def tick(self, **postfix: float) -> None:
        now = time.perf_counter()
        self.run.elapsed_s += now - self.start
        self.start = now
        self.bar.n = min(round(self.run.elapsed_s - self.phase_start), self.bar.total)
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()}, refresh=True)
        if now - self.last_save >= self.config.save_every_s:
            self.run.save(self.out, self.config)
            self.last_save = now

    def fraction(self) -> float:
        return (self.run.elapsed_s - self.phase_start) / max(self.budget_s, 1e-9)

    def close(self) -> None:
        self.bar.close()


def _train_vae(run: _Run, pool: torch.Tensor, out: Path, config: TrainConfig, budget_s: float) -> None:
    vae = run.vae.to(config.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    if run.vae_opt:
        opt.load_state_dict(run.vae_opt)
    gen = torch.Generator().manual_seed(config.seed + run.vae_step)
    clock = _Clock(run, out, config, budget_s, "vae")
    while clock.fraction() < 1.0 and run.vae_step < (config.max_vae_steps or math.inf):
        batch = pool[torch.randint(len(pool), (config.vae_batch_size,), generator=gen)].to(config.device)
        posterior = vae.encode(batch).latent_dist
        # The mean, not a sample: with minutes of CPU, sampling noise keeps the decoder blurry and its colours
        # washed out (a judge read 23% of colours right after 300 such steps). The UNet is trained on means too.
        recon = vae.decode(posterior.mean).sample
        weight = _foreground_weight(batch)
        loss = ((recon - batch).pow(2) + (recon - batch).abs()).mul(weight).mean() + 1e-6 * posterior.kl().mean()
        # Decayed, not constant: at a constant 3e-3 the shapes' colours drifted (a judge read 48% of them right
        # after 624 steps and 35% after 1,449).
        _set_lr(opt, config.vae_lr, run.vae_step, clock.fraction())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.vae_step += 1
        run.vae_opt = opt.state_dict()
        run.losses["vae_mse"] = float(F.mse_loss(recon.detach(), batch))
        clock.tick(mse=run.losses["vae_mse"])
    clock.close()
    vae.eval().to("cpu")


def _foreground_weight(images: torch.Tensor, boost: float = 10.0) -> torch.Tensor:
    """``[B, 1, H, W]`` loss weights: ``boost`` where a pixel differs from the image's border colour (the shape).

    A shape covers 4-16% of the image; unweighted, its colour barely moves the loss and a briefly trained
    decoder paints every shape grey (the judge then read 18% of colours right).
    """
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    foreground = (images - background).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (boost - 1.0) * foreground.float()


@torch.no_grad()
def _encode_pool(vae: AutoencoderKL, pool: torch.Tensor, device: str) -> torch.Tensor:
    vae = vae.to(device)
    latents = [vae.encode(chunk.to(device)).latent_dist.mean.cpu() for chunk in pool.split(256)]
    vae.to("cpu")
    return torch.cat(latents)


def _captions_batch(scenes: list[shapes.Scene], rng: np.random.Generator, dropout: float) -> list[str]:
    return ["" if rng.random() < dropout else shapes.caption(scene, rng) for scene in scenes]


def _min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """``[B]`` loss weights. ε: min(SNR, γ) / SNR, min-SNR-γ (Hang et al., 2023) as diffusers'
    ``train_text_to_image.py`` computes it. v: min(SNR + 1, γ) / (SNR + 1), i.e. an x0 error weighted
    min(SNR + 1, γ) — at least 1 at the noisiest steps (diffusers' v form, min(SNR, γ) / (SNR + 1), weights them by
    SNR like ε does) — the plain v-loss of SD 2.x with its nearly clean steps capped."""
    snr = compute_snr(scheduler, timesteps)
    if prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def _train_unet(
    run: _Run,
    latents: torch.Tensor,
    scenes: list[shapes.Scene],
    tokenizer: CLIPTokenizer,
    out: Path,
    config: TrainConfig,
    end_s: float,
) -> None:
    """Trains until ``run.elapsed_s`` reaches ``end_s`` (or the step cap); the LR schedule spans the whole phase."""
    device = config.device
    unet, text_encoder, ema = run.unet.to(device).train(), run.text_encoder.to(device).train(), run.ema
    ema.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    if run.unet_opt:
        opt.load_state_dict(run.unet_opt)
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, got {config.prediction_type!r}")
    noise_scheduler = DDPMScheduler.from_config(sd15_scheduler_config(config.prediction_type))
    rng = np.random.default_rng(config.seed + 1_000_003 * (run.unet_step + 1))
    gen = torch.Generator().manual_seed(config.seed + run.unet_step)
    clock = _Clock(run, out, config, max(end_s - run.elapsed_s, 0.0), "unet+text")
    while run.elapsed_s < end_s and run.unet_step < (config.max_unet_steps or math.inf):
        index = torch.randint(len(latents), (config.batch_size,), generator=gen)
        x0 = (latents[index] * run.scaling_factor).to(device)
        ids = tokenizer(
            _captions_batch([scenes[i] for i in index.tolist()], rng, config.cfg_dropout),
            padding="max_length",
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t.to(device))
        pred = unet(noisy, t.to(device), text_encoder(ids)[0]).sample
        v = config.prediction_type == "v_prediction"
        target = noise_scheduler.get_velocity(x0, noise, t.to(device)) if v else noise
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        weights = _min_snr_weights(noise_scheduler, t, config.min_snr_gamma, config.prediction_type)
        loss = (per_sample * weights.to(device)).mean()
        _set_lr(opt, config.lr, run.unet_step, run.elapsed_s / end_s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.unet_step += 1
        ema.step(unet.parameters())  # decay min(ema_decay, (1 + s) / (10 + s)) after s > 0 earlier updates, else 0
        run.unet_opt = opt.state_dict()
        value = float(loss.detach())
        run.losses["unet"] = 0.98 * run.losses.get("unet", value) + 0.02 * value
        clock.tick(loss=run.losses["unet"])
    clock.close()
    for module in (unet, text_encoder):
        module.eval().to("cpu")
    ema.to("cpu")


def _set_lr(opt: torch.optim.Optimizer, peak: float, step: int, progress: float) -> None:
    """Linear warm-up over 200 steps, then cosine decay to 10% of ``peak`` as ``progress`` goes 0 → 1."""
    scale = min(1.0, (step + 1) / 200) * (0.55 + 0.45 * math.cos(math.pi * min(progress, 1.0)))
    for group in opt.param_groups:
        group["lr"] = peak * scale


# --- output ------------------------------------------------------------------------------------------------------


def _save_pipeline(run: _Run, tokenizer: CLIPTokenizer, out: Path, prediction_type: str = "epsilon") -> None:
    run.vae.register_to_config(scaling_factor=run.scaling_factor)
    ema_unet = copy.deepcopy(run.unet)
    run.ema.copy_to(ema_unet.parameters())
    pipe = StableDiffusionPipeline(
        vae=run.vae,
        text_encoder=run.text_encoder,
        tokenizer=tokenizer,
        unet=ema_unet,
        scheduler=DDIMScheduler(**sd15_scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(out_dir: str | Path, config: TrainConfig | None = None, *, resume: bool = True) -> dict:
    """Train (or resume) the shapes model into ``out_dir``; returns a report (steps, losses, seconds)."""
    config = config or TrainConfig()
    if config.minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {config.minutes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = config.minutes * 60
    with _threads(config.threads):
        tokenizer = _make_tokenizer(out)
        run = _Run.start(out, tokenizer, config, resume)
        data = shapes.make_dataset(config.pool_size, seed=config.seed)
        pool = _to_tensor(data.images)
        if run.phase == "vae":  # the UNet learns on the VAE's latents: the VAE is trained once, first
            _train_vae(run, pool, out, config, config.vae_share * budget)
            run.phase = "clip"
            run.save(out, config)
        latents = _encode_pool(run.vae, pool, config.device)
        run.scaling_factor = float(1.0 / latents.std())
        if run.phase == "clip":  # an interrupted pre-training restarts (its heads are not saved); it is short
            _pretrain_text(run, latents, data.scenes, tokenizer, out, config, config.clip_share * budget)
            run.phase = "unet"
            run.save(out, config)
        # Continues whenever the budget (or step cap) allows more: a resumed run with a larger --minutes trains on.
        has_judge = (out / "judge").is_dir()  # copied in, or trained by an earlier run: its share goes to the UNet
        unet_share = 1 - (0 if has_judge else config.judge_share)
        _train_unet(run, latents, data.scenes, tokenizer, out, config, budget * unet_share)
        run.save(out, config)
        _save_pipeline(run, tokenizer, out, config.prediction_type)
        judge_report = _train_judge(out, config, budget - run.elapsed_s) if not has_judge else {}
    return {
        "out": str(out),
        "vae_steps": run.vae_step,
        "clip_steps": run.clip_step,
        "unet_steps": run.unet_step,
        "scaling_factor": run.scaling_factor,
        "losses": run.losses,
        "train_seconds": run.elapsed_s,
        "judge": judge_report,
    }


def _pretrain_text(
    run: _Run,
    latents: torch.Tensor,
    scenes: list[shapes.Scene],
    tokenizer: CLIPTokenizer,
    out: Path,
    config: TrainConfig,
    budget_s: float,
) -> None:
    clock = _Clock(run, out, config, budget_s, "text (CLIP-style)")

    def on_step(loss: float) -> None:
        run.clip_step += 1
        run.losses["clip"] = loss
        clock.tick(loss=loss)

    pretrain_text_encoder(
        run.text_encoder,
        tokenizer,
        latents * run.scaling_factor,
        scenes,
        keep_going=lambda done: clock.fraction() < 1.0 and done < (config.max_clip_steps or math.inf),
        on_step=on_step,
        seed=config.seed,
        device=config.device,
    )
    clock.close()
    run.text_encoder.to("cpu")


def _train_judge(out: Path, config: TrainConfig, budget_s: float) -> dict:
    from nirvana_dev.shapes.judge import train_judge

    start = time.perf_counter()
    steps = {} if config.judge_steps is None else {"steps": config.judge_steps}  # None: the judge's default, timed
    judge, report = train_judge(
        seed=config.seed, progress=config.progress, max_seconds=max(budget_s, 10.0), device=config.device, **steps
    )
    judge.save(out / "judge")
    report["seconds"] = time.perf_counter() - start
    return report
