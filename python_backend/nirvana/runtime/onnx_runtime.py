"""SubModels that run the exported ONNX files with onnxruntime (the CPU profile of the model repository).

Layout read (what ``nirvana_export.onnx_export.export_all`` writes)::

    model_dir/export_manifest.json   model_dir/<name>/model.onnx   for name in text_encoder, unet, vae_decoder

Tensor names and dtypes are those of :mod:`nirvana.contract.specs`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from nirvana.contract.specs import PENULTIMATE

__all__ = ["MANIFEST_NAME", "OnnxModel", "OnnxModelError", "OnnxSubModels", "make_session", "onnx_path"]

MANIFEST_NAME = "export_manifest.json"
# Triton runs several stubs at once on few cores: one thread per session and no spinning (measured on a 2-core
# machine: a UNet step 50× slower with spinning threads fighting over the cores; see nirvana.threads).
DEFAULT_THREADS = 1


class OnnxModelError(RuntimeError):
    """An ONNX file is missing, belongs to another checkpoint, or was fed tensors that do not fit it."""


def onnx_path(model_dir: str | Path, name: str) -> Path:
    """Where the export puts sub-model ``name``: ``model_dir/<name>/model.onnx`` (external data beside it)."""
    return Path(model_dir) / name / "model.onnx"


def make_session(
    path: str | Path, num_threads: int = DEFAULT_THREADS, overrides: Mapping[str, np.ndarray] | None = None
) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``num_threads`` intra-op threads that sleep instead of spinning when idle.

    ``overrides``: initializer name → value used instead of the file's (a LoRA set's fused weights,
    `nirvana.addons.lora_onnx`); onnxruntime reads them before it optimises the graph, so fused kernels see them too."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX file not found: {path} (run the export first)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in (overrides or {}).values()]
    for name, value in zip(overrides or {}, values, strict=True):
        options.add_initializer(name, value)
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    session.override_values = values  # onnxruntime uses these buffers without copying: they live with the session
    return session


class OnnxModel:
    """One ONNX sub-model: numpy in, numpy out, with inputs checked against the file's declared names."""

    def __init__(
        self, path: str | Path, num_threads: int = DEFAULT_THREADS, overrides: Mapping[str, np.ndarray] | None = None
    ) -> None:
        self.path = Path(path)
        self.session = make_session(self.path, num_threads, overrides)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on ``inputs`` (exactly the file's input names) → ``{output name: array}``."""
        if set(inputs) != set(self.input_names):
            raise OnnxModelError(f"{self.path}: expects inputs {self.input_names}, got {sorted(inputs)}")
        try:
            outputs = self.session.run(self.output_names, dict(inputs))
        except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException) as exc:
            shapes = {k: (v.dtype.name, v.shape) for k, v in inputs.items()}
            raise OnnxModelError(f"{self.path}: inference failed for inputs {shapes}: {exc}") from exc
        return dict(zip(self.output_names, outputs, strict=True))


def _numpy(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)


def _torch(array: np.ndarray) -> torch.Tensor:
    # onnxruntime hands back fresh, writable arrays: wrapping them shares memory without a copy.
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


class OnnxSubModels:
    """Text encoder, UNet and VAE decoder run by onnxruntime on CPU (the :class:`~nirvana.submodels.SubModels` API).

    ``fingerprint``, when given, must equal the checkpoint fingerprint in ``export_manifest.json``: ONNX files of
    another checkpoint would pair silently with this checkpoint's tokenizer, scheduler and cache entries.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        fingerprint: str | None = None,
        num_threads: int = DEFAULT_THREADS,
        version: str | None = None,
    ) -> None:
        """``version``: read a Triton model repository (``<name>/<version>/model.onnx``) instead of the export dir."""
        self.model_dir = Path(model_dir)
        if fingerprint is not None:
            self._check_fingerprint(fingerprint)

        def path(name: str) -> Path:
            return self.model_dir / name / version / "model.onnx" if version else onnx_path(self.model_dir, name)

        self.text_encoder = OnnxModel(path("text_encoder"), num_threads)
        second = path("text_encoder_2")  # SDXL's second encoder, where the export has one
        self.text_encoder_2 = OnnxModel(second, num_threads) if second.is_file() else None
        self.unet_model = OnnxModel(path("unet"), num_threads)
        self.vae_decoder = OnnxModel(path("vae_decoder"), num_threads)

    def _check_fingerprint(self, fingerprint: str) -> None:
        manifest_path = self.model_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise OnnxModelError(f"{manifest_path} not found: cannot tell which checkpoint the ONNX files come from")
        exported = json.loads(manifest_path.read_text()).get("checkpoint", {}).get("fingerprint")
        if exported != fingerprint:
            raise OnnxModelError(
                f"ONNX files in {self.model_dir} were exported from checkpoint {exported}, not {fingerprint}; "
                "re-run the export for this checkpoint"
            )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` int64 → last hidden state ``[B, L, D]`` float32.

        ``attention_mask`` is ignored: the exported graph takes ids only, as SD 1.x/2.x text encoders do.
        """
        out = self.text_encoder.run({"input_ids": _numpy(input_ids, np.int64)})
        return _torch(out["last_hidden_state"])

    def encode_text_pair(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: token ids of both tokenizers → ``(hidden [B, L, D1 + D2], text_embeds [B, P])``."""
        if self.text_encoder_2 is None:
            raise OnnxModelError(f"{self.model_dir} has no text_encoder_2: not an SDXL export")
        first = self.text_encoder.run({"input_ids": _numpy(input_ids, np.int64)})
        second = self.text_encoder_2.run({"input_ids": _numpy(input_ids_2, np.int64)})
        hidden = np.concatenate([first[PENULTIMATE], second[PENULTIMATE]], axis=-1)
        return _torch(hidden), _torch(second["text_embeds"])

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Scaled latent ``[B, C, h, w]``, timestep ``[B]`` or scalar, text ``[B, L, D]`` (SDXL: ``added_cond``)
        → noise ``[B, C, h, w]``."""
        # The graph takes float32 [B]; DDIM hands int64 timesteps, and integer-valued floats embed identically.
        timesteps = timestep.reshape(-1).to(torch.float32).expand(sample.shape[0])
        feeds = {
            "sample": _numpy(sample, np.float32),
            "timestep": _numpy(timesteps, np.float32),
            "encoder_hidden_states": _numpy(encoder_hidden_states, np.float32),
        }
        feeds |= {name: _numpy(value, np.float32) for name, value in (added_cond or {}).items()}
        return _torch(self.unet_model.run(feeds)["noise_pred"])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latent ``[B, C, h, w]`` → image ``[B, 3, H, W]`` in ≈[-1, 1], float32."""
        return _torch(self.vae_decoder.run({"latent": _numpy(latent, np.float32)})["image"])
