"""Served ControlNets in a repository: residual shapes from the UNet's config, the `unet_control` and
`controlnet_<name>` contracts and configs, and exported graphs equal to diffusers' modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from nirvana.addons.controlnet_graphs import ControlNetGraph
from nirvana.contract.controlnet import (
    UNET_CONTROL_MODEL,
    control_specs,
    controlnet_model,
    controlnet_spec,
    residual_names,
    residual_shapes,
    unet_control_spec,
)
from nirvana.contract.specs import SpecError, unet_spec
from nirvana.runtime.onnx_runtime import OnnxModel
from nirvana_dev.tiny_addons import make_tiny_controlnet
from nirvana_export.controlnet_export import served_controlnets
from nirvana_export.onnx_export import export_graph
from nirvana_export.repository import RepositoryError, render_configs, sd15_specs

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}


def test_sd15_residuals_are_the_twelve_skip_connections_and_the_mid_block() -> None:
    shapes = residual_shapes(SD15_UNET, (64, 64))
    assert shapes[:4] == [(320, 64, 64)] * 3 + [(320, 32, 32)]
    assert shapes[4:7] == [(640, 32, 32)] * 2 + [(640, 16, 16)]
    assert shapes[7:10] == [(1280, 16, 16)] * 2 + [(1280, 8, 8)]
    assert shapes[10:] == [(1280, 8, 8)] * 3  # last down block (no downsampler), then the mid block
    assert residual_names(13)[-2:] == ["down_residual_11", "mid_residual"]


def test_residual_shapes_are_what_a_controlnet_answers(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint_dir / "unet", local_files_only=True)
    controlnet = ControlNetModel.from_pretrained(make_tiny_controlnet(tmp_path / "c", tiny_checkpoint_dir))
    down, mid = controlnet(
        torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 77, 32), torch.zeros(1, 3, 64, 64), return_dict=False
    )
    assert [tuple(t.shape[1:]) for t in (*down, mid)] == residual_shapes(unet.config, (16, 16))


def test_controlnet_graph_scales_each_row_by_its_own_scale(tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    controlnet = ControlNetModel.from_pretrained(make_tiny_controlnet(tmp_path / "c", tiny_checkpoint_dir)).eval()
    spec = served_controlnets(tiny_checkpoint_dir, {"controlnets": {"dir": str(tmp_path)}}, 16)[0]["controlnet_c"]
    path = export_graph(ControlNetGraph(controlnet), spec, tmp_path / "model.onnx")
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    image = torch.rand(2, 3, 64, 64, generator=gen)
    inputs = {"sample": sample, "timestep": torch.tensor([500.0, 20.0]), "encoder_hidden_states": text}
    inputs |= {"controlnet_cond": image, "conditioning_scale": torch.tensor([0.5, 1.5])}
    got = OnnxModel(path, num_threads=1).run({k: v.numpy() for k, v in inputs.items()})
    for row, (timestep, scale) in enumerate(((500, 0.5), (20, 1.5))):  # each row alone, at its scale, in diffusers
        with torch.no_grad():
            down, mid = controlnet(
                sample[row : row + 1],
                timestep,
                text[row : row + 1],
                image[row : row + 1],
                conditioning_scale=scale,
                return_dict=False,
            )
        for name, want in zip(spec.output_names, (*down, mid), strict=True):
            assert np.allclose(got[name][row], want[0].numpy(), atol=1e-4, rtol=1e-3), name


def test_control_specs_add_residual_inputs_to_the_unet_and_batch_like_it(tiny_checkpoint) -> None:
    specs = control_specs(tiny_checkpoint, ["edges"], unet_max_batch=16)
    assert list(specs) == [UNET_CONTROL_MODEL, "controlnet_edges"]
    unet, control = specs[UNET_CONTROL_MODEL], specs["controlnet_edges"]
    base = unet_spec(4, (16, 16), 77, 32, 16)
    residuals = residual_names(len(residual_shapes(tiny_checkpoint.unet_config, (16, 16))))
    assert unet.input_names == [*base.input_names, *residuals] and unet.output_names == ["noise_pred"]
    assert control.output_names == residuals
    assert control.input_names == [*base.input_names, "controlnet_cond", "conditioning_scale"]
    assert unet.max_batch_size == control.max_batch_size == 16


@pytest.mark.parametrize("name", ["../up", "a b", "", "x" * 80])
def test_a_controlnet_folder_name_must_make_a_model_name(name: str) -> None:
    with pytest.raises(SpecError, match="controlnet folder name"):
        controlnet_model(name)


def _sd15_control() -> dict:
    base, shapes = sd15_specs()["unet"], residual_shapes(SD15_UNET, (64, 64))
    canny = controlnet_spec("canny", base, (512, 512), shapes)
    return {UNET_CONTROL_MODEL: unet_control_spec(base, shapes), canny.name: canny}


@pytest.mark.parametrize(("profile", "marker"), [("cpu", 'backend: "python"'), ("gpu", 'platform: "tensorrt_plan"')])
def test_control_models_get_their_own_batched_configs(profile: str, marker: str) -> None:
    files = render_configs(sd15_specs(), (512, 512), profile, control=_sd15_control())
    for name in (UNET_CONTROL_MODEL, "controlnet_canny"):
        config = files[f"{name}/config.pbtxt"]
        assert marker in config and "dynamic_batching" in config and "max_batch_size: 16" in config
        assert "instance_group" in config
    assert 'name: "mid_residual"' in files["controlnet_canny/config.pbtxt"]
    assert ("controlnet_canny/1/model.py" in files) == (profile == "cpu")


def test_torch_profile_serves_the_controlnet_modules_themselves(tmp_path: Path) -> None:
    files = render_configs(sd15_specs(), (512, 512), "torch", checkpoint=tmp_path, control=_sd15_control())
    config = files["controlnet_canny/config.pbtxt"]
    assert 'key: "controlnet"' in config and 'string_value: "canny"' in config and "engine.json" in config
    assert "torch_model" in files["controlnet_canny/1/model.py"] and "torch_model" in files["unet_control/1/model.py"]


def test_gpu_profile_refuses_served_lora_until_tensorrt_refit_exists() -> None:
    with pytest.raises(RepositoryError, match="use the torch profile on a GPU"):
        render_configs(sd15_specs(), (512, 512), "gpu", adapters=True)


@pytest.mark.parametrize(("profile", "memory"), [("cpu", "cpu"), ("gpu", "cpu"), ("torch", "cpu")])
def test_the_step_scheduler_hands_residuals_over_in_host_memory_until_a_gpu_run(profile, memory, tmp_path) -> None:
    files = render_configs(sd15_specs(), (512, 512), profile, checkpoint=tmp_path, control=_sd15_control())
    config = files["step_scheduler/config.pbtxt"]
    assert f'key: "residual_memory"\n  value {{\n    string_value: "{memory}"' in config
