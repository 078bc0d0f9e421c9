"""The torch profile through the real server: sub-models run the checkpoint's torch modules and answer via DLPack.

On a GPU machine those answers live in GPU memory (as TensorRT's do); here, on the CPU, the same code path runs
with CPU tensors, so what can be checked without a GPU is checked: the served image equals the in-process one.
"""

from __future__ import annotations

import numpy as np
import pytest

from nirvana.config import load_config
from nirvana.pipeline import Pipeline
from nirvana_client import GenerateOptions, NirvanaClient
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, make_server, prepare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


# SDXL's torch path (its two encoders through the torch runner) is slow: SDXL is served in the default run's cpu
# profile, and the torch profile with SD 1.x and FLUX.1 (test_dit_served).
@pytest.mark.parametrize(
    "checkpoint_fixture", ["tiny_checkpoint_dir", pytest.param("tiny_sdxl_dir", marks=pytest.mark.slow)]
)
def test_torch_profile_serves_the_in_process_image(checkpoint_fixture, request, tmp_path) -> None:
    checkpoint_dir = request.getfixturevalue(checkpoint_fixture)
    options = ServeOptions(
        cache_dir=tmp_path / "serve",
        checkpoint=checkpoint_dir,
        ports=ServerPorts(*free_ports(3)),
        profile="torch",
        instances=2,
        ready_timeout_s=240,
    )
    repo, _ = prepare(options)
    assert not (repo / "unet" / "1" / "model.onnx").exists()  # the module itself is served, not an export
    with make_server(options, repo) as server:
        client = NirvanaClient(server.urls.grpc, "grpc")
        try:
            served = client.generate("a red fox in the snow", GenerateOptions(seed=3, steps=8, cache_mode="bypass"))
        finally:
            client.close()
    config = load_config({"checkpoint": str(checkpoint_dir), "cache": {"dir": str(tmp_path / "local")}})
    pipe = Pipeline(config)
    try:
        local = pipe.generate("a red fox in the snow", seed=3, steps=8, cache_mode="bypass")
    finally:
        pipe.close()
    assert local.image.std() > 2 and np.abs(served.image.astype(int) - local.image.astype(int)).max() <= 1
