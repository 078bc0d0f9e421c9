"""CLIP-style pre-training of the shapes model's text encoder, before the UNet learns to use it.

Trained from random weights through the diffusion loss alone, the text encoder stayed uninformative for the
whole CPU budget: after 1,440 UNet steps the noise predictions for "a small red circle top left, white" and "a
large blue square bottom right, black" differed by 0.6-1.2% of their size (t = 900 … 100), and generated
scenes matched their prompts at chance (position 21.6% right, 5 choices). A contrastive objective (InfoNCE,
as CLIP) pairs each caption with its image's VAE latent, so within a few hundred cheap steps paraphrases land
together and every attribute word moves the embedding; the UNet then starts from text features that already
say what to draw.

The image side is a small CNN on the ``[4, 16, 16]`` latents (it keeps position: no global pooling); it and both
projection heads are thrown away afterwards. Only the text encoder is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from nirvana_dev.shapes import scenes as shapes

__all__ = ["LatentImageEncoder", "contrastive_loss", "pretrain_text_encoder"]


class LatentImageEncoder(nn.Module):
    """``[B, 4, 16, 16]`` latent → ``[B, dim]`` embedding; strided convolutions, then a linear layer over the map."""

    def __init__(self, channels: int = 4, dim: int = 64, size: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(128 * (size // 4) ** 2, dim),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, same: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; ``same[i, j]`` marks pairs showing the same scene (both count as positives)."""
    logits = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T * scale.exp().clamp(max=100.0)
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    text_to_image = (targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    image_to_text = (targets * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return -0.5 * (text_to_image + image_to_text)


def pretrain_text_encoder(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: torch.Tensor,
    scenes: Sequence[shapes.Scene],
    *,
    keep_going: Callable[[int], bool],
    on_step: Callable[[float], None],
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: str = "cpu",
) -> int:
    """Train ``text_encoder`` in place while ``keep_going(steps_done)``; ``on_step(loss)`` after each step.

    ``latents`` are the (scaled) VAE latents of ``scenes``' images. Returns the number of steps run.
    """
    torch.manual_seed(seed)
    width = text_encoder.config.hidden_size
    image_encoder = LatentImageEncoder(latents.shape[1], width, latents.shape[-1]).to(device)
    text_head = nn.Linear(width, width).to(device)
    scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32, device=device))
    text_encoder.to(device).train()
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *text_head.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    keys = np.array([hash(scene) for scene in scenes])
    steps = 0
    while keep_going(steps):
        index = rng.integers(len(scenes), size=batch_size)
        captions = [shapes.caption(scenes[i], rng) for i in index]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        text = text_head(text_encoder(ids).pooler_output)
        image = image_encoder(latents[torch.from_numpy(index)].to(device))
        same = torch.from_numpy(keys[index][:, None] == keys[index][None, :]).to(device)
        loss = contrastive_loss(text, image, same, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        on_step(float(loss.detach()))
    text_encoder.eval()
    return steps
