"""The checkpoint's torch modules: `TorchSubModels` in-process, `component_runner` for one served sub-model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nirvana.addons.controlnet_graphs import ControlNetGraph, UNetControlGraph
from nirvana.checkpoint import Checkpoint
from nirvana.contract.controlnet import CONTROLNET_PREFIX, UNET_CONTROL_MODEL, residual_names
from nirvana.contract.specs import PENULTIMATE

__all__ = ["TorchSubModels", "component_runner"]


def plain_fp32(tensor: torch.Tensor) -> torch.Tensor:
    # Cloned outside inference mode: callers (schedulers, the cache) may update it in place, which an
    # inference tensor forbids.
    return tensor.float().cpu().clone()


# The three module calls, shared by the in-process SubModels and the served torch profile: inputs cast to the
# module's device and dtype, the raw output returned (callers decide where it goes and in which dtype).
def call_text_encoder(
    encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Token ids ``[B, L]`` → last hidden state ``[B, L, D]`` (clip_skip None: ``output[0]``)."""
    mask = None if attention_mask is None else attention_mask.to(encoder.device)
    return encoder(input_ids.to(encoder.device), attention_mask=mask)[0]


def call_unet(
    unet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    added_cond: dict[str, torch.Tensor] | None = None,
    residuals: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Scaled latent ``[B, C, h, w]``, timestep ``[B]``, text ``[B, L, D]`` (SDXL: and ``added_cond``; with a
    ControlNet, its ``residuals``) → noise prediction ``[B, C, h, w]``."""
    device, dtype = unet.device, unet.dtype
    added = None if added_cond is None else {k: v.to(device, dtype) for k, v in added_cond.items()}
    return unet(
        sample.to(device, dtype),
        timestep.to(device),
        encoder_hidden_states=text.to(device, dtype),
        added_cond_kwargs=added,
        return_dict=False,
        **(residuals or {}),
    )[0]


def call_text_encoders_sdxl(
    encoder: Any, encoder_2: Any, input_ids: torch.Tensor, input_ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: both encoders' penultimate hidden states side by side ``[B, L, D1 + D2]`` (clip_skip None), and the
    second encoder's pooled projection ``text_embeds [B, P]``, as ``StableDiffusionXLPipeline.encode_prompt``."""
    first = encoder(input_ids.to(encoder.device), output_hidden_states=True)
    second = encoder_2(input_ids_2.to(encoder_2.device), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].device)], -1)
    return hidden, second.text_embeds


