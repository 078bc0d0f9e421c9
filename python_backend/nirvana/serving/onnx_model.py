"""Triton glue of the CPU profile's sub-models: one python-backend model runs one ONNX file with onnxruntime.

The bundled tritonserver has no onnxruntime backend, so `text_encoder`, `prompt_embedder`, `unet` and
`vae_decoder` are python models whose `1/model.py` re-exports `TritonPythonModel` from here. Inputs and outputs
are the names declared in the model's config.pbtxt (generated from `nirvana.contract.specs`).

A model with dynamic batching (the `unet`) receives several requests per `execute`: compatible ones are
concatenated into one onnxruntime run and split back (`nirvana.runtime.batching.run_merged`). Models with
`max_batch_size: 0` get one request per `execute` and run it as it is.

A LoRA set's UNet (`nirvana.serving.adapter_model`) is this model too, with parameters `onnx_file` (the base UNet's
file) and `initializer_overrides` (a safetensors file of the set's fused weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from nirvana.runtime.batching import BatchInputError
from nirvana.runtime.onnx_runtime import OnnxModel, OnnxModelError
from nirvana.serving.internal import InternalGate
from nirvana.serving.merged import execute_merged
from nirvana.serving.params import model_parameters


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        self.gate = InternalGate(pb_utils, args, params)
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        overrides = None
        if "initializer_overrides" in params:  # a LoRA set's UNet (the `adapters` model loads these)
            path = Path(params["onnx_file"])
            overrides = load_file(params["initializer_overrides"])
        self.model = OnnxModel(path, num_threads=int(params.get("intra_op_threads", "1")), overrides=overrides)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests: list) -> list:
        """N requests in, N responses out, in order (python models are handed the batch unmerged)."""
        pb = self.pb
        convert = (lambda tensor: tensor.as_numpy(), pb.Tensor)
        invalid = (BatchInputError, OnnxModelError)
        return execute_merged(pb, requests, (self.inputs, self.outputs), self.model.run, convert, invalid, self.gate)
