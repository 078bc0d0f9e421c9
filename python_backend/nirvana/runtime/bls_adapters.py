"""The orchestrator's side of served LoRA adapters: parse and fingerprint here, ask the `adapters` model for the
UNet model of a set (`nirvana.serving.adapter_model`), and run the request's steps on that model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nirvana.addons.lora import SCALE_STEP, AdapterBusy, AdapterCatalog, AdapterError, AdapterSet, format_adapters
from nirvana.config import AdaptersConfig
from nirvana.contract.controlnet import UNET_CONTROL_MODEL
from nirvana.runtime.bls import BlsSubModels, credential_parameters
from nirvana.runtime.decoupled import release_decoupled

__all__ = ["BlsAdapters"]

_DEFAULT_WAIT_S = AdaptersConfig().load_wait_s


class BlsAdapters(AdapterCatalog):
    """The adapters folder as the orchestrators see it (names, digests), and the `adapters` model that loads sets.

    ``wait_s``: how long the `adapters` model lets a request wait for its set (`adapters.load_wait_s`); it answers
    UNAVAILABLE then, and the BLS request carries a timeout a little longer, so a Triton that enforces request
    timeouts ends the call too. Each request carries the parameters every BLS request of this stub carries (the
    deployment's internal credential, `nirvana.runtime.bls.use_credential`): the `adapters` model refuses others."""

    def __init__(
        self,
        pb_utils: Any,
        root: str | Path,
        model: str = "adapters",
        scale_step: float = SCALE_STEP,
        wait_s: float = _DEFAULT_WAIT_S,
    ) -> None:
        super().__init__(root, scale_step)
        self._pb, self._model = pb_utils, model
        self._timeout_us = int((wait_s + 5.0) * 1e6)

    def unet(self, adapters: AdapterSet, base: str = "unet") -> str:
        """The name of the model ``base`` (``unet`` or ``unet_control``) with ``adapters`` fused in; waits only while
        that set loads, at most ``wait_s`` (then AdapterBusy, as when the `adapters` model refuses more sets)."""
        pb = self._pb
        inputs = [
            pb.Tensor("ADAPTERS", np.array([format_adapters(adapters).encode()], dtype=np.object_)),
            pb.Tensor("BASE", np.array([base.encode()], dtype=np.object_)),
        ]
        parameters = credential_parameters()  # read per call: the credential is set after import
        extra: dict[str, Any] = {"parameters": parameters} if parameters else {}
        request = pb.InferenceRequest(
            model_name=self._model,
            requested_output_names=["MODEL"],
            inputs=inputs,
            timeout=self._timeout_us,
            **extra,
        )
        name = None
        responses = request.exec(decoupled=True)
        try:
            for response in responses:  # one answer, flagged final
                if response.has_error():
                    error = response.error()
                    busy = getattr(pb.TritonError, "UNAVAILABLE", None)
                    if busy is not None and hasattr(error, "code") and error.code() == busy:
                        raise AdapterBusy(error.message())
                    raise AdapterError(error.message())
                tensor = pb.get_output_tensor_by_name(response, "MODEL")
                if tensor is not None:
                    name = bytes(tensor.as_numpy().reshape(-1)[0]).decode()
        finally:
            release_decoupled(responses)  # before the responses go (`nirvana.runtime.decoupled`)
        if name is None:
            raise AdapterError(f"the {self._model!r} model gave no UNet model for {format_adapters(adapters)!r}")
        return name

    def bind(self, models: BlsSubModels, adapters: AdapterSet, control: bool = False) -> BlsSubModels:
        """``models`` with their UNet steps sent to the set's model (with a ControlNet: the set fused into
        ``unet_control``); if that model is unloaded mid-request (LRU, another set needed the room), it is loaded
        again and the step retried."""
        base = UNET_CONTROL_MODEL if control else "unet"
        return models.with_unet(self.unet(adapters, base), reload=lambda: self.unet(adapters, base), role=base)

    def close(self) -> None:
        pass
