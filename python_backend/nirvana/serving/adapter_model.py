"""Triton glue of the decoupled `adapters` model: one UNet model per LoRA adapter set, loaded on demand (LRU).

An orchestrator asks with ``ADAPTERS`` (a set's canonical ``LORA`` text) and gets ``MODEL``, the name of a UNet model
with that set fused in. A loaded set is answered inside `execute`; a set not loaded is fused on the loader thread
(`nirvana.lora_onnx`: diffusers fuses it on the torch UNet, the changed weights override the base ONNX file's
initializers), written as one safetensors file and loaded through Triton's model-control API as a copy of the `unet`
model's config (same batching, same instances) that runs the base ONNX file with those overrides. With a ControlNet
(``BASE`` = ``unet_control``) the set is fused the same way into the UNet with residual inputs. Being decoupled,
this one instance never makes a request for a loaded set wait behind a load (`nirvana.variant_pool`).

Needs `--model-control-mode=explicit --load-model=*` (the dev launcher passes it when the repository has this model)
and the server's gRPC endpoint at ``$NIRVANA_MODEL_CONTROL_URL`` (the launcher sets it; default ``127.0.0.1:8001``).
A file that cannot serve this UNet is refused when the model starts (logged); the server stays up, and a request
naming it gets INVALID_ARG saying why.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from safetensors.numpy import save_file
from tritonclient.grpc import model_config_pb2 as mc

from nirvana.adapters import AdapterError, AdapterLibrary, AdapterSet, format_adapters, parse_adapters
from nirvana.config import load_config
from nirvana.controlnet_spec import UNET_CONTROL_MODEL
from nirvana.lora_onnx import InitializerIndex, fused_overrides, variant_name
from nirvana.serving.metrics import Families
from nirvana.serving.params import engine_config_path, model_parameters
from nirvana.specs import NIRVANA_MODEL
from nirvana.variant_pool import CONTROL_ENV, DEFAULT_CONTROL_URL, VariantPool

log = logging.getLogger("nirvana.adapters")
VARIANT_PY = (
    '"""Triton python model: the base UNet ONNX file with one LoRA set\'s fused weights (nirvana adapters)."""\n\n'
    "from nirvana.serving.onnx_model import TritonPythonModel  # noqa: F401\n"
)
TORCH_VARIANT_PY = (
    '"""Triton python model: the checkpoint\'s UNet with a LoRA set fused in (nirvana adapters, torch profile)."""\n\n'
    "from nirvana.serving.torch_model import TritonPythonModel  # noqa: F401\n"
)


