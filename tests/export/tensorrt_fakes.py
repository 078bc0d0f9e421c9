"""TensorRT faked at its API boundary for CPU CI, and a finder that makes torch unimportable.

Only what needs a GPU is fake: the ``tensorrt`` module (a version and its enums) and polygraphy's TensorRT backend
(``polygraphy.backend.trt``). Everything else is the real thing: polygraphy's ``Profile``, ``Comparator``,
``CompareFunc`` and ``OnnxrtRunner``, onnxruntime, the repository writer. Each fake call is checked against the
signature of the real polygraphy function it stands for (the real module imports without TensorRT), so a keyword
polygraphy does not take fails here as it would on a GPU. The fake "engine" computes with onnxruntime on the ONNX
file it was built from — in fp16 (onnxruntime's float16 conversion) when the config asks for fp16 — plus optional
noise, and enforces the optimization profile's shape bounds as TensorRT does.

No torch import anywhere in this file: the subprocess test runs it with torch blocked.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TRT_VERSION = "10.8.0.43"  # the Dockerfile's TENSORRT_VERSION


class TorchBlocker:
    """A meta path finder: ``import torch`` (and any ``torch.*``) raises ImportError, as if torch were absent."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test: the TensorRT build/check path must not import {name}")
        return None

    @staticmethod
    def install() -> TorchBlocker:
        blocker = TorchBlocker()
        for name in [n for n in sys.modules if n == "torch" or n.startswith("torch.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, blocker)
        return blocker


def fake_tensorrt(version: str = TRT_VERSION) -> types.ModuleType:
    """``tensorrt`` as far as nirvana's build path reads it: the version and the enums it names. 10.x has
    ``BuilderFlag.FP16`` (weak typing); 11.x does not (strongly typed)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    flags = {"TF32": "TF32"} | ({"FP16": "FP16"} if int(version.split(".")[0]) < 11 else {})
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    return trt


def _checked(real: Callable, record: list, label: str) -> Callable[[Callable], Callable]:
    """Decorator: bind the call to ``real``'s signature (TypeError on a keyword polygraphy lacks), record it."""
    signature = inspect.signature(real)

    def wrap(fake: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            signature.bind(*args, **kwargs)
            record.append((label, args, kwargs))
            return fake(*args, **kwargs)

        return call

    return wrap


class FakeEngine:
    """What ``engine_from_network`` returns: the ONNX path, each profile's bounds, fp16 or not, output noise."""

    def __init__(self, onnx_path: str, profiles: list[dict[str, tuple]], fp16: bool, noise: float) -> None:
        self.onnx_path, self.profiles, self.fp16, self.noise = onnx_path, profiles, fp16, noise

    def serialize(self) -> bytes:
        import json

        shapes = [{k: [list(s) for s in v] for k, v in profile.items()} for profile in self.profiles]
        return b"FAKEPLAN" + json.dumps([self.onnx_path, shapes, self.fp16, self.noise]).encode()

    @staticmethod
    def deserialize(data: bytes) -> FakeEngine:
        import json

        assert data.startswith(b"FAKEPLAN"), "not a plan written by the fake save_engine"
        path, shapes, fp16, noise = json.loads(data[8:])
        profiles = [{k: tuple(tuple(s) for s in v) for k, v in profile.items()} for profile in shapes]
        return FakeEngine(path, profiles, fp16, noise)


def fake_polygraphy_trt(noise: float = 0.0, fail_build: str | None = None) -> types.ModuleType:
    """A stand-in for ``polygraphy.backend.trt``; ``module.calls`` records (name, args, kwargs) of every call.
    ``noise``: stddev added to every engine output; ``fail_build``: raise PolygraphyException from the build."""
    import onnx
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.exception import PolygraphyException

    real = importlib.import_module("polygraphy.backend.trt")
    mod = types.ModuleType("polygraphy.backend.trt")
    calls: list[tuple[str, tuple, dict]] = []
    mod.calls = calls
    mod.Profile = real.Profile  # pure Python: the real one

    @_checked(real.network_from_onnx_path, calls, "network_from_onnx_path")
    def network_from_onnx_path(path: str, **_: Any) -> tuple:
        model = onnx.load(str(path), load_external_data=False)
        inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
        network = types.SimpleNamespace(
            onnx_path=str(path),
            num_inputs=len(inputs),
            num_outputs=len(outputs),
            get_input=lambda i: types.SimpleNamespace(name=inputs[i]),
            get_output=lambda i: types.SimpleNamespace(name=outputs[i]),
        )
        return types.SimpleNamespace(name="builder"), network, types.SimpleNamespace(name="parser")

    mod.network_from_onnx_path = network_from_onnx_path

    class CreateConfig:
        def __init__(self, **kwargs: Any) -> None:
            inspect.signature(real.CreateConfig.__init__).bind(self, **kwargs)
            calls.append(("CreateConfig", (), kwargs))
            self.kwargs = kwargs

    mod.CreateConfig = CreateConfig

    @_checked(real.engine_from_network, calls, "engine_from_network")
    def engine_from_network(network: tuple, config: Any = None, save_timing_cache: str | None = None, **_: Any):
        if fail_build:
            raise PolygraphyException(fail_build)
        kwargs = config.kwargs
        load = kwargs.get("load_timing_cache")
        old = Path(load).read_bytes() if load else b""
        if save_timing_cache:
            Path(save_timing_cache).write_bytes(old + b"timings;")
        bounds = [
            {name: (tuple(s.min), tuple(s.opt), tuple(s.max)) for name, s in profile.items()}
            for profile in kwargs["profiles"]
        ]
        return FakeEngine(network[1].onnx_path, bounds, bool(kwargs.get("fp16")), noise)

    mod.engine_from_network = engine_from_network

    @_checked(real.save_engine, calls, "save_engine")
    def save_engine(engine: FakeEngine, path: str) -> FakeEngine:
        Path(path).write_bytes(engine.serialize())
        return engine

    mod.save_engine = save_engine

    @_checked(real.EngineFromPath.__init__, calls, "EngineFromPath")
    def _engine_from_path(self: Any, path: str, **_: Any) -> None:
        pass

    class EngineFromPath:
        def __init__(self, path: str, **kwargs: Any) -> None:
            _engine_from_path(self, path, **kwargs)
            self.path = path

        def __call__(self) -> FakeEngine:
            return FakeEngine.deserialize(Path(self.path).read_bytes())

    mod.EngineFromPath = EngineFromPath

    class TrtRunner(OnnxrtRunner):
        """The real OnnxrtRunner on the engine's ONNX file (fp16-converted for fp16 engines), with TensorRT's
        bounds of the chosen profile (``optimization_profile``, as TensorRT's) enforced and the engine's noise added."""

        def __init__(self, engine: Any, name: str | None = None, **kwargs: Any) -> None:
            inspect.signature(real.TrtRunner.__init__).bind(self, engine, name=name, **kwargs)
            calls.append(("TrtRunner", (engine,), {"name": name, **kwargs}))

            def session() -> Any:
                import onnxruntime as ort

                path = self.engine.onnx_path
                if self.engine.fp16:
                    from onnxruntime.transformers import float16

                    model = float16.convert_float_to_float16(onnx.load(path), keep_io_types=True)
                    path = model.SerializeToString()
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

            super().__init__(session, name=name)
            self.engine = engine() if callable(engine) else engine  # after the base init: __del__ needs it
            self.profile = kwargs.get("optimization_profile") or 0
            calls.append(("TrtRunner.profile", (self.profile,), {}))

        def infer_impl(self, feed_dict: dict, **kwargs: Any) -> dict:
            for input_name, value in feed_dict.items():
                if self.profile >= len(self.engine.profiles):
                    raise PolygraphyException(f"profile {self.profile}: the engine has {len(self.engine.profiles)}")
                low, _, high = self.engine.profiles[self.profile][input_name]
                shape = np.shape(value)
                if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
                    raise PolygraphyException(f"input {input_name!r} shape {shape} outside the profile {low}..{high}")
            import time

            start = time.perf_counter()
            names = [o.name for o in self.sess.get_outputs()]
            outputs = dict(zip(names, self.sess.run(names, dict(feed_dict)), strict=True))
            self.inference_time = time.perf_counter() - start
            if self.engine.noise:
                rng = np.random.default_rng(0)
                for output_name, value in outputs.items():
                    outputs[output_name] = value + rng.normal(0, self.engine.noise, value.shape).astype(value.dtype)
            return outputs

    mod.TrtRunner = TrtRunner
    return mod


def install(monkeypatch: Any, version: str = TRT_VERSION, **fake_options: Any) -> types.ModuleType:
    """Put the fakes into ``sys.modules`` (``tensorrt`` and ``polygraphy.backend.trt``) for one test."""
    backend = fake_polygraphy_trt(**fake_options)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", backend)
    return backend
