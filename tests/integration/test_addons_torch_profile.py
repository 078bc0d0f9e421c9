"""Served add-ons in the torch profile (the GPU path without TensorRT): LoRA sets fused into torch UNet models by the
`adapters` model, ControlNets as torch models of their own; run here on the CPU, images equal diffusers' pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.test_adapters import _reference as lora_image
from tests.test_controlnet import PROMPT, STEPS, _edges
from tests.test_controlnet import _reference as controlnet_image

from nirvana_client import GenerateOptions, NirvanaClient
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, make_server, prepare
from nirvana_dev.tiny_addons import make_tiny_controlnet, make_tiny_lora

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def folders(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    controlnets, adapters = tmp_path_factory.mktemp("torch_controlnets"), tmp_path_factory.mktemp("torch_adapters")
    make_tiny_controlnet(controlnets / "edges", tiny_checkpoint_dir, seed=1)  # as tests.test_controlnet makes them
    make_tiny_lora(adapters / "ink", tiny_checkpoint_dir, seed=1)
    return controlnets, adapters


@pytest.fixture(scope="module")
def client(tiny_checkpoint_dir, folders, tmp_path_factory):
    work = tmp_path_factory.mktemp("torch_addons")
    config = work / "engine.toml"
    config.write_text(f'[controlnets]\ndir = "{folders[0]}"\n\n[adapters]\ndir = "{folders[1]}"\n')
    options = ServeOptions(
        cache_dir=work / "serve",
        checkpoint=tiny_checkpoint_dir,
        config_file=config,
        ports=ServerPorts(*free_ports(3)),
        profile="torch",
        instances=2,
        ready_timeout_s=240,
    )
    repo, _ = prepare(options)
    assert not (repo / "unet_control" / "1" / "model.onnx").exists()  # the modules themselves are served
    with make_server(options, repo) as server:
        made = NirvanaClient(server.urls.grpc, "grpc")
        yield made
        made.close()


def _generate(client: NirvanaClient, **options: object) -> np.ndarray:
    return client.generate(PROMPT, GenerateOptions(seed=4, steps=STEPS, cache_mode="bypass", **options)).image  # type: ignore[arg-type]


def _close(ours: np.ndarray, expected: np.ndarray) -> bool:
    return int(np.abs(ours.astype(int) - expected.astype(int)).max()) <= 2  # torch vs torch, merged rows: rounding


def test_lora_set_model_equals_diffusers(client, tiny_checkpoint_dir, folders) -> None:
    ours = _generate(client, lora="ink:0.8")
    assert _close(ours, lora_image(tiny_checkpoint_dir, folders[1], {"ink": 0.8}))
    assert not _close(ours, _generate(client))  # the adapter really changes the image


@pytest.mark.parametrize("lora", [None, "ink:0.8"])
def test_controlnet_models_equal_diffusers(client, tiny_checkpoint_dir, folders, lora) -> None:
    control = _edges(0)
    ours = _generate(client, controlnet="edges", control_image=control, controlnet_scale=0.6, lora=lora)
    assert _close(ours, controlnet_image(tiny_checkpoint_dir, folders, control, 0.6, lora=bool(lora)))
    assert not _close(ours, _generate(client, lora=lora))  # the control really steers the image
