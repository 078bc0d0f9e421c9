"""SD 3.x and FLUX.1 in process: their torch modules behind the `SubModels` calls (`nirvana.dit.modules`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nirvana.checkpoint import Checkpoint, model_family, read_json
from nirvana.checkpoint.dit import DIT_FAMILIES, DitCheckpoint
from nirvana.contract.dit import LAST
from nirvana.contract.specs import PENULTIMATE
from nirvana.dit.modules import call_dit_encoders, call_transformer
from nirvana.runtime.torch_runtime import Runner, TorchSubModels, call_vae_decoder, plain_fp32

__all__ = ["TorchDitModels", "dit_component_runner", "in_process_models"]


class TorchDitModels(TorchSubModels):
    """:class:`TorchSubModels` of a :class:`DitCheckpoint`: ``unet`` runs the transformer, ``encode_dit`` the text
    encoders; the VAE decoder is the same call."""

    def __init__(self, checkpoint: DitCheckpoint) -> None:
        super().__init__(checkpoint)
        self.family = checkpoint.family
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        self.encoders = {name: getattr(checkpoint, name) for name in names if getattr(checkpoint, name) is not None}

    def encode_dit(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` by tokenizer folder → ``(hidden [B, T, D], pooled [B, P])`` float32."""
        with torch.inference_mode():
            hidden, pooled = call_dit_encoders(self.family, self.encoders, tokens)
            return plain_fp32(hidden), plain_fp32(pooled)

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
        residuals: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity ``[B, C, h, w]`` float32 (``residuals``: no ControlNet runs a transformer)."""
        if residuals:
            raise ValueError("ControlNet residuals do not apply to a transformer checkpoint")
        with torch.inference_mode():
            return plain_fp32(
                call_transformer(
                    self.family, self.unet_model, sample, timestep, encoder_hidden_states, added_cond or {}
                )
            )


def in_process_models(checkpoint: Checkpoint) -> TorchSubModels:
    """The torch sub-models of any family's loaded checkpoint."""
    return TorchDitModels(checkpoint) if isinstance(checkpoint, DitCheckpoint) else TorchSubModels(checkpoint)


def dit_component_runner(component: str, root: Path, device: str, dtype: torch.dtype) -> Runner:
    """One served model of an SD 3.x or FLUX.1 folder (`nirvana.contract.dit`) as ``{input: tensor} → {output:
    tensor}``; loads only that component's weights."""
    import transformers
    from diffusers import AutoencoderKL

    # The family from model_index.json alone: each served model loads this, and the full info would hash every
    # weight file of the checkpoint (tens of GB for FLUX.1) and load every tokenizer, per model.
    index = read_json(root / "model_index.json")
    family_name = model_family(root, index)
    family = DIT_FAMILIES[family_name]
    if component == "vae_decoder":
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype).to(device).eval()
        return lambda feeds: {"image": call_vae_decoder(vae, feeds["latent"]).float()}
    if component == "unet":
        model = family.transformer.from_pretrained(root / "transformer", torch_dtype=dtype).to(device).eval()
        per_row = ("timestep", "guidance")  # Triton sends one value per row as [rows, 1]
        return lambda feeds: {
            "noise_pred": call_transformer(
                family_name,
                model,
                feeds["sample"],
                feeds["timestep"].reshape(-1),
                feeds["encoder_hidden_states"],
                {
                    k: v.reshape(-1) if k in per_row else v
                    for k, v in feeds.items()
                    if k in ("pooled_projections", "guidance")
                },
            ).float()
        }
    if component not in family.text_encoders:
        raise ValueError(f"component={component!r}: an {family_name} checkpoint serves {sorted(family.text_encoders)}")
    cls = getattr(transformers, family.text_encoders[component][0])
    encoder = cls.from_pretrained(root / component, torch_dtype=dtype).to(device).eval()
    if component == family.t5:
        return lambda feeds: {LAST: encoder(feeds["input_ids"].to(device))[0].float()}
    if family_name == "flux":  # CLIP-L's pooled output is all FLUX takes from it
        return lambda feeds: {"text_embeds": encoder(feeds["input_ids"].to(device)).pooler_output.float()}

    def clip(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = encoder(feeds["input_ids"].to(device), output_hidden_states=True)
        return {PENULTIMATE: out.hidden_states[-2].float(), "text_embeds": out[0].float()}

    return clip
