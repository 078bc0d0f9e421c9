"""A LoRA set on the exported ONNX UNet (initializer overrides), and the pool that loads sets one at a time (LRU)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from nirvana.addons.lora import AdapterLibrary
from nirvana.addons.lora_onnx import InitializerIndex, fused_overrides, variant_name
from nirvana.addons.variant_pool import VariantPool
from nirvana.runtime.onnx_runtime import OnnxModel
from nirvana_dev.tiny_addons import make_tiny_lora
from nirvana_export.onnx_export import export_all


@pytest.fixture(scope="module")
def unet_onnx(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_all(tiny_checkpoint_dir, tmp_path_factory.mktemp("onnx"), names=["unet"])["unet"]


@pytest.fixture(scope="module")
def library(tiny_checkpoint, tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterLibrary:
    root = tmp_path_factory.mktemp("adapters")
    make_tiny_lora(root / "ink", tiny_checkpoint_dir, seed=1)
    make_tiny_lora(root / "glow", tiny_checkpoint_dir, seed=2)
    made = AdapterLibrary(root, tiny_checkpoint.unet, strict=False)
    yield made
    made.close()


def test_onnx_with_fused_overrides_equals_the_fused_torch_unet(library, unet_onnx, tiny_checkpoint) -> None:
    adapters = (("glow", 0.5), ("ink", 1.0))
    overrides = fused_overrides(library, adapters, InitializerIndex(unet_onnx))
    assert len(overrides) == 32  # q, k, v, out of 8 attention blocks: nothing else changes
    generator = torch.Generator().manual_seed(0)
    hidden = tiny_checkpoint.unet.config.cross_attention_dim
    feeds = {
        "sample": torch.randn(2, 4, 16, 16, generator=generator).numpy(),
        "timestep": np.array([500.0, 20.0], dtype=np.float32),
        "encoder_hidden_states": torch.randn(2, 77, hidden, generator=generator).numpy(),
    }
    ours = OnnxModel(unet_onnx, overrides=overrides).run(feeds)["noise_pred"]
    base = OnnxModel(unet_onnx).run(feeds)["noise_pred"]
    with torch.no_grad():
        fused = library.merge(adapters)(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    assert np.abs(ours - fused).max() < 1e-4
    assert np.abs(base - fused).max() > 0.1  # the overrides are what changed the output


def test_index_finds_weights_stored_transposed(library, unet_onnx) -> None:
    index = InitializerIndex(unet_onnx)
    weight = library.base_unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").weight
    name, transposed = index.locate(weight.detach().numpy())
    assert transposed and name.startswith("onnx::MatMul")
    assert index.locate(np.ones((3, 5), dtype=np.float32)) is None


def test_variant_names_differ_by_file_and_scale() -> None:
    names = {variant_name("unet", fp) for fp in ([("a", "d1", 1.0)], [("a", "d2", 1.0)], [("a", "d1", 0.5)])}
    assert len(names) == 3 and all(n.startswith("unet_lora_") for n in names)


class _Models:
    """Loads that wait for a gate, so a test decides when a load finishes."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloaded: list[str] = []
        self.gate = threading.Event()

    def load(self, key: str) -> str:
        self.gate.wait(10)
        if key == "bad":
            raise ValueError("corrupt")
        self.loads.append(key)
        return f"model_{key}"

    def unload(self, name: str) -> None:
        self.unloaded.append(name)


def _ask(pool: VariantPool, key: str) -> tuple[threading.Event, dict]:
    answered, got = threading.Event(), {}
    pool.request(key, lambda name, err: (got.update(name=name, err=err), answered.set()))
    return answered, got


def test_one_load_per_set_and_a_loaded_set_answers_at_once() -> None:
    models = _Models()
    pool = VariantPool(models.load, models.unload, max_loaded=2)
    waits = [_ask(pool, "a") for _ in range(3)]
    assert not any(answered.is_set() for answered, _ in waits)  # still loading
    models.gate.set()
    assert all(answered.wait(5) for answered, _ in waits)
    assert models.loads == ["a"] and {got["name"] for _, got in waits} == {"model_a"}
    answered, got = _ask(pool, "a")
    assert answered.is_set() and got["name"] == "model_a"  # on this thread, no load
    pool.close()


def test_least_recently_requested_set_is_unloaded_and_a_failed_load_is_retried() -> None:
    models = _Models()
    models.gate.set()
    pool = VariantPool(models.load, models.unload, max_loaded=2)
    for key in ("a", "b", "a", "c"):  # "b" is the least recently requested when "c" arrives
        assert _ask(pool, key)[0].wait(5)
    pool.close()  # waits for the eviction queued behind the load
    assert models.unloaded == ["model_b"] and pool.loaded() == ["a", "c"]
    pool = VariantPool(models.load, models.unload, max_loaded=2)
    answered, got = _ask(pool, "bad")
    assert answered.wait(5) and isinstance(got["err"], ValueError)
    answered, got = _ask(pool, "bad")  # not remembered as loaded: tried again
    assert answered.wait(5) and got["err"] is not None and pool.loaded() == []
    pool.close()
