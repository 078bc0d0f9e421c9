"""LoRA adapters per request: a folder of diffusers LoRA files, checked at start, merged into UNet copies on demand.

Layout: ``adapters_dir/<name>/pytorch_lora_weights.safetensors`` (what ``StableDiffusionPipeline.save_lora_weights``
writes) or ``adapters_dir/<name>.safetensors``. A request names adapters and scales in one string, ``LORA``
(``"name:0.8,other:0.5"``; a name alone means scale 1). Scales are rounded to a grid (``SCALE_STEP``, 0.05 unless
configured): every distinct scale is a UNet copy to fuse and load, so ``ink:0.80001`` must be the set ``ink:0.8``, not
a new one a client can make at will.

An adapter set runs on a UNet with the adapters fused into its weights (diffusers' ``load_lora_adapter`` +
``set_adapters`` + ``fuse_lora`` on a copy): each step costs what the base UNet costs, and requests with the same set
share that copy. At most ``max_loaded`` sets stay merged (least recently used out); a set is merged on a
background thread, so a request for a loaded set never waits for another set's load.

Every file is checked when the library opens (readable safetensors, each LoRA pair fits the module it targets), so
a corrupt or foreign adapter is refused at start, naming it, and never reaches a request. Text-encoder LoRA weights
are refused too: transformers 5 loads them only with peft ≥ 0.22, which this install cannot have yet.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    "MAX_SCALE",
    "SCALE_STEP",
    "AdapterBusy",
    "AdapterCatalog",
    "AdapterError",
    "AdapterLibrary",
    "AdapterSet",
    "format_adapters",
    "parse_adapters",
    "quantize_scale",
]

log = logging.getLogger(__name__)
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MAX_SCALE = 2.0
SCALE_STEP = 0.05  # `AdaptersConfig.scale_step`'s default
# (adapter name, scale), sorted by name: the same set however a request orders it.
AdapterSet = tuple[tuple[str, float], ...]
_DOWN, _UP = (".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight")


class AdapterError(ValueError):
    """An adapter file cannot serve this checkpoint, or a request's ``LORA`` names adapters wrongly."""


class AdapterBusy(AdapterError):
    """The set is fine but cannot be had now (served: too many sets in line to load, or still loading after
    ``adapters.load_wait_s``); the same request may succeed later."""


def quantize_scale(scale: float, step: float = SCALE_STEP) -> float:
    """``scale`` on the grid of ``step`` (nearest multiple), as the float its shortest decimal text reads back as."""
    return round(round(scale / step) * step, 6)


def parse_adapters(value: str, known: set[str], step: float = SCALE_STEP) -> AdapterSet:
    """``"name:0.8,other:0.5"`` → a sorted :data:`AdapterSet`, scales on the grid of ``step``; AdapterError says
    what is wrong with which part."""
    entries: dict[str, float] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            raise AdapterError(f"empty entry in {value!r}: write name or name:scale, comma-separated")
        name, _, scale_text = part.partition(":")
        name = name.strip()
        if name not in known:
            raise AdapterError(f"unknown adapter {name!r}; available: {sorted(known) or 'none'}")
        try:
            scale = float(scale_text) if scale_text.strip() else 1.0
        except ValueError:
            raise AdapterError(f"scale of {name!r} is not a number: {scale_text!r}") from None
        if not (math.isfinite(scale) and 0.0 < scale <= MAX_SCALE):
            raise AdapterError(f"scale of {name!r} is {scale}: must be in (0, {MAX_SCALE}]")
        if (rounded := quantize_scale(scale, step)) <= 0:
            raise AdapterError(f"scale of {name!r} is {scale}: rounds to 0 on the {step} grid (smallest: {step})")
        scale = rounded
        if name in entries:
            raise AdapterError(f"adapter {name!r} is named twice")
        entries[name] = scale
    return tuple(sorted(entries.items()))


def format_adapters(adapters: AdapterSet) -> str:
    """The canonical ``LORA`` text of a set (``parse_adapters`` of it gives the set back)."""
    return ",".join(f"{name}:{scale!r}" for name, scale in adapters)


def _adapter_files(root: Path) -> dict[str, Path]:
    files = {p.stem: p for p in root.glob("*.safetensors")}
    files |= {p.parent.name: p for p in root.glob(f"*/{WEIGHTS_NAME}")}
    return dict(sorted(files.items()))


def _target(key: str) -> tuple[str, str] | None:
    """``("down_blocks.1....to_q", "down" | "up")`` for a UNet LoRA key, None for another tensor (e.g. alpha)."""
    for kind, suffixes in (("down", _DOWN), ("up", _UP)):
        for suffix in suffixes:
            if key.endswith(suffix):
                return key.removeprefix("unet.")[: -len(suffix)], kind
    return None


