"""The `cache` model's glue and its BLS client without Triton: a stand-in `triton_python_backend_utils` carries the
requests (BYTES tensors through Triton's own serialisation) from `BlsCache` to `cache_model.TritonPythonModel`, which
runs the production cache (milvus-lite) built from an engine.json. Plus the repository configs of the split."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from nirvana.cache.checks import CacheLimits
from nirvana.cache.endpoint import CacheEndpoint
from nirvana.cache.outcome import Reason
from nirvana.cache.wire import bytes_array, encode_states
from nirvana.cache.write_behind import AdmissionQueue
from nirvana.config import load_config
from nirvana.contract.specs import cache_spec
from nirvana.runtime.bls import use_credential
from nirvana.runtime.cache_client import BlsCache
from nirvana.security.credential import INTERNAL_PARAMETER, read_secret
from nirvana.serving.metrics import CacheStateMetrics
from nirvana_export.repository import DEFAULT_INSTANCES, cache_config, place_secret, render_configs, sd15_specs

KEY = "0123456789abcdef" * 2  # a cache key as `Pipeline.cache_key` makes them: 32 hex digits


class FakePbUtils:
    """The parts of triton_python_backend_utils that BLS, the cache model and its metrics use. Metrics with the same
    name and labels share one value, as Triton's registry shares one series between stub processes."""

    class TritonError:
        INVALID_ARG, UNAVAILABLE = "INVALID_ARG", "UNAVAILABLE"

        def __init__(self, message: str, code: str = "INTERNAL") -> None:
            self._message, self.code = message, code

        def message(self) -> str:
            return self._message

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            array = np.asarray(array)
            if array.dtype == np.object_:  # through the BYTES wire form, as between Triton processes
                array = deserialize_bytes_tensor(serialize_byte_tensor(array).item()).reshape(array.shape)
            self._name, self._array = name, array

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None) -> None:
            self.output_tensors, self._error = list(output_tensors), error

        def has_error(self) -> bool:
            return self._error is not None

        def error(self):
            return self._error

    TRITONSERVER_MEMORY_CPU = 0

    def __init__(self) -> None:
        self.models: dict[str, object] = {}
        self.values: dict[str, float] = {}
        pb = self

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None, parameters=None):
                self.model_name, self.inputs = model_name, {t.name(): t for t in inputs}
                self._parameters = json.dumps(dict(parameters or {}))  # what Triton hands the model: JSON text

            def parameters(self) -> str:
                return self._parameters

            def exec(self):
                if self.model_name not in pb.models:
                    return pb.InferenceResponse(error=pb.TritonError(f"model {self.model_name!r} is not ready"))
                return pb.models[self.model_name].execute([self])[0]

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name: str, description: str, kind: str) -> None:
                self.name = name

            def Metric(self, labels: dict, buckets=None):  # Triton's spelling
                values, name = pb.values, self.name

                class Metric:
                    def increment(self, value: float) -> None:
                        values[name] = values.get(name, 0) + value

                    def set(self, value: float) -> None:
                        values[name] = value

                    def observe(self, value: float) -> None:
                        values[name + "_count"] = values.get(name + "_count", 0) + 1

                return Metric()

        self.InferenceRequest, self.MetricFamily = InferenceRequest, MetricFamily

    @staticmethod
    def PreferredMemory(kind: int, device: int) -> tuple[int, int]:
        return kind, device

    @staticmethod
    def get_input_tensor_by_name(request, name: str):
        return request.inputs.get(name)

    @staticmethod
    def get_output_tensor_by_name(response, name: str):
        return next((t for t in response.output_tensors if t.name() == name), None)


@pytest.fixture
def served_cache(tiny_checkpoint_dir, tmp_path, monkeypatch):
    """(fake pb_utils, the cache model) as a repository lays them out: cache/ reads ../nirvana/engine.json."""
    pb = FakePbUtils()
    monkeypatch.setitem(__import__("sys").modules, "triton_python_backend_utils", pb)
    from nirvana.serving.cache_model import TritonPythonModel

    engine = {"checkpoint": str(tiny_checkpoint_dir), "cache": {"dir": str(tmp_path / "state")}}
    repo = tmp_path / "repo"
    for name in ("nirvana", "cache"):
        (repo / name).mkdir(parents=True)
    (repo / "nirvana" / "engine.json").write_text(json.dumps(engine))
    use_credential(read_secret(place_secret(repo, None)))  # what an orchestrator's stub does at start
    config = text_format.Parse(cache_config(), mc.ModelConfig())
    params = {k: {"string_value": v.string_value} for k, v in config.parameters.items()}
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": params}), "model_repository": str(repo / "cache")})
    deadline = time.monotonic() + 60
    while not model.cache.available:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pb.models["cache"] = model
    yield pb, model
    model.finalize()
    use_credential(None)


