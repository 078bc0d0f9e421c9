"""perf_analyzer `--input-data` JSON for the `nirvana` model, made from a prompt workload.

Format (perf_analyzer docs/input_data.md, "Real Input Data"): {"data": [step, ...]}, one step per request,
each {INPUT_NAME: {"content": [values...], "shape": [1]}} (CONTROL_IMAGE: its pixels, shape [H, W, 3]).
perf_analyzer sends the steps round robin. What it accepts, from its data loader: keys must be model inputs
(anything else is an error), optional inputs may be left out, BYTES content must be JSON strings, INT32/INT64 JSON
integers, and FP32 JSON numbers written as floating point (`7.0`, not `7`, which rapidjson does not count as a
double).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nirvana_client.client import INPUT_DATATYPES, GenerateOptions, request_values
from nirvana_client.workload import WorkItem

INT_RANGES = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}


def json_value(name: str, value: object) -> str | int | float:
    """`value` as the JSON type perf_analyzer reads for input `name`'s datatype."""
    datatype = INPUT_DATATYPES[name]
    if datatype == "BYTES":
        return str(value)
    if datatype == "FP32":
        return float(value)  # type: ignore[arg-type]
    number = int(value)  # type: ignore[call-overload]
    low, high = INT_RANGES[datatype]
    if not low <= number <= high:
        raise ValueError(f"{name}={number}: outside the {datatype} range")
    return number


def input_data(
    items: Sequence[WorkItem],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    cache_mode: str | None = None,
    tenant: str | None = None,
    negative_prompt: str | None = None,
    lora: str | None = None,
    controlnet: str | None = None,
    control_image: np.ndarray | None = None,
    controlnet_scale: float | None = None,
) -> dict[str, list[dict[str, dict]]]:
    """The perf_analyzer JSON document: one step per work item, with the item's prompt and seed (the other
    inputs the same in every step; ``control_image`` uint8 ``[H, W, 3]``)."""
    data = []
    for item in items:
        tenant_of_item = item.tenant if item.tenant is not None else tenant
        options = GenerateOptions(
            negative_prompt,
            item.seed,
            steps,
            guidance,
            cache_mode,
            tenant_of_item,
            lora,
            controlnet,
            control_image,
            controlnet_scale,
        )
        data.append({name: _entry(name, value) for name, value in request_values(item.prompt, options)})
    return {"data": data}


def _entry(name: str, value: object) -> dict:
    if isinstance(value, np.ndarray):  # the control image: its pixels, row-major, with its shape
        return {"content": value.astype(np.uint8).reshape(-1).tolist(), "shape": list(value.shape)}
    return {"content": [json_value(name, value)], "shape": [1]}


def write_input_data(document: dict, path: Path) -> Path:
    """Write the document as UTF-8 JSON (non-ASCII prompts kept as they are: perf_analyzer reads UTF-8)."""
    path = Path(path)
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