class UNetVariants:
    """Loads and unloads the UNet model of an adapter set through the server's model-control API (gRPC, at
    ``$NIRVANA_MODEL_CONTROL_URL``, default the NGC image's own port on the loopback). A set is fused into a base
    model of the repository: ``unet``, or ``unet_control`` (residual inputs) for requests with a ControlNet."""

    def __init__(self, library: AdapterLibrary, repository: Path, work_dir: Path) -> None:
        import tritonclient.grpc as grpcclient

        self.library, self.repository, self.work_dir = library, repository, work_dir
        self.control = grpcclient.InferenceServerClient(os.environ.get(CONTROL_ENV, DEFAULT_CONTROL_URL))
        self.bases = [name for name in ("unet", UNET_CONTROL_MODEL) if (repository / name / "config.pbtxt").exists()]
        self._indexes: dict[str, InitializerIndex] = {}  # built on a base's first set (the loader thread)
        work_dir.mkdir(parents=True, exist_ok=True)

    def _index(self, base: str) -> InitializerIndex:
        if base not in self._indexes:
            self._indexes[base] = InitializerIndex(self.repository / base / "1" / "model.onnx")
        return self._indexes[base]

    def load(self, key: tuple[str, AdapterSet]) -> str:
        base, adapters = key
        config = text_format.Parse((self.repository / base / "config.pbtxt").read_text(), mc.ModelConfig())
        name = variant_name(base, self.library.fingerprint(adapters))
        start = time.perf_counter()
        if "checkpoint" in config.parameters:  # the torch profile: the set's model fuses it into its own module
            config.parameters["lora"].string_value = format_adapters(adapters)
            config.parameters["component"].string_value = base
            engine = self.repository / NIRVANA_MODEL / "engine.json"
            config.parameters["engine_config"].string_value = str(engine.resolve())
            model_py = TORCH_VARIANT_PY
        else:  # onnxruntime: the base file with the set's fused weights as initializer overrides
            weights = self.work_dir / f"{name}.safetensors"
            index = self._index(base)
            save_file(fused_overrides(self.library, adapters, index), str(weights))
            config.parameters["onnx_file"].string_value = str(index.path.resolve())
            config.parameters["initializer_overrides"].string_value = str(weights.resolve())
            model_py = VARIANT_PY
        fused = time.perf_counter()
        config.name = name
        text = json_format.MessageToJson(config, preserving_proto_field_name=True)
        self.control.load_model(name, config=text, files={"file:1/model.py": model_py.encode()})
        log.info(
            "adapters %s: fused in %.3f s, model %s loaded in %.3f s",
            adapters,
            fused - start,
            name,
            time.perf_counter() - fused,
        )
        return name

    def unload(self, name: str) -> None:
        self.control.unload_model(name)
        (self.work_dir / f"{name}.safetensors").unlink(missing_ok=True)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils
        from diffusers import UNet2DConditionModel

        self.pb = pb_utils
        params = model_parameters(json.loads(args["model_config"]))
        config = load_config(path=engine_config_path(args, params))
        unet = UNet2DConditionModel.from_pretrained(Path(config.checkpoint) / "unet", local_files_only=True)
        # Merged copies are made one at a time and dropped once their overrides are written.
        self.library = AdapterLibrary(config.adapters.dir, unet.eval(), max_loaded=1, strict=False)
        model_dir = Path(args["model_repository"])
        self.variants = UNetVariants(self.library, model_dir.parent, model_dir / "variants")
        self.pool = VariantPool(self.variants.load, self.variants.unload, config.adapters.max_loaded)
        self._metrics(pb_utils)
        log.info("adapters: %d files, refused: %s", len(self.library.files), sorted(self.library.refused) or "none")

    def _metrics(self, pb: Any) -> None:
        make = Families(pb)
        self._load_hist = make.metric(
            "nirvana_adapter_load_seconds",
            "Seconds to fuse an adapter set and load its UNet model",
            pb.MetricFamily.HISTOGRAM,
            buckets=[0.1, 0.3, 1, 3, 10, 30, 100],
        )
        self._loaded_gauge = make.gauge("nirvana_adapter_sets_loaded", "Adapter sets with a UNet model loaded")
        self._unloads = make.counter("nirvana_adapter_unloads_total", "Adapter sets unloaded (least recently used)")
        self._families, self._published, self._lock = make, (0, 0), threading.Lock()

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                key = self._parse(request)
            except AdapterError as err:
                self._answer(sender, None, err)
                continue
            self.pool.request(key, lambda name, err, sender=sender: self._answer(sender, name, err))
        return None

    def _parse(self, request: Any) -> tuple[str, AdapterSet]:
        """The pool's key of a request: (base model, adapter set)."""
        tensor = self.pb.get_input_tensor_by_name(request, "ADAPTERS")
        value = bytes(tensor.as_numpy().reshape(-1)[0]).decode("utf-8")
        adapters = parse_adapters(value, set(self.library.files))
        self.library.check_usable(adapters)
        tensor = self.pb.get_input_tensor_by_name(request, "BASE")
        base = "unet" if tensor is None else bytes(tensor.as_numpy().reshape(-1)[0]).decode("utf-8")
        if base not in self.variants.bases:
            raise AdapterError(f"BASE={base!r}: this repository serves {self.variants.bases}")
        return base, adapters

    def _answer(self, sender: Any, name: str | None, err: Exception | None) -> None:
        pb = self.pb
        if err is not None:
            code = pb.TritonError.INVALID_ARG if isinstance(err, AdapterError) else pb.TritonError.INTERNAL
            response = pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}", code))
        else:
            model = pb.Tensor("MODEL", np.array([name.encode()], dtype=np.object_))
            response = pb.InferenceResponse(output_tensors=[model])
        self._publish()
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _publish(self) -> None:
        with self._lock:  # answered from `execute` and from the loader thread
            loads, unloads = self._published
            for seconds in self.pool.load_seconds[loads:]:
                self._load_hist.observe(seconds)
            self._unloads.increment(self.pool.unloads - unloads)
            self._published = (len(self.pool.load_seconds), self.pool.unloads)
            self._loaded_gauge.set(len(self.pool.loaded()))

    def finalize(self) -> None:
        self.pool.close()
        self.library.close()
        self.variants.control.close()
