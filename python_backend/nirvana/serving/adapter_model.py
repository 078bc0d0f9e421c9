"""Triton glue of the decoupled `adapters` model: one UNet model per LoRA adapter set, loaded on demand (LRU).

An orchestrator asks with ``ADAPTERS`` (a set's canonical ``LORA`` text) and gets ``MODEL``, the name of a UNet model
with that set fused in. A loaded set is answered inside `execute`; a set not loaded is fused on the loader thread
(`nirvana.addons.lora_onnx`: diffusers fuses it on the torch UNet, the changed weights override the base ONNX file's
initializers), written as one safetensors file and loaded in-process (`pb_utils.load_model`, the C API: no network
endpoint) as a copy of the `unet` model's config (same batching, same instances) that runs the base ONNX file with
those overrides. The loading call runs in a helper model this one loads at start, `<name>_loader`
(`nirvana.addons.variant_pool.LoaderModel`): the python backend freezes the stub that calls `load_model` until the load
ends, and in this stub that froze every answer. With a ControlNet (``BASE`` = ``unet_control``) the set is fused the
same way into the UNet with residual inputs. Being decoupled, this one instance never makes a request for a loaded
set wait behind a load (`nirvana.addons.variant_pool`), and the loads are bounded (`AdaptersConfig`): a request beyond
`max_pending_loads` distinct sets in line, or one that waited `load_wait_s`, gets UNAVAILABLE naming the limit.

Needs `--model-control-mode=explicit --load-model=*` (the dev launcher passes it when the repository has this model);
the public model-control protocol is not used and can be restricted. A file that cannot serve this UNet is refused
when the model starts (logged); the server stays up, and a request naming it gets INVALID_ARG saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from safetensors.numpy import save_file
from tritonclient.grpc import model_config_pb2 as mc

from nirvana.addons.lora import AdapterError, AdapterLibrary, AdapterSet, format_adapters, parse_adapters
from nirvana.addons.lora_onnx import InitializerIndex, fused_overrides, variant_name
from nirvana.addons.variant_pool import LOADER_PY, TOKEN_DIGEST, TOKEN_PARAMETER, LoadTimeout, PoolBusy, VariantPool
from nirvana.config import AdaptersConfig, load_config
from nirvana.contract.controlnet import UNET_CONTROL_MODEL
from nirvana.contract.specs import NIRVANA_MODEL
from nirvana.serving.internal import SECRET_PARAMETER, InternalGate
from nirvana.serving.metrics import Families
from nirvana.serving.params import engine_config_path, model_parameters

log = logging.getLogger("nirvana.addons.lora")


def _string(name: str) -> dict[str, Any]:
    return {"name": name, "data_type": "TYPE_STRING", "dims": [1]}


class InProcessLoader:
    """Loads and unloads set models through the helper model ``<adapters>_loader`` (`LoaderModel`), which this
    model loads itself with ``pb_utils.load_model`` once, at start; every later call is a BLS request carrying a
    token made for this instance, so no client can make the helper load anything."""

    def __init__(self, pb: Any, model_config: dict[str, Any]) -> None:
        self.pb, self.name = pb, f"{model_config['name']}_loader"
        self._token = secrets.token_urlsafe(32)
        digest = hashlib.sha256(self._token.encode()).hexdigest()
        parameters = {TOKEN_DIGEST: {"string_value": digest}}
        if "EXECUTION_ENV_PATH" in model_config.get("parameters", {}):  # the stub's Python, as this model's
            parameters["EXECUTION_ENV_PATH"] = model_config["parameters"]["EXECUTION_ENV_PATH"]
        self._config = {
            "name": self.name,
            "backend": "python",
            "max_batch_size": 0,
            "input": [_string(n) for n in ("ACTION", "NAME", "KIND", "CONFIG")],
            "output": [_string("MODEL")],
            "instance_group": [{"kind": "KIND_CPU", "count": 1}],
            "parameters": parameters,
        }
        for item in self._config["input"][2:]:
            item["optional"] = True
        self.ready = False

    def start(self) -> None:
        """Load the helper (this stub waits for it: done once, on the loader thread, before any set loads)."""
        start = time.perf_counter()
        self.pb.load_model(
            model_name=self.name, config=json.dumps(self._config), files={"file:1/model.py": LOADER_PY.encode()}
        )
        self.ready = True
        log.info("adapters: loader model %s ready in %.2f s", self.name, time.perf_counter() - start)

    def _call(self, **inputs: str) -> None:
        pb = self.pb
        if not self.ready:
            self.start()
        tensors = [pb.Tensor(k, np.array([v.encode()], dtype=np.object_)) for k, v in inputs.items()]
        request = pb.InferenceRequest(
            model_name=self.name,
            inputs=tensors,
            requested_output_names=["MODEL"],
            parameters={TOKEN_PARAMETER: self._token},
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{inputs['ACTION']} of {inputs['NAME']} failed: {response.error().message()}")

    def load(self, name: str, config: str, kind: str) -> None:
        self._call(ACTION="load", NAME=name, KIND=kind, CONFIG=config)

    def unload(self, name: str) -> None:
        self._call(ACTION="unload", NAME=name)


class UNetVariants:
    """Fuses an adapter set into a base model of the repository (``unet``, or ``unet_control`` with residual inputs
    for requests with a ControlNet) and loads or unloads its UNet model through ``loader`` (`InProcessLoader`)."""

    def __init__(self, library: AdapterLibrary, repository: Path, work_dir: Path, loader: Any) -> None:
        self.library, self.repository, self.work_dir, self.loader = library, repository, work_dir, loader
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
            kind = "torch"
        else:  # onnxruntime: the base file with the set's fused weights as initializer overrides
            weights = self.work_dir / f"{name}.safetensors"
            index = self._index(base)
            save_file(fused_overrides(self.library, adapters, index), str(weights))
            config.parameters["onnx_file"].string_value = str(index.path.resolve())
            config.parameters["initializer_overrides"].string_value = str(weights.resolve())
            kind = "onnx"
        fused = time.perf_counter()
        config.name = name
        if SECRET_PARAMETER in config.parameters:  # relative to the base's folder; the set model lives elsewhere
            secret = Path(config.parameters[SECRET_PARAMETER].string_value)
            if not secret.is_absolute():
                config.parameters[SECRET_PARAMETER].string_value = str((self.repository / base / secret).resolve())
        self.loader.load(name, json_format.MessageToJson(config, preserving_proto_field_name=True), kind)
        log.info(
            "adapters %s: fused in %.3f s, model %s loaded in %.3f s",
            adapters,
            fused - start,
            name,
            time.perf_counter() - fused,
        )
        return name

    def unload(self, name: str) -> None:
        self.loader.unload(name)
        (self.work_dir / f"{name}.safetensors").unlink(missing_ok=True)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils
        from diffusers import UNet2DConditionModel

        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        params = model_parameters(model_config)
        self.gate = InternalGate(pb_utils, args, params)  # only the orchestrators may ask for set models
        config = load_config(path=engine_config_path(args, params))
        self.settings: AdaptersConfig = config.adapters
        unet = UNet2DConditionModel.from_pretrained(Path(config.checkpoint) / "unet", local_files_only=True)
        # Merged copies are made one at a time and dropped once their overrides are written.
        self.library = AdapterLibrary(
            config.adapters.dir, unet.eval(), max_loaded=1, strict=False, scale_step=config.adapters.scale_step
        )
        model_dir = Path(args["model_repository"])
        self.loader = InProcessLoader(pb_utils, model_config)
        # The sets' fused weights go under the cache folder: the serving container mounts the repository read-only.
        work_dir = Path(config.cache.dir) / "adapter-sets"
        self.variants = UNetVariants(self.library, model_dir.parent, work_dir, self.loader)
        self._metrics(pb_utils)
        self.pool = VariantPool(
            self.variants.load,
            self.variants.unload,
            config.adapters.max_loaded,
            max_pending=config.adapters.max_pending_loads,
            wait_s=config.adapters.load_wait_s,
            on_change=self._publish,
        )
        # The helper loads on the loader thread at the first request, not now: a model load started while the server
        # is still loading the repository's models crashed it once (boost::interprocess::lock_exception). At the first
        # request no set is loaded yet, so its load (which freezes this stub) delays no loaded set's answer.
        self._loader_started = False
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
        self._pending_gauge = make.gauge("nirvana_adapter_sets_pending", "Adapter sets waiting for or in a load")
        self._unloads = make.counter("nirvana_adapter_unloads_total", "Adapter sets unloaded (least recently used)")
        self._refused = make.counter(
            "nirvana_adapter_refused_total",
            "Requests refused UNAVAILABLE: adapters.max_pending_loads sets in line, or adapters.load_wait_s passed",
        )
        self._families, self._published, self._lock = make, (0, 0, 0), threading.Lock()

    def _start_loader(self) -> None:
        try:
            self.loader.start()
        except Exception:
            log.exception("adapters: loader model %s did not load (retried with the first set)", self.loader.name)

    def execute(self, requests: list) -> None:
        if not self._loader_started:
            self._loader_started = True
            self.pool.submit(self._start_loader)
        for request in requests:
            sender = request.get_response_sender()
            refusal = self.gate.refusal(request)
            if refusal is not None:
                sender.send(refusal, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
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
        if tensor is None or tensor.as_numpy().size != 1 or len(tensor.as_numpy().reshape(-1)[0]) > 4096:
            raise AdapterError("ADAPTERS must be one string of at most 4096 bytes")
        value = bytes(tensor.as_numpy().reshape(-1)[0]).decode("utf-8", errors="replace")
        adapters = parse_adapters(value, set(self.library.files), self.settings.scale_step)
        self.library.check_usable(adapters)
        tensor = self.pb.get_input_tensor_by_name(request, "BASE")
        base = "unet" if tensor is None else bytes(tensor.as_numpy().reshape(-1)[0]).decode("utf-8", errors="replace")
        if base not in self.variants.bases:
            raise AdapterError(f"BASE={base!r}: this repository serves {self.variants.bases}")
        return base, adapters

    def _answer(self, sender: Any, name: str | None, err: Exception | None) -> None:
        pb = self.pb
        if err is not None:
            if isinstance(err, AdapterError):
                code = pb.TritonError.INVALID_ARG
            elif isinstance(err, PoolBusy | LoadTimeout):  # the set is fine; the loader is busy: retry later
                code = pb.TritonError.UNAVAILABLE
            else:
                code = pb.TritonError.INTERNAL
            response = pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}", code))
        else:
            model = pb.Tensor("MODEL", np.array([name.encode()], dtype=np.object_))
            response = pb.InferenceResponse(output_tensors=[model])
        self._publish()
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _publish(self) -> None:
        with self._lock:  # answered from `execute`, the loader thread and the deadline thread
            loads, unloads, refused = self._published
            for seconds in self.pool.load_seconds[loads:]:
                self._load_hist.observe(seconds)
            self._unloads.increment(self.pool.unloads - unloads)
            turned_away = self.pool.refused + self.pool.timeouts
            self._refused.increment(turned_away - refused)
            self._published = (len(self.pool.load_seconds), self.pool.unloads, turned_away)
            self._loaded_gauge.set(len(self.pool.loaded()))
            self._pending_gauge.set(self.pool.pending())

    def finalize(self) -> None:
        self.pool.close()
        self.library.close()
