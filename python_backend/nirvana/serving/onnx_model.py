"""Triton glue of the CPU profile's sub-models: one python-backend model runs one ONNX file with onnxruntime.

The bundled tritonserver has no onnxruntime backend, so `text_encoder`, `prompt_embedder`, `unet` and
`vae_decoder` are python models whose `1/model.py` re-exports `TritonPythonModel` from here. Inputs and outputs
are the names declared in the model's config.pbtxt (generated from `nirvana.specs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nirvana.runtime.onnx_runtime import OnnxModel, OnnxModelError


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.model = OnnxModel(path, num_threads=int(params.get("intra_op_threads", "1")))
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:  # python models get N requests and must return N responses
            try:
                feeds = {name: pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                out = self.model.run(feeds)
                responses.append(pb.InferenceResponse([pb.Tensor(name, out[name]) for name in self.outputs]))
            except OnnxModelError as err:
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(err), pb.TritonError.INVALID_ARG)))
        return responses
