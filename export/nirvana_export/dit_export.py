"""SD 3.x and FLUX.1 → ONNX: graph modules whose forward is exactly their served models' spec (`nirvana.contract.dit`).

The transformer's graph is the call the server makes in process (`nirvana.dit.modules.call_transformer`), FLUX's
2×2 packing and RoPE ids included, so the ONNX file takes the unpacked latent like every other family's denoiser.
The legacy (TorchScript) exporter has no symbolic for ``aten::rms_norm`` (FLUX's and SD 3.5's q/k norms,
``torch.nn.RMSNorm``): while a graph is traced, `rms_norm_as_ops` swaps ``torch.nn.functional.rms_norm`` for the
same arithmetic in plain ops; the numerical check against the unpatched module then decides as for every graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from nirvana.checkpoint import Checkpoint
from nirvana.contract.dit import LAST
from nirvana.contract.specs import ModelSpec
from nirvana.dit.modules import call_transformer

__all__ = ["DitTextEncoderGraph", "TransformerGraph", "dit_graph", "rms_norm_as_ops"]


class DitTextEncoderGraph(nn.Module):
    """``input_ids`` → SD 3's CLIPs: ``(penultimate_hidden_state, text_embeds)``; FLUX's CLIP-L: ``text_embeds`` (its
    pooled output); T5: ``last_hidden_state``."""

    traces_rms_norm_as_ops = True  # `rms_norm_as_ops` while it is traced

    def __init__(self, encoder: nn.Module, answer: str) -> None:
        super().__init__()
        self.encoder, self.answer = encoder, answer
        self.vocab_size = int(encoder.config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.answer == LAST:
            return self.encoder(input_ids)[0].float()
        if self.answer == "pooled":
            return self.encoder(input_ids).pooler_output.float()
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2].float(), out[0].float()


class TransformerGraph(nn.Module):
    """``sample``, ``timestep``, ``encoder_hidden_states``, ``pooled_projections`` (FLUX: ``guidance``) →
    ``noise_pred``, all float32 and per row."""

    traces_rms_norm_as_ops = True

    def __init__(self, family: str, transformer: nn.Module) -> None:
        super().__init__()
        self.family, self.transformer = family, transformer

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = {"pooled_projections": pooled_projections}
        if guidance is not None:
            added["guidance"] = guidance
        return call_transformer(self.family, self.transformer, sample, timestep, encoder_hidden_states, added).float()


def dit_graph(checkpoint: Checkpoint, spec: ModelSpec) -> nn.Module:
    """The graph module of served model ``spec.name`` of an SD 3.x or FLUX.1 checkpoint."""
    from nirvana_export.onnx_export import VaeDecoderGraph

    if spec.name == "unet":
        return TransformerGraph(checkpoint.family, checkpoint.unet)
    if spec.name == "vae_decoder":
        return VaeDecoderGraph(checkpoint.vae)
    encoder = getattr(checkpoint, spec.name)
    outputs = tuple(spec.output_names)
    if outputs == (LAST,):
        return DitTextEncoderGraph(encoder, LAST)
    return DitTextEncoderGraph(encoder, "pooled" if outputs == ("text_embeds",) else "pair")


def _rms_norm(x: torch.Tensor, normalized_shape, weight=None, eps=None) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


@contextlib.contextmanager
def rms_norm_as_ops() -> Iterator[None]:
    """``torch.nn.functional.rms_norm`` as mul/mean/rsqrt while a graph is traced (see the module docstring)."""
    original = torch.nn.functional.rms_norm
    torch.nn.functional.rms_norm = _rms_norm
    try:
        yield
    finally:
        torch.nn.functional.rms_norm = original
