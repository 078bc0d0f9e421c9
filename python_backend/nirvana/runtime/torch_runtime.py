"""The checkpoint's torch modules: `TorchSubModels` in-process, `component_runner` for one served sub-model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from nirvana.checkpoint import Checkpoint

__all__ = ["TorchSubModels", "component_runner"]


def _plain_fp32(tensor: torch.Tensor) -> torch.Tensor:
    # Cloned outside inference mode: callers (schedulers, the cache) may update it in place, which an
    # inference tensor forbids.
    return tensor.float().cpu().clone()


class TorchSubModels:
    """Runs text encoder, UNet and VAE decoder of a :class:`Checkpoint` under ``torch.inference_mode()``.

    Inputs are cast to the modules' dtype and device; outputs come back as float32 CPU tensors.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.text_encoder = checkpoint.text_encoder
        self.unet_model = checkpoint.unet
        self.vae = checkpoint.vae
        # Mirrors StableDiffusionPipeline.encode_prompt: the mask is passed only when the config asks for it.
        self.use_attention_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` int64 → last hidden state ``[B, L, D]`` float32 (clip_skip None: ``output[0]``)."""
        device = self.text_encoder.device
        mask = attention_mask.to(device) if self.use_attention_mask and attention_mask is not None else None
        with torch.inference_mode():
            hidden = self.text_encoder(input_ids.to(device), attention_mask=mask)[0]
        return _plain_fp32(hidden)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Scaled latent ``[B, C, h, w]``, timestep ``[B]``, text ``[B, L, D]`` → noise prediction ``[B, C, h, w]``."""
        device, dtype = self.unet_model.device, self.unet_model.dtype
        with torch.inference_mode():
            out = self.unet_model(
                sample.to(device, dtype),
                timestep.to(device),
                encoder_hidden_states=encoder_hidden_states.to(device, dtype),
                return_dict=False,
            )[0]
        return _plain_fp32(out)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latent ``[B, C, h, w]`` → image ``[B, 3, H, W]`` in ≈[-1, 1], float32."""
        with torch.inference_mode():
            image = self.vae.decode(latent.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
        return _plain_fp32(image)


Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def component_runner(component: str, checkpoint_dir: str | Path, device: str, dtype: torch.dtype) -> Runner:
    """One sub-model of a diffusers checkpoint as ``{input: tensor} → {output: tensor}`` under the Triton names of
    `nirvana.specs` (outputs float32, on ``device``). Loads only that component's weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(checkpoint_dir)
    if component == "text_encoder":
        encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
        return lambda feeds: {"last_hidden_state": encoder(feeds["input_ids"].to(device))[0].float()}
    if component == "unet":
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device).eval()

        def run_unet(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = unet(
                feeds["sample"].to(device, dtype),
                feeds["timestep"].reshape(-1).to(device),  # one timestep per row
                encoder_hidden_states=feeds["encoder_hidden_states"].to(device, dtype),
                return_dict=False,
            )[0]
            return {"noise_pred": out.float()}

        return run_unet
    if component == "vae_decoder":
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype).to(device).eval()
        return lambda feeds: {"image": vae.decode(feeds["latent"].to(device, dtype), return_dict=False)[0].float()}
    raise ValueError(f"component={component!r}: choose text_encoder, unet or vae_decoder")