def call_vae_decoder(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """Unscaled VAE latent ``[B, C, h, w]`` → image ``[B, 3, H, W]`` in ≈[-1, 1]."""
    return vae.decode(latent.to(vae.device, vae.dtype), return_dict=False)[0]


class TorchSubModels:
    """Runs text encoder, UNet and VAE decoder of a :class:`Checkpoint` under ``torch.inference_mode()``.

    Inputs are cast to the modules' dtype and device; outputs come back as float32 CPU tensors.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.text_encoder = checkpoint.text_encoder
        self.text_encoder_2 = checkpoint.text_encoder_2  # SDXL only
        self.unet_model = checkpoint.unet
        self.vae = checkpoint.vae
        # Mirrors StableDiffusionPipeline.encode_prompt: the mask is passed only when the config asks for it.
        self.use_attention_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` int64 → last hidden state ``[B, L, D]`` float32."""
        mask = attention_mask if self.use_attention_mask else None
        with torch.inference_mode():
            return plain_fp32(call_text_encoder(self.text_encoder, input_ids, mask))

    def with_unet(self, unet: torch.nn.Module) -> TorchSubModels:
        """The same sub-models around another UNet (one with LoRA adapters fused in, `nirvana.addons.lora`)."""
        other = copy.copy(self)
        other.unet_model = unet
        return other

    def encode_text_pair(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: token ids of both tokenizers ``[B, L]`` → ``(hidden [B, L, D1 + D2], text_embeds [B, P])``."""
        if self.text_encoder_2 is None:
            raise TypeError("encode_text_pair needs an SDXL checkpoint (text_encoder_2)")
        with torch.inference_mode():
            hidden, pooled = call_text_encoders_sdxl(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)
            return plain_fp32(hidden), plain_fp32(pooled)

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
        residuals: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Scaled latent ``[B, C, h, w]``, timestep ``[B]``, text ``[B, L, D]`` → noise prediction ``[B, C, h, w]``."""
        with torch.inference_mode():
            return plain_fp32(
                call_unet(self.unet_model, sample, timestep, encoder_hidden_states, added_cond, residuals)
            )

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latent ``[B, C, h, w]`` → image ``[B, 3, H, W]`` in ≈[-1, 1], float32."""
        with torch.inference_mode():
            return plain_fp32(call_vae_decoder(self.vae, latent))


Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def component_runner(
    component: str,
    checkpoint_dir: str | Path,
    device: str,
    dtype: torch.dtype,
    *,
    controlnet: str | Path | None = None,
    lora: tuple[str | Path, str] | None = None,
) -> Runner:
    """One sub-model of a diffusers checkpoint as ``{input: tensor} → {output: tensor}`` under the Triton names of
    `nirvana.contract.specs` (outputs float32, on ``device``). Loads only that component's weights.

    Served add-ons: ``unet_control`` is the UNet with ControlNet residual inputs, ``controlnet_<name>`` the ControlNet
    in folder ``controlnet`` (`nirvana.contract.controlnet`); ``lora`` = (adapters folder, ``LORA`` text) fuses that
    adapter set into ``unet`` or ``unet_control`` (a set's model, loaded by the `adapters` model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(checkpoint_dir)
    if (root / "transformer").is_dir():  # SD 3.x, FLUX.1
        from nirvana.runtime.torch_dit import dit_component_runner

        return dit_component_runner(component, root, device, dtype)
    sdxl = (root / "text_encoder_2").is_dir()
    if component.startswith(CONTROLNET_PREFIX):
        if controlnet is None:
            raise ValueError(f"component={component!r} needs its ControlNet folder")
        return _controlnet_runner(Path(controlnet), device, dtype)
    if component == UNET_CONTROL_MODEL:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device).eval()
        return _unet_control_runner(unet if lora is None else _fused(unet, *lora), device)
    if component in ("text_encoder", "text_encoder_2"):
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        encoder = cls.from_pretrained(root / component, torch_dtype=dtype).to(device).eval()
        if not sdxl:
            return lambda feeds: {"last_hidden_state": call_text_encoder(encoder, feeds["input_ids"]).float()}
        return lambda feeds: _penultimate(encoder(feeds["input_ids"].to(device), output_hidden_states=True))
    if component == "unet":
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype).to(device).eval()
        unet = unet if lora is None else _fused(unet, *lora)
        added = ("text_embeds", "time_ids") if sdxl else ()
        return lambda feeds: {  # Triton sends one timestep per row as [rows, 1]
            "noise_pred": call_unet(
                unet,
                feeds["sample"],
                feeds["timestep"].reshape(-1),
                feeds["encoder_hidden_states"],
                {name: feeds[name] for name in added} or None,
            ).float()
        }
    if component == "vae_decoder":
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype).to(device).eval()
        return lambda feeds: {"image": call_vae_decoder(vae, feeds["latent"]).float()}
    raise ValueError(f"component={component!r}: choose text_encoder, text_encoder_2, unet or vae_decoder")


def _fused(unet: torch.nn.Module, adapters_dir: str | Path, lora: str) -> torch.nn.Module:
    """``unet`` with the adapter set ``lora`` of ``adapters_dir`` fused in (`nirvana.addons.lora`)."""
    from nirvana.addons.lora import AdapterLibrary

    library = AdapterLibrary(adapters_dir, unet, max_loaded=1, strict=False)
    return library.merge(library.parse(lora))


def _unet_control_runner(unet: torch.nn.Module, device: str) -> Runner:
    graph = UNetControlGraph(unet)

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = residual_names(sum(1 for name in feeds if "residual" in name))
        inputs = (feeds["sample"], feeds["timestep"].reshape(-1), feeds["encoder_hidden_states"])
        inputs += tuple(feeds[name] for name in names)
        return {"noise_pred": graph(*(t.to(device) for t in inputs))}

    return run


def _controlnet_runner(folder: Path, device: str, dtype: torch.dtype) -> Runner:
    from diffusers import ControlNetModel

    graph = ControlNetGraph(ControlNetModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval())
    names = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale")

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = [feeds[name].to(device) for name in names]
        inputs[1], inputs[4] = inputs[1].reshape(-1), inputs[4].reshape(-1)  # per row, as [rows]
        residuals = graph(*inputs)
        return dict(zip(residual_names(len(residuals)), residuals, strict=True))

    return run


def _penultimate(out: Any) -> dict[str, torch.Tensor]:
    """SDXL's served text encoders: the penultimate hidden state, and the second's pooled projection."""
    found = {PENULTIMATE: out.hidden_states[-2].float()}
    if getattr(out, "text_embeds", None) is not None:
        found["text_embeds"] = out.text_embeds.float()
    return found
