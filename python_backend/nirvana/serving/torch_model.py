"""Triton glue of the torch profile's sub-models: the checkpoint's own torch modules, on the GPU where there is one.

For machines with CUDA torch but no TensorRT. The outputs are handed to Triton with DLPack where they are: on a GPU
they stay in GPU memory, which is where TensorRT answers too, so the orchestrator's GPU data path
(`nirvana.runtime.bls`) runs exactly as it will against engines. Inputs are taken with DLPack as well, so the text
conditioning the orchestrator keeps on the GPU is not copied. Requests merged by dynamic batching (the `unet`) are
concatenated into one module call and split back (`nirvana.runtime.batching.run_merged`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nirvana.config import load_config
from nirvana.runtime.batching import BatchInputError
from nirvana.runtime.torch_runtime import component_runner
from nirvana.serving.internal import InternalGate
from nirvana.serving.merged import execute_merged
from nirvana.serving.params import engine_config_path, model_parameters

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        self.gate = InternalGate(pb_utils, args, params)
        device = params.get("device", "auto")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        # fp16 on a GPU (bf16 for SD 3 and FLUX, trained in bf16), but the VAE in fp32 unless told otherwise: SDXL's
        # VAE overflows in fp16.
        half = self.device.startswith("cuda") and config["name"] != "vae_decoder"
        bf16 = (Path(params["checkpoint"]) / "transformer").is_dir()
        dtype = DTYPES[params.get("dtype", ("bfloat16" if bf16 else "float16") if half else "float32")]
        component = params.get("component", config["name"])  # a LoRA set's model runs its base's component
        runner = component_runner(component, params["checkpoint"], self.device, dtype, **_addons(args, params))
        self.run = torch.inference_mode()(runner)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests: list) -> list:
        """N requests in, N responses out, in order; tensors stay on the device they are on."""
        pb = self.pb
        convert = (lambda tensor: torch.utils.dlpack.from_dlpack(tensor.to_dlpack()), _to_pb(pb))
        return execute_merged(
            pb, requests, (self.inputs, self.outputs), self.run, convert, (BatchInputError,), self.gate
        )


def _addons(args: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    """A served add-on's part (`component_runner`'s keywords): the ControlNet folder of a ``controlnet_<name>`` model,
    the adapter set of a LoRA set's UNet model (parameter ``lora``), both found through the engine configuration."""
    if "engine_config" not in params:
        return {}
    config = load_config(path=engine_config_path(args, params))
    found: dict[str, Any] = {}
    if "lora" in params:
        found["lora"] = (config.adapters.dir, params["lora"])
    if "controlnet" in params:
        found["controlnet"] = Path(config.controlnets.dir or ".") / params["controlnet"]
    return found


def _to_pb(pb: Any) -> Any:
    return lambda name, tensor: pb.Tensor.from_dlpack(name, tensor.contiguous())