def _states() -> dict[int, dict[str, np.ndarray]]:
    # Values exact in fp16, the latent store's dtype: what comes back must be what went in.
    latent = (np.arange(4 * 16 * 16, dtype=np.float32).reshape(1, 4, 16, 16) % 64) / 4
    return {k: {"latent": latent + k, "generator_state": np.zeros(16, np.uint8)} for k in (5, 10)}


def test_lookup_and_admit_through_the_cache_model(served_cache) -> None:
    pb, model = served_cache
    client = BlsCache(pb, model.cache.config.selection.selector())
    vector = np.zeros(384, np.float32)
    vector[0] = 1.0
    miss = client.lookup(vector, KEY, "t", 20)
    assert (miss.hit, miss.reason, miss.arrays) == (False, Reason.EMPTY, None) and "cache_call_ms" in miss.timings_ms
    assert client.admit("a red fox", vector, KEY, "t", _states(), meta={"negative_prompt": "blurry"}) == 2
    assert model.admissions.drain(timeout=30)  # answered once queued, written behind
    model.metrics.update()
    assert pb.values["nirvana_cache_entries"] == 2 and pb.values["nirvana_cache_bytes"] > 0
    assert pb.values["nirvana_admission_queue_depth"] == 0 and "nirvana_admissions_dropped_total" not in pb.values
    hit = client.lookup(vector, KEY, "t", 20)
    assert hit.hit and hit.k == 10 and hit.matched_prompt == "a red fox" and hit.similarity == pytest.approx(1.0)
    assert hit.meta["negative_prompt"] == "blurry"
    want = _states()[10]
    assert hit.arrays["latent"].shape == want["latent"].shape
    np.testing.assert_array_equal(hit.arrays["latent"].astype(np.float32), want["latent"])
    np.testing.assert_array_equal(hit.arrays["generator_state"], want["generator_state"])
    assert client.lookup(vector, KEY, "other-tenant", 20).reason == Reason.EMPTY
    record = model.cache.record(KEY, "t", "a red fox")
    assert record.entries[10].hits == 1  # the LCBFU count, kept by the one owner
    assert client.failures == 0


def _sd15_states(seed: int) -> dict[int, dict[str, np.ndarray]]:
    """What one SD1.5 miss admits at 512x512: five Ks, each a 1x4x64x64 latent with its solver's resume arrays."""
    rng = np.random.default_rng(seed)
    return {
        k: {
            "latent": rng.standard_normal((1, 4, 64, 64)).astype(np.float32),
            "num_model_outputs": np.array([2], np.int64),
            "model_output_1": rng.standard_normal((1, 4, 64, 64)).astype(np.float32),
            "lower_order_nums": np.array([1], np.int64),
            "generator_state": rng.integers(0, 255, 5056, dtype=np.uint8),
        }
        for k in (5, 10, 15, 20, 25)
    }


def test_admit_answers_before_the_write(served_cache) -> None:
    """The `admit` call as an orchestrator waits for it, over the production cache (milvus-lite): written before the
    answer (admission_queue = 0) vs queued (the default). Run with -s to see the times."""
    _, model = served_cache
    cache, dim, calls = model.cache, model.endpoint.limits.dim, 15
    sd15 = CacheLimits(dim, (4, 64, 64), max_steps=200, max_prompt_chars=2000)
    blobs = [bytes_array(encode_states(_sd15_states(i))) for i in range(2 * calls)]
    rng = np.random.default_rng(0)
    vectors = [v / np.linalg.norm(v) for v in rng.standard_normal((2 * calls, dim)).astype(np.float32)]

    def admit_ms(endpoint: CacheEndpoint, i: int) -> float:
        request = {"op": "admit", "prompt": f"benchmark prompt {i}", "cache_key": KEY, "tenant": "t"}
        t0 = time.perf_counter()
        response, _ = endpoint.serve(bytes_array(json.dumps(request).encode()), vectors[i], blobs[i])
        elapsed = (time.perf_counter() - t0) * 1e3
        assert json.loads(response)["admitted"] == 5
        return elapsed

    synchronous = [admit_ms(CacheEndpoint(cache, sd15), i) for i in range(calls)]
    queue = AdmissionQueue(cache, max_depth=2 * calls)
    queued_endpoint = CacheEndpoint(cache, sd15, queue)
    queued = []
    for i in range(calls, 2 * calls):
        queued.append(admit_ms(queued_endpoint, i))
        queue.drain(timeout=30)  # one at a time, as misses arrive: the writer does not compete with the next call
    assert queue.close(timeout=30) and queue.dropped == 0 and queue.failed == 0
    assert cache.entries >= 2 * calls * 5
    sync_ms, queued_ms = float(np.median(synchronous)), float(np.median(queued))
    print(
        f"\nadmit call, 5 SD1.5 latents, median of {calls}: written first {sync_ms:.2f} ms, queued {queued_ms:.2f} ms"
    )
    assert queued_ms < sync_ms


