"""`embedder = "clip"` served: the cache searches by the checkpoint's own text features, pooled from the served
text_encoder model, and they are the vectors the in-process (torch) embedder computes."""

from __future__ import annotations

import numpy as np
import pytest

from nirvana.embed import make_embedder
from nirvana_client import GenerateOptions, NirvanaClient

pytestmark = pytest.mark.integration
CACHED = "a small red circle in the top left on a white background"
NEW = "upper left corner: a little crimson disc, pale backdrop"
STEPS = 6


@pytest.fixture(scope="module")
def similarity(tiny_checkpoint) -> float:
    vectors = make_embedder("clip", tiny_checkpoint).embed([CACHED, NEW])
    return float(vectors[0] @ vectors[1])


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint_dir, tmp_path_factory, similarity, start_server):
    assert 0.1 < similarity < 0.999, similarity  # the tiny encoder tells these prompts apart, a little
    work = tmp_path_factory.mktemp("clip_serve")
    config = work / "clip.toml"  # what `nirvana calibrate --embedder clip` writes: one band just below the pair
    threshold = round(similarity - 0.01, 4)
    config.write_text(
        f'embedder = "clip"\n[cache.selection]\nreference_steps = {STEPS}\nthresholds = [[{threshold}, 3]]\n'
    )
    state = start_server(tiny_checkpoint_dir, work, config_file=config)
    yield state["server"].urls.grpc
    state["server"].stop()


@pytest.fixture(scope="module")
def client(server_url):
    made = NirvanaClient(server_url, "grpc")
    yield made
    made.close()


def test_served_clip_similarity_is_the_checkpoints_text_feature_cosine(client, similarity) -> None:
    first = client.generate(CACHED, GenerateOptions(seed=1, steps=STEPS))
    assert not first.cache_hit and np.isnan(first.similarity)
    second = client.generate(NEW, GenerateOptions(seed=2, steps=STEPS))
    assert second.cache_hit and 0 < second.skipped_steps <= 3
    assert second.similarity == pytest.approx(similarity, abs=1e-4)  # ONNX encoder vs torch: float noise only


def test_clip_retrieval_loads_no_prompt_embedder_model(server_url) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    triton = grpcclient.InferenceServerClient(server_url)
    try:  # readiness, not the repository index: that API is restricted to operators (docs/security.md)
        ready = {name: triton.is_model_ready(name) for name in ("nirvana", "cache", "text_encoder", "unet")}
        try:
            embedder_ready = triton.is_model_ready("prompt_embedder")
        except InferenceServerException:  # not in the repository at all
            embedder_ready = False
    finally:
        triton.close()
    assert all(ready.values()), ready
    assert not embedder_ready
