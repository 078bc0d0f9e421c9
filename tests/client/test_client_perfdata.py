"""perf-data JSON matches the served `nirvana` model's inputs (model_repository/nirvana/config.pbtxt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from nirvana_client.cli import app
from nirvana_client.client import INPUT_DATATYPES, OUTPUT_DATATYPES
from nirvana_client.perfdata import input_data
from nirvana_client.workload import WorkItem

CONFIG = Path(__file__).resolve().parents[2] / "model_repository" / "nirvana" / "config.pbtxt"
# config.pbtxt TYPE_* -> the datatype clients and perf_analyzer use (the model metadata's names)
TRITON_TYPES = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_INT32": "INT32", "TYPE_FP32": "FP32"}
TRITON_TYPES |= {"TYPE_UINT8": "UINT8", "TYPE_BOOL": "BOOL"}


def _config() -> mc.ModelConfig:
    """The committed config (itself checked against the server's spec by tests/export/test_repository.py)."""
    return text_format.Parse(CONFIG.read_text(), mc.ModelConfig())


def model_inputs() -> dict[str, dict]:
    """name -> {datatype, dims, optional} of the `nirvana` model's inputs."""
    return {
        i.name: {"datatype": TRITON_TYPES[mc.DataType.Name(i.data_type)], "dims": list(i.dims), "optional": i.optional}
        for i in _config().input
    }


def check_step(step: dict, inputs: dict[str, dict]) -> None:
    """What perf_analyzer's data loader demands of one step (src/data_loader.cc, perf_utils.cc)."""
    assert set(step) <= set(inputs), "a key that is not a model input is an error"
    assert {n for n, spec in inputs.items() if not spec["optional"]} <= set(step), "required inputs present"
    for name, tensor in step.items():
        spec = inputs[name]
        assert tensor["shape"] == spec["dims"] and len(tensor["content"]) == int(np.prod(spec["dims"]))
        if spec["datatype"] == "UINT8":  # the control image, row-major
            assert all(isinstance(v, int) and 0 <= v <= 255 for v in tensor["content"])
            continue
        value = tensor["content"][0]
        if spec["datatype"] == "BYTES":
            assert isinstance(value, str)
        elif spec["datatype"] == "FP32":
            assert isinstance(value, float)  # rapidjson IsDouble(): 7 would be rejected, 7.0 is read
        else:
            bits = 31 if spec["datatype"] == "INT32" else 63
            assert isinstance(value, int) and not isinstance(value, bool) and -(2**bits) <= value < 2**bits


def test_client_input_table_matches_config_pbtxt() -> None:
    inputs = model_inputs()
    assert {n: s["datatype"] for n, s in inputs.items()} == INPUT_DATATYPES
    assert [n for n, s in inputs.items() if not s["optional"]] == ["PROMPT"]


def test_client_output_table_matches_config_pbtxt() -> None:
    outputs = {o.name: TRITON_TYPES[mc.DataType.Name(o.data_type)] for o in _config().output}
    assert outputs == OUTPUT_DATATYPES


def test_every_option_gives_valid_perf_analyzer_data() -> None:
    items = [WorkItem(0, "a red fox", seed=4294731701, tenant="acme"), WorkItem(1, "ünïcode ramen", seed=1)]
    image = np.full(model_inputs()["CONTROL_IMAGE"]["dims"], 200, np.uint8)
    control = {"controlnet": "edges", "control_image": image, "controlnet_scale": 1}
    document = input_data(
        items,
        steps=20,
        guidance=7,
        cache_mode="bypass",
        tenant="default",
        negative_prompt="blurry",
        lora="ink:0.8",
        **control,
    )
    inputs = model_inputs()
    assert list(document) == ["data"] and len(document["data"]) == 2
    for step in document["data"]:
        check_step(step, inputs)
    first, second = document["data"]
    assert set(first) == set(inputs)
    assert first["PROMPT"]["content"] == ["a red fox"] and first["SEED"]["content"] == [4294731701]
    assert first["TENANT"]["content"] == ["acme"] and second["TENANT"]["content"] == ["default"]
    assert first["GUIDANCE_SCALE"]["content"] == [7.0] and '"content": [7.0]' in json.dumps(first["GUIDANCE_SCALE"])
    assert first["NUM_INFERENCE_STEPS"]["content"] == [20]
    assert first["CONTROL_IMAGE"]["content"][:3] == [200, 200, 200]
    assert first["CONTROLNET_SCALE"]["content"] == [1.0]


def test_server_defaults_leave_optional_inputs_out() -> None:
    step = input_data([WorkItem(0, "a cat", seed=0)])["data"][0]
    assert set(step) == {"PROMPT", "SEED"}
    check_step(step, model_inputs())


def test_perf_data_command_writes_the_workload(tmp_path) -> None:
    workload = tmp_path / "w.csv"
    workload.write_text('prompt,seed\n"a cat, sleeping",5\na dog,6\n\n')
    out = tmp_path / "input.json"
    result = CliRunner().invoke(app, ["perf-data", str(workload), "-o", str(out), "--steps", "20"])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text(encoding="utf-8"))
    assert [s["PROMPT"]["content"][0] for s in document["data"]] == ["a cat, sleeping", "a dog"]
    assert [s["SEED"]["content"][0] for s in document["data"]] == [5, 6]
    for step in document["data"]:
        check_step(step, model_inputs())


def test_perf_data_rejects_an_unknown_cache_mode(tmp_path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("a cat\n")
    result = CliRunner().invoke(app, ["perf-data", str(workload), "--cache-mode", "sometimes"])
    assert result.exit_code != 0 and "sometimes" in result.output


@pytest.mark.parametrize("seed", [2**63, -1])
def test_seed_outside_int64_is_refused(tmp_path, seed) -> None:
    workload = tmp_path / "w.csv"
    workload.write_text(f"prompt,seed\na cat,{seed}\n")
    result = CliRunner().invoke(app, ["perf-data", str(workload), "-o", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "INT64" in result.output