def test_queue_depth_and_drops_reach_the_metrics() -> None:
    pb = FakePbUtils()

    queue = SimpleNamespace(depth=3, dropped=0)
    cache = SimpleNamespace(
        counters=SimpleNamespace(evictions=0, unavailable=0),
        probes=SimpleNamespace(near_misses=0, suspects=lambda: 0),
        available=True,
        total_bytes=0,
        entries=0,
    )
    metrics = CacheStateMetrics(pb, cache, interval_s=3600, admissions=queue)
    assert pb.values["nirvana_admission_queue_depth"] == 3
    queue.depth, queue.dropped = 0, 4
    metrics.update()
    assert pb.values["nirvana_admission_queue_depth"] == 0 and pb.values["nirvana_admissions_dropped_total"] == 4
    metrics.close()


def _raw_request(pb, message: bytes, parameters: dict | None = None):
    tensors = [pb.Tensor("REQUEST", np.array([message], object)), pb.Tensor("VECTOR", np.zeros(384))]
    return pb.InferenceRequest("cache", [], tensors, parameters=parameters)


def test_malformed_request_is_an_invalid_arg_error(served_cache) -> None:
    pb, model = served_cache
    secret = {INTERNAL_PARAMETER: model.gate._secret}
    response = _raw_request(pb, b'{"op": "drop"}', secret).exec()
    assert response.has_error() and response.error().code == "INVALID_ARG" and "op='drop'" in response.error().message()


@pytest.mark.parametrize("parameters", [None, {INTERNAL_PARAMETER: "a guess of sixteen chars"}, {"other": "x"}])
def test_a_caller_without_the_internal_credential_is_refused_first(served_cache, parameters) -> None:
    pb, model = served_cache
    lookup = json.dumps({"op": "lookup", "cache_key": KEY, "tenant": "t", "num_steps": 20}).encode()
    response = _raw_request(pb, lookup, parameters).exec()
    assert response.has_error() and response.error().code == "UNAVAILABLE"
    assert "not served to clients" in response.error().message() and "cache" not in response.error().message()
    model.metrics.update()
    assert pb.values["nirvana_internal_refused_total"] == model.gate.refused >= 1


def test_unreachable_cache_model_serves_uncached(served_cache) -> None:
    pb, _ = served_cache
    client = BlsCache(pb, load_config({"checkpoint": "."}).cache.selection.selector(), model="no-such-model")
    vector = np.ones(384, np.float32) / np.sqrt(384)
    assert client.lookup(vector, KEY, "t", 20).reason == Reason.CACHE_UNAVAILABLE
    assert client.admit("p", vector, KEY, "t", _states()) == 0
    assert client.failures == 2


def test_repository_has_n_orchestrators_and_one_cache_owner() -> None:
    for profile, count in DEFAULT_INSTANCES.items():
        files = render_configs(sd15_specs(), (512, 512), profile, checkpoint=Path("/models/sd15"))
        nirvana = text_format.Parse(files["nirvana/config.pbtxt"], mc.ModelConfig())
        cache = text_format.Parse(files["cache/config.pbtxt"], mc.ModelConfig())
        assert nirvana.instance_group[0].count == count and cache.instance_group[0].count == 1
        assert cache.backend == "python" and cache.parameters["engine_config"].string_value == "../nirvana/engine.json"
        assert "nirvana.serving.cache_model" in files["cache/1/model.py"]
    files = render_configs(sd15_specs(), (512, 512), "cpu", instances=2)
    assert text_format.Parse(files["nirvana/config.pbtxt"], mc.ModelConfig()).instance_group[0].count == 2
    spec = cache_spec()
    config = text_format.Parse(cache_config(), mc.ModelConfig())
    assert [t.name for t in config.input] == spec.input_names and [t.name for t in config.output] == spec.output_names
    assert [t.optional for t in config.input] == [False, False, True]