def _check_file(name: str, path: Path, unet: torch.nn.Module) -> None:
    """Refuse a file that is not readable safetensors, holds text-encoder weights, or does not fit ``unet``."""
    try:
        with safe_open(str(path), "pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"adapter {name!r} ({path}) cannot be read: {err}") from None
    if any(key.startswith(("text_encoder", "te_")) for key in shapes):
        raise AdapterError(f"adapter {name!r} has text-encoder weights: only UNet LoRA layers are supported")
    targets = {found: shape for key, shape in shapes.items() if (found := _target(key))}
    if not targets:
        raise AdapterError(f"adapter {name!r} ({path}) holds no UNet LoRA layers")
    for (module_name, kind), shape in targets.items():
        try:
            weight = unet.get_submodule(module_name).weight
        except AttributeError:
            raise AdapterError(f"adapter {name!r} targets {module_name!r}, which this UNet lacks") from None
        fits = shape[1] == weight.shape[1] if kind == "down" else shape[0] == weight.shape[0]
        if not fits:
            raise AdapterError(
                f"adapter {name!r}: {module_name} {kind} weight {shape} does not fit the UNet's {tuple(weight.shape)}"
            )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class AdapterCatalog:
    """The adapter files of one folder and their digests: enough to parse a request's ``LORA`` and key the cache by
    it, without loading weights (the served orchestrators; the ``adapters`` model merges and checks)."""

    def __init__(self, root: str | Path, scale_step: float = SCALE_STEP) -> None:
        self.root, self.scale_step = Path(root), scale_step
        if not self.root.is_dir():
            raise AdapterError(f"adapters folder does not exist: {self.root}")
        self.files = _adapter_files(self.root)
        self.digests = {name: _digest(path) for name, path in self.files.items()}

    def parse(self, value: str) -> AdapterSet:
        return parse_adapters(value, set(self.files), self.scale_step)

    def fingerprint(self, adapters: AdapterSet) -> list[tuple[str, str, float]]:
        """(name, file digest, scale) per adapter: what the cache key holds, so a retrained file never matches."""
        return [(name, self.digests[name], scale) for name, scale in adapters]


class AdapterLibrary(AdapterCatalog):
    """The adapters of one folder for one checkpoint's UNet, and the merged UNets of the sets in use (LRU).

    ``strict``: a file that cannot serve this UNet stops the library from opening (in-process); otherwise it is
    left out and recorded in ``refused`` (served: the server stays up, and a request naming it is told why)."""

    def __init__(
        self,
        root: str | Path,
        unet: torch.nn.Module,
        max_loaded: int = 2,
        strict: bool = True,
        scale_step: float = SCALE_STEP,
    ) -> None:
        super().__init__(root, scale_step)
        self._unet, self.max_loaded = unet, max(1, max_loaded)
        self.refused: dict[str, str] = {}
        for name, path in list(self.files.items()):
            try:
                _check_file(name, path, unet)
            except AdapterError as err:
                if strict:
                    raise
                log.error("adapter refused: %s", err)
                self.refused[name] = str(err)
        self._merged: OrderedDict[AdapterSet, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nirvana-lora")
        self.load_seconds: list[float] = []  # per merged set, for /metrics and the note

    @property
    def base_unet(self) -> torch.nn.Module:
        return self._unet

    def check_usable(self, adapters: AdapterSet) -> None:
        """AdapterError naming the first adapter of the set that was refused when the library opened."""
        for name, _ in adapters:
            if name in self.refused:
                raise AdapterError(f"adapter {name!r} was refused when the server started: {self.refused[name]}")

    def bind(self, models: Any, adapters: AdapterSet, control: bool = False) -> Any:
        """``models`` (in-process torch sub-models) around the UNet with ``adapters`` fused in (the same module
        takes a ControlNet's residuals: ``control`` changes nothing here)."""
        return models.with_unet(self.unet(adapters))

    def unet(self, adapters: AdapterSet) -> torch.nn.Module:
        """The UNet with ``adapters`` fused in; merged on the loader thread the first time (callers for other,
        loaded sets go on meanwhile), then kept until ``max_loaded`` newer sets push it out."""
        if not adapters:
            return self._unet
        with self._lock:
            future = self._merged.get(adapters)
            if future is None:
                future = self._loader.submit(self.merge, adapters)
                self._merged[adapters] = future
                while len(self._merged) > self.max_loaded:
                    self._merged.popitem(last=False)  # in-flight users keep their reference
            self._merged.move_to_end(adapters)
        try:
            return future.result()
        except Exception as err:  # a failed merge is not kept: the next request for the set tries again
            with self._lock:
                if self._merged.get(adapters) is future:
                    del self._merged[adapters]
            raise AdapterError(f"adapters {adapters} could not be merged: {type(err).__name__}: {err}") from err

    def merge(self, adapters: AdapterSet) -> torch.nn.Module:
        """A fresh copy of the UNet with ``adapters`` fused in (diffusers' own LoRA loading and fusing); not kept."""
        self.check_usable(adapters)
        start = time.perf_counter()
        unet = copy.deepcopy(self._unet)
        names = [name for name, _ in adapters]
        for name in names:
            unet.load_lora_adapter(str(self.files[name]), prefix="unet", adapter_name=name)
        unet.set_adapters(names, weights=[scale for _, scale in adapters])
        unet.fuse_lora(adapter_names=names)
        unet.unload_lora()  # the fused weights stay; the LoRA layers go
        self.load_seconds.append(time.perf_counter() - start)
        log.info("merged adapters %s in %.2f s", adapters, self.load_seconds[-1])
        return unet.eval()

    def close(self) -> None:
        self._loader.shutdown(wait=True)
