"""SD 3.x and FLUX.1 → ONNX: graph modules whose forward is exactly their served models' spec (`nirvana.contract.dit`).

The transformer's graph is the call the server makes in process (`nirvana.dit.modules.call_transformer`), FLUX's
2×2 packing and RoPE ids included, so the ONNX file takes the unpacked latent like every other family's denoiser.
Two things the legacy (TorchScript) exporter gets wrong are swapped for the same arithmetic while a DiT graph is
traced (`traceable`); the numerical check against the unpatched module then decides as for every graph:

- it has no symbolic for ``aten::rms_norm`` (FLUX's and SD 3.5's q/k norms, ``torch.nn.RMSNorm``): plain ops instead;
- diffusers' ``apply_rotary_emb`` reshapes with ``*x.shape[:-1]``, which the tracer writes into the graph as
  constants: FLUX's transformer exported at 2 rows failed at 1 and 3 in onnxruntime ("Attempting to broadcast an
  axis by a dimension other than 1"). The same rotation written with ``unflatten`` keeps the batch dynamic
  (max |onnx − torch| 6e-7 at 1, 2, 3 and 5 rows on the tiny model).
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

__all__ = ["DitTextEncoderGraph", "TransformerGraph", "dit_graph", "traceable"]


class DitTextEncoderGraph(nn.Module):
    """``input_ids`` → SD 3's CLIPs: ``(penultimate_hidden_state, text_embeds)``; FLUX's CLIP-L: ``text_embeds`` (its
    pooled output); T5: ``last_hidden_state``."""

    traced_with_swaps = True  # `traceable` while it is traced

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

    traced_with_swaps = True

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


def _rotary(x: torch.Tensor, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1, sequence_dim: int = 2):
    """diffusers' ``apply_rotary_emb`` for FLUX (real, unbind dim -1), with no shape read off ``x``."""
    if not use_real or use_real_unbind_dim != -1:
        raise NotImplementedError("only FLUX's rotary embedding (use_real, unbind dim -1) is traced")
    cos, sin = freqs_cis  # [S, D]
    shape = (1, -1, 1, cos.shape[-1]) if sequence_dim == 1 else (1, 1, -1, cos.shape[-1])
    cos, sin = cos.reshape(shape).to(x.device), sin.reshape(shape).to(x.device)
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def traceable() -> Iterator[None]:
    """``rms_norm`` as mul/mean/rsqrt and FLUX's rotary embedding without baked shapes, while a DiT graph is traced
    (see the module docstring)."""
    import diffusers.models.transformers.transformer_flux as flux

    originals = torch.nn.functional.rms_norm, flux.apply_rotary_emb
    torch.nn.functional.rms_norm, flux.apply_rotary_emb = _rms_norm, _rotary
    try:
        yield
    finally:
        torch.nn.functional.rms_norm, flux.apply_rotary_emb = originals
