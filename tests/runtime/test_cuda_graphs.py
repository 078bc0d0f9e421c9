"""CUDA graphs of the torch profile's UNet in the step scheduler: replays equal eager runs at every row count, and a
signature that cannot be captured runs eagerly. Needs a GPU (never in CI): `pytest -m gpu tests/runtime`."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_replays_equal_eager_runs_at_each_row_count(tiny_checkpoint, tiny_checkpoint_dir) -> None:
    from nirvana.runtime.cuda_graphs import GraphedRunner
    from nirvana.runtime.torch_runtime import component_runner

    eager = torch.inference_mode()(component_runner("unet", tiny_checkpoint_dir, "cuda", torch.float16))
    graphed = GraphedRunner(eager)
    for rows in (2, 4, 2):
        generator = torch.Generator().manual_seed(rows)
        feeds = {
            "sample": torch.randn(rows, 4, 16, 16, generator=generator).cuda(),
            "timestep": torch.full((rows, 1), 500.0).cuda(),
            "encoder_hidden_states": torch.randn(
                rows, tiny_checkpoint.text_max_length, tiny_checkpoint.text_hidden_size, generator=generator
            ).cuda(),
        }
        torch.testing.assert_close(graphed(feeds)["noise_pred"], eager(feeds)["noise_pred"])
    assert graphed.captured == 2 and graphed.replays == 3 and graphed.eager == 0


def test_a_signature_that_cannot_be_captured_runs_eagerly() -> None:
    from nirvana.runtime.cuda_graphs import GraphedRunner

    def syncs(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = float(feeds["x"].sum().item())  # a host sync: not allowed while capturing
        return {"y": feeds["x"] * scale}

    graphed = GraphedRunner(syncs)
    x = torch.ones(2, 3, device="cuda")
    assert torch.equal(graphed({"x": x})["y"], x * 6) and graphed.captured == 0 and graphed.eager == 1
