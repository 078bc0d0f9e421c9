"""The product as users run it: real tritonserver (cpu profile), milvus-lite, tritonclient over gRPC and HTTP."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import requests
from tritonclient.utils import InferenceServerException

from nirvana.config import load_config
from nirvana.pipeline import Pipeline
from nirvana_client import GenerateOptions
from nirvana_dev.launch import make_server

pytestmark = pytest.mark.integration
STEPS = 10
FOX = "a red fox in the snow, photograph"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_image_hit_and_miss(connect, protocol) -> None:
    client = connect(protocol)
    first = client.generate(f"{FOX} ({protocol})", GenerateOptions(seed=1, steps=STEPS))
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8 and first.image.std() > 0
    para = client.generate(f"photo of a red fox in snow ({protocol})", GenerateOptions(seed=2, steps=STEPS))
    assert para.cache_hit and para.skipped_steps > 0 and para.similarity > 0.85
    unrelated = {"grpc": "an isometric diagram of a diesel engine", "http": "a bowl of ramen, studio lighting"}
    other = client.generate(unrelated[protocol], GenerateOptions(seed=3, steps=STEPS))
    assert not other.cache_hit and other.skipped_steps == 0
    assert {"embed_ms", "unet_ms", "decode_ms", "total_ms"} <= set(first.server_timings_ms)


BAD_INPUTS = [
    ("", GenerateOptions(steps=STEPS), "PROMPT"),
    ("x" * 10_000, GenerateOptions(steps=STEPS), "PROMPT"),
    ("a cat", GenerateOptions(steps=0), "NUM_INFERENCE_STEPS=0"),
    ("a cat", GenerateOptions(steps=10_000), "NUM_INFERENCE_STEPS=10000"),
    ("a cat", GenerateOptions(steps=STEPS, cache_mode="sometimes"), "CACHE_MODE='sometimes'"),
    ("a cat", GenerateOptions(steps=STEPS, guidance=float("nan")), "GUIDANCE_SCALE"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("prompt", "options", "needle"), BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_server_stays_ready(connect, protocol, prompt, options, needle) -> None:
    client = connect(protocol)
    with pytest.raises(InferenceServerException) as err:
        client.generate(prompt, options)
    assert needle in err.value.message()
    assert client.ready()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wrong_dtype_is_rejected_by_triton(connect, protocol) -> None:
    client = connect(protocol)
    tc = client._tc
    inputs = client.build_inputs("a cat", GenerateOptions())
    seed = tc.InferInput("SEED", [1], "FP32")
    seed.set_data_from_numpy(np.array([1.5], np.float32))
    with pytest.raises(InferenceServerException) as err:
        client._client.infer("nirvana", [*inputs, seed])
    assert "SEED" in err.value.message() and "INT64" in err.value.message()
    assert client.ready()


def test_custom_metrics_on_metrics_endpoint(served, connect) -> None:
    client = connect("grpc")
    client.generate(FOX, GenerateOptions(steps=STEPS))
    text = requests.get(served["server"].urls.metrics, timeout=10).text
    for name in (
        "nirvana_cache_hits_total",
        "nirvana_cache_misses_total",
        "nirvana_skipped_steps_total",
        "nirvana_retrieval_latency_ms_bucket",
        "nirvana_cache_evictions_total",
        "nirvana_cache_bytes",
    ):
        assert name in text
    hits = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("nirvana_cache_hits_total"))
    assert hits >= 1


def test_concurrent_requests_each_get_their_own_image(connect) -> None:
    client = connect("grpc")
    prompts = [f"a lighthouse number {i} at dusk" for i in range(4)]
    opts = [GenerateOptions(seed=i, steps=STEPS, cache_mode="bypass") for i in range(4)]
    alone = [client.generate(p, o).image for p, o in zip(prompts, opts, strict=True)]
    clients = [connect("grpc") for _ in prompts]  # one connection per thread
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c, p, o: c.generate(p, o).image, clients, prompts, opts))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)


def test_triton_image_equals_in_process_pipeline(connect, tiny_checkpoint, tmp_path) -> None:
    client = connect("grpc")
    served_image = client.generate(FOX, GenerateOptions(seed=7, steps=STEPS, cache_mode="bypass")).image
    config = load_config({"checkpoint": str(tiny_checkpoint.path), "cache": {"dir": str(tmp_path)}})
    pipe = Pipeline(config, checkpoint=tiny_checkpoint)
    local = pipe.generate(FOX, seed=7, steps=STEPS, cache_mode="bypass").image
    pipe.close()
    diff = np.abs(served_image.astype(int) - local.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # ONNX vs torch: ≤ 1e-6 in float, rare 1-level rounding


def test_restart_keeps_the_cache(served, connect) -> None:
    client = connect("grpc")
    client.generate("a koi pond in autumn, watercolor", GenerateOptions(seed=1, steps=STEPS))
    client.close()
    served["server"].stop()
    served["server"] = make_server(served["options"], served["repo"])
    served["server"].start()
    served["server"].wait_ready()
    client = connect("http")
    again = client.generate("watercolor of a koi pond in autumn", GenerateOptions(seed=2, steps=STEPS))
    assert again.cache_hit and again.skipped_steps > 0
