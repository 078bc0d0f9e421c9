"""ControlNets through the real server: a `controlnet_<name>` model per ControlNet and the `unet_control` model, called
once per iteration by the step scheduler for every request with that ControlNet; images equal diffusers'
`StableDiffusionControlNetPipeline`, latents never cross controls, requests with the same ControlNet share its and
the UNet's executions whatever their images and scales, and bad control inputs are refused naming them."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from tests.test_controlnet import PROMPT, STEPS, _edges
from tests.test_controlnet import _reference as diffusers_image
from tritonclient.utils import InferenceServerException

from nirvana_client import GenerateOptions, NirvanaClient
from nirvana_dev.tiny_addons import make_tiny_controlnet, make_tiny_lora

pytestmark = pytest.mark.integration
BYPASS = {"cache_mode": "bypass"}


@pytest.fixture(scope="module")
def folders(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    controlnets, adapters = tmp_path_factory.mktemp("served_controlnets"), tmp_path_factory.mktemp("cn_adapters")
    make_tiny_controlnet(controlnets / "edges", tiny_checkpoint_dir, seed=1)  # the one tests.test_controlnet uses
    make_tiny_controlnet(controlnets / "lines", tiny_checkpoint_dir, seed=2)
    make_tiny_lora(adapters / "ink", tiny_checkpoint_dir, seed=1)
    return controlnets, adapters


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, folders, tmp_path_factory, start_server):
    work = tmp_path_factory.mktemp("controlnet_serve")
    config = work / "engine.toml"
    config.write_text(f'[controlnets]\ndir = "{folders[0]}"\n\n[adapters]\ndir = "{folders[1]}"\n')
    state = start_server(tiny_checkpoint_dir, work, config_file=config)
    yield state["server"]
    state["server"].stop()


@pytest.fixture(scope="module")
def client(server):
    made = NirvanaClient(server.urls.grpc, "grpc")
    yield made
    made.close()


def _generate(client: NirvanaClient, prompt: str = PROMPT, **options: object):
    return client.generate(prompt, GenerateOptions(seed=4, steps=STEPS, **options))  # type: ignore[arg-type]


@pytest.mark.parametrize(("scale", "lora"), [(1.0, None), (0.6, None), (1.0, "ink:0.8")])
def test_served_images_equal_diffusers_controlnet_pipeline(client, tiny_checkpoint_dir, folders, scale, lora) -> None:
    control = _edges(0)
    options = {"controlnet": "edges", "control_image": control, "controlnet_scale": scale, "lora": lora} | BYPASS
    ours = _generate(client, **options)
    plain = _generate(client, lora=lora, cache_mode="bypass").image
    expected = diffusers_image(tiny_checkpoint_dir, folders, control, scale, lora=bool(lora))
    # onnxruntime vs torch, the residuals handed over between two models: float rounding only
    assert np.abs(ours.image.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(ours.image.astype(int) - plain.astype(int)).max() > 10  # the control really steers the image
    assert ours.server_timings_ms["unet_ms"] > 0


def test_a_latent_is_reused_only_under_the_same_control(client) -> None:
    prompt, edges = "a blue lighthouse at night", _edges(1)
    control = {"controlnet": "edges", "control_image": edges}
    assert not _generate(client, prompt, **control).cache_hit
    assert _generate(client, prompt, **control).cache_hit
    assert not _generate(client, prompt, controlnet="edges", control_image=_edges(2)).cache_hit  # another image
    assert not _generate(client, prompt, controlnet="lines", control_image=edges).cache_hit  # another ControlNet
    assert not _generate(client, prompt, controlnet_scale=0.5, **control).cache_hit  # another scale
    assert not _generate(client, prompt, lora="ink", **control).cache_hit  # with an adapter too
    assert not _generate(client, prompt).cache_hit  # no control


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"controlnet": "depth", "control_image": _edges(0)}, "CONTROLNET='depth': unknown controlnet 'depth'"),
        ({"controlnet": "edges"}, "CONTROL_IMAGE must be uint8 [64, 64, 3]"),
        ({"controlnet": "edges", "control_image": _edges(0), "controlnet_scale": 3.0}, "CONTROLNET_SCALE=3.0"),
        ({"control_image": _edges(0)}, "CONTROL_IMAGE='<image>': given without CONTROLNET"),
        ({"controlnet": "edges", "control_image": np.zeros((32, 32, 3), np.uint8)}, "CONTROL_IMAGE"),
    ],
)
def test_bad_control_inputs_are_invalid_arg_naming_them(client, options, named) -> None:
    with pytest.raises(InferenceServerException) as raised:
        _generate(client, cache_mode="bypass", **options)
    assert named in raised.value.message()
    assert "INVALID_ARG" in str(raised.value.status()) or raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.ready()


def _counts(server, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(rows, executions) of models ``names``, from Triton's own statistics."""
    import tritonclient.grpc as grpcclient

    triton = grpcclient.InferenceServerClient(server.urls.grpc)
    try:
        stats = triton.get_inference_statistics(as_json=True)["model_stats"]
    finally:
        triton.close()
    found = {s["name"]: (int(s.get("inference_count", 0)), int(s.get("execution_count", 0))) for s in stats}
    return {name: found.get(name, (0, 0)) for name in names}


def _scheduler_rows(server) -> float:
    text = requests.get(server.urls.metrics, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("nirvana_scheduler_rows_total"))


def test_requests_with_the_same_controlnet_share_its_and_the_unets_executions(client, server) -> None:
    names = ("unet_control", "controlnet_edges", "controlnet_lines")
    before, scheduled = _counts(server, names), _scheduler_rows(server)
    clients = [NirvanaClient(server.urls.grpc, "grpc") for _ in range(4)]
    controls = [("edges", 1.0), ("lines", 0.5), ("edges", 0.7), ("lines", 1.2)]
    try:
        threads = [
            threading.Thread(
                target=_generate,
                args=(c, f"a {i} cat"),
                kwargs={"controlnet": name, "control_image": _edges(i), "controlnet_scale": scale} | BYPASS,
            )
            for i, (c, (name, scale)) in enumerate(zip(clients, controls, strict=True))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for c in clients:
            c.close()
    after = _counts(server, names)
    grown = {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in names}
    assert grown["controlnet_edges"][0] == grown["controlnet_lines"][0] == 2 * STEPS * 2  # each its own model
    rows, executions = grown["unet_control"]
    assert rows == 4 * STEPS * 2  # a guidance pair per step per request, whatever its ControlNet and scale
    # Per iteration one execution per ControlNet and one UNet execution per ControlNet's rows: two requests with
    # the same ControlNet (other images, other scales) ran in one of each, not one per request-step.
    assert grown["controlnet_edges"][1] < 2 * STEPS and grown["controlnet_lines"][1] < 2 * STEPS
    assert executions < 4 * STEPS
    assert _scheduler_rows(server) - scheduled == rows  # the loops ran in the step scheduler, not the orchestrators
