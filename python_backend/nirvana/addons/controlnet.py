"""ControlNet per request: a folder of diffusers ControlNet models, one chosen by name per request with its control
image and conditioning scale, run at every step beside the UNet (its residuals go into the UNet) — in-process here,
or as Triton models of their own (`nirvana.runtime.bls_control`).

Layout: ``controlnets_dir/<name>/config.json + diffusion_pytorch_model.safetensors`` (what
``ControlNetModel.save_pretrained`` writes). In-process, a model is loaded when first named and kept; each request's
control image is prepared once, as diffusers' ``StableDiffusionControlNetPipeline`` prepares it (RGB, [0, 1], not
normalised), at the checkpoint's resolution.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor

__all__ = ["MAX_CONTROL_SCALE", "Control", "ControlNetCatalog", "ControlNetError", "ControlNetLibrary", "Residuals"]

MAX_CONTROL_SCALE = 2.0
_PREPARE = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)


class ControlNetError(ValueError):
    """A ControlNet or control image cannot serve this request; the message names it."""


def _digest_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# A ControlNet's residuals for one step: (sample, timestep, text, prepared image, scale) → the UNet's extra inputs.
Residuals = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], dict[str, object]]


@dataclass(frozen=True)
class Control:
    """One request's ControlNet: what runs it, its prepared image ``[1, 3, H, W]`` and scale. ``key`` is what the
    cache key holds (name, weights digest, scale, image digest): a latent made under another control never matches."""

    run: Residuals = field(compare=False, repr=False)
    image: torch.Tensor = field(compare=False, repr=False)
    scale: float
    key: tuple[str, str, float, str]

    def residuals(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> dict[str, object]:
        """The UNet's extra inputs for this step (every row, as the pipeline does without guess mode)."""
        return self.run(sample, timestep, text, self.image, self.scale)


def torch_residuals(model: ControlNetModel) -> Residuals:
    """In-process: the module's down-block and mid-block residuals, as diffusers' UNet takes them."""

    def run(
        sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor, scale: float
    ) -> dict[str, object]:
        device, dtype = model.device, model.dtype
        with torch.inference_mode():
            down, mid = model(
                sample.to(device, dtype),
                timestep.to(device),
                encoder_hidden_states=text.to(device, dtype),
                controlnet_cond=image.repeat(len(sample), 1, 1, 1).to(device, dtype),
                conditioning_scale=scale,
                return_dict=False,
            )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    return run


class ControlNetCatalog:
    """The ControlNets of one folder (names, weight digests) and the checks and preparation of a request's control;
    what runs a ControlNet is a subclass's (:class:`ControlNetLibrary` in-process, `nirvana.runtime.bls_control`
    served)."""

    def __init__(self, root: str | Path, image_size: tuple[int, int]) -> None:
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise ControlNetError(f"controlnets folder does not exist: {self.root}")
        self.folders = {p.parent.name: p.parent for p in sorted(self.root.glob("*/config.json"))}
        self.digests = {name: _digest_folder(folder) for name, folder in self.folders.items()}

    def control(self, name: str, image: object, scale: float) -> Control:
        """The :class:`Control` of one request; ControlNetError names the bad part."""
        if name not in self.folders:
            raise ControlNetError(f"unknown controlnet {name!r}; available: {sorted(self.folders) or 'none'}")
        if not (math.isfinite(scale) and 0.0 <= scale <= MAX_CONTROL_SCALE):
            raise ControlNetError(f"CONTROLNET_SCALE={scale}: must be in [0, {MAX_CONTROL_SCALE}]")
        pixels = self._check_image(image)
        prepared = _PREPARE.preprocess(pixels[None].astype(np.float32) / 255.0, *self.image_size).float()
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
        return Control(self.runner(name), prepared, float(scale), (name, self.digests[name], float(scale), digest))

    def runner(self, name: str) -> Residuals:
        raise NotImplementedError

    def _check_image(self, image: object) -> np.ndarray:
        height, width = self.image_size
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (height, width, 3):
            got = (getattr(image, "dtype", type(image).__name__), getattr(image, "shape", None))
            raise ControlNetError(f"CONTROL_IMAGE must be uint8 [{height}, {width}, 3] (the image size), got {got}")
        return image


class ControlNetLibrary(ControlNetCatalog):
    """In-process: each ControlNet loaded on first use (on the CPU) and kept."""

    def __init__(self, root: str | Path, image_size: tuple[int, int]) -> None:
        super().__init__(root, image_size)
        self._loaded: dict[str, ControlNetModel] = {}
        self._lock = threading.Lock()

    def runner(self, name: str) -> Residuals:
        with self._lock:
            if name not in self._loaded:
                try:
                    model = ControlNetModel.from_pretrained(self.folders[name], local_files_only=True)
                except (OSError, ValueError) as err:
                    raise ControlNetError(f"controlnet {name!r} cannot be loaded: {err}") from None
                self._loaded[name] = model.eval()
            return torch_residuals(self._loaded[name])
