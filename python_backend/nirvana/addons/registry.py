"""Add-on modules of a request (SwiftDiffusion's term): LoRA adapters and a ControlNet. Resolved once per request
into :class:`AddOns`, which say which UNet runs, what runs beside it at every step, and what the cache key holds —
a latent made under one add-on set is never reused for another."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nirvana.addons.controlnet import Control, ControlNetCatalog, ControlNetError, ControlNetLibrary
from nirvana.addons.lora import AdapterBusy, AdapterError, AdapterLibrary, AdapterSet, format_adapters
from nirvana.checkpoint import CheckpointInfo
from nirvana.config import EngineConfig
from nirvana.families import DIT
from nirvana.request import GenerationRequest, RequestError
from nirvana.submodels import SubModels

__all__ = ["AddOnRegistry", "AddOnUnavailable", "AddOns"]


class AddOnUnavailable(RequestError):
    """The request's add-on cannot be had now (its LoRA set waits behind too many loads, or is still loading): a
    RequestError naming LORA, so it is refused like one, but the same request may succeed later (UNAVAILABLE)."""


@dataclass(frozen=True)
class AddOns:
    """A request's add-ons; the empty default changes nothing (and its cache key is the plain one)."""

    adapters: AdapterSet = ()
    control: Control | None = None

    def key_parts(self, library: Any) -> dict[str, object]:
        parts: dict[str, object] = {}
        if self.adapters and library is not None:
            parts["lora"] = library.fingerprint(self.adapters)
        if self.control is not None:
            parts["controlnet"] = list(self.control.key)
        return parts


class AddOnRegistry:
    """The adapter and ControlNet folders of a configuration (each optional), run in-process or served."""

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: CheckpointInfo,
        in_process: bool,
        served_adapters: Any = None,
        served_controlnets: ControlNetCatalog | None = None,
    ) -> None:
        """``served_adapters``: the orchestrator's client of the ``adapters`` model (`nirvana.runtime.bls_adapters`),
        which merges sets into UNet models of their own; in-process, sets are merged here. ``served_controlnets``:
        the ControlNets as Triton models (`nirvana.runtime.bls_control`); in-process, they run here."""
        if checkpoint.family in DIT and (config.adapters.dir is not None or config.controlnets.dir is not None):
            raise AdapterError(
                f"{checkpoint.family} (a transformer family) runs without add-ons so far: LoRA adapters and "
                "ControlNets are built for UNets; unset [adapters] dir and [controlnets] dir"
            )
        if config.controlnets.dir is not None and not in_process and served_controlnets is None:
            raise ControlNetError("served ControlNets need their models (nirvana export renders them)")
        if config.adapters.dir is not None and not in_process and served_adapters is None:
            raise AdapterError("served LoRA adapters need the `adapters` model (nirvana export renders it)")
        self.adapters: Any = served_adapters
        if config.adapters.dir is not None and in_process:
            unet = checkpoint.unet  # type: ignore[attr-defined]  # in-process: a loaded Checkpoint
            self.adapters = AdapterLibrary(
                config.adapters.dir, unet, config.adapters.max_loaded, scale_step=config.adapters.scale_step
            )
        self.controlnets = served_controlnets
        if config.controlnets.dir is not None and in_process:
            self.controlnets = ControlNetLibrary(config.controlnets.dir, checkpoint.image_size)

    def resolve(self, req: GenerationRequest) -> AddOns:
        """The request's add-ons; RequestError names LORA, CONTROLNET or CONTROL_IMAGE and what is wrong."""
        return AddOns(self._adapters(req.lora), self._control(req))

    def _adapters(self, lora: str) -> AdapterSet:
        if not lora:
            return ()
        if self.adapters is None:
            raise RequestError("LORA", lora, "this server has no adapters (set adapters.dir)")
        try:
            return self.adapters.parse(lora)
        except AdapterError as err:
            raise RequestError("LORA", lora, str(err)) from None

    def _control(self, req: GenerationRequest) -> Control | None:
        if not req.controlnet:
            if req.control_image is not None:
                raise RequestError("CONTROL_IMAGE", "<image>", "given without CONTROLNET")
            return None
        if self.controlnets is None:
            raise RequestError("CONTROLNET", req.controlnet, "this server has no controlnets (set controlnets.dir)")
        try:
            return self.controlnets.control(req.controlnet, req.control_image, req.controlnet_scale)
        except ControlNetError as err:
            raise RequestError("CONTROLNET", req.controlnet, str(err)) from None

    def unet_models(self, models: SubModels, addons: AddOns, timings: dict[str, float]) -> SubModels:
        """``models`` (in process: `TorchSubModels`) around the UNet with ``addons``' adapters fused in (waiting only
        while that set merges)."""
        if not addons.adapters or self.adapters is None:
            return models
        start = time.perf_counter()
        try:
            merged = self.adapters.bind(models, addons.adapters, control=addons.control is not None)
        except AdapterBusy as err:
            raise AddOnUnavailable("LORA", format_adapters(addons.adapters), f"{err}") from None
        except AdapterError as err:  # a refused file, or a set that failed to merge: the request's LORA is at fault
            raise RequestError("LORA", format_adapters(addons.adapters), str(err)) from None
        timings["adapter_ms"] = (time.perf_counter() - start) * 1e3
        return merged

    def close(self) -> None:
        if self.adapters is not None:
            self.adapters.close()
