"""A LoRA adapter set on an exported ONNX UNet: the initializers a fused set changes, found by value.

The served UNet is an ONNX file whose linear weights the exporter stored transposed under generated names
(``onnx::MatMul_1631``), so a parameter's name does not say which initializer holds it. Its value does: each base
weight (or its transpose) is looked up among the file's initializers by shape and bytes. A set is fused with
diffusers' own LoRA code on the torch UNet (`nirvana.addons.lora.AdapterLibrary.merge`); every parameter the fusing
changed replaces its initializer, and onnxruntime runs the base file with those overrides
(`nirvana.runtime.onnx_runtime.make_session`): one file on disk, a few changed tensors per set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from nirvana.addons.lora import AdapterError, AdapterLibrary, AdapterSet

__all__ = ["InitializerIndex", "fused_overrides", "variant_name"]


def _value_key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array.shape, hashlib.sha1(array.tobytes()).hexdigest()


class InitializerIndex:
    """The float initializers of one ONNX file, by value: which one holds a given weight, and whether transposed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        model = onnx.load(str(self.path))  # external data (a full-size UNet) is read from beside the file
        self._by_value: dict[tuple, str] = {}
        for initializer in model.graph.initializer:
            array = numpy_helper.to_array(initializer)
            if array.dtype.kind == "f" and array.size > 1:
                self._by_value.setdefault(_value_key(array), initializer.name)

    def locate(self, weight: np.ndarray) -> tuple[str, bool] | None:
        """``(initializer name, transposed)`` of the initializer equal to ``weight`` or to its transpose."""
        if (name := self._by_value.get(_value_key(weight))) is not None:
            return name, False
        if weight.ndim == 2 and (name := self._by_value.get(_value_key(weight.T))) is not None:
            return name, True
        return None


def fused_overrides(library: AdapterLibrary, adapters: AdapterSet, index: InitializerIndex) -> dict[str, np.ndarray]:
    """Initializer name → fused value for every UNet parameter that fusing ``adapters`` changes."""
    base = dict(library.base_unet.named_parameters())
    overrides: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, param in library.merge(adapters).named_parameters():
            if torch.equal(param, base[name]):
                continue
            found = index.locate(base[name].detach().float().numpy())
            if found is None:
                raise AdapterError(f"adapters {adapters}: UNet weight {name} has no initializer in {index.path}")
            initializer, transposed = found
            value = param.detach().float().numpy()
            overrides[initializer] = np.ascontiguousarray(value.T if transposed else value)
    if not overrides:
        raise AdapterError(f"adapters {adapters} change no weight of the UNet")
    return overrides


def variant_name(base_model: str, fingerprint: list[tuple[str, str, float]]) -> str:
    """The Triton model name of an adapter set's UNet: stable across restarts, different for another file or scale."""
    digest = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]
    return f"{base_model}_lora_{digest}"
