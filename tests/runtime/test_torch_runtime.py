"""One served sub-model from the checkpoint's torch modules: same numbers as in-process, merged or alone."""

from __future__ import annotations

import torch

from nirvana.runtime.batching import run_merged
from nirvana.runtime.torch_runtime import TorchSubModels, component_runner


def test_component_runners_match_the_in_process_sub_models(tiny_checkpoint, tiny_checkpoint_dir) -> None:
    models = TorchSubModels(tiny_checkpoint)
    ids = tiny_checkpoint.tokenizer(["a red fox"], padding="max_length", return_tensors="pt").input_ids
    text = component_runner("text_encoder", tiny_checkpoint_dir, "cpu", torch.float32)
    with torch.inference_mode():
        hidden = text({"input_ids": ids})["last_hidden_state"]
    torch.testing.assert_close(hidden, models.encode_text(ids), rtol=0, atol=1e-6)
    sample, step = torch.randn(2, 4, 16, 16), torch.tensor([[501.0], [501.0]])  # [rows, 1] as Triton sends it
    unet = component_runner("unet", tiny_checkpoint_dir, "cpu", torch.float32)
    with torch.inference_mode():
        noise = unet({"sample": sample, "timestep": step, "encoder_hidden_states": hidden.expand(2, -1, -1)})
    expected = models.unet(sample, step.reshape(-1), hidden.expand(2, -1, -1))
    torch.testing.assert_close(noise["noise_pred"], expected, rtol=0, atol=1e-5)


def test_unet_rows_of_requests_at_different_timesteps_merge_on_torch(tiny_checkpoint_dir) -> None:
    unet = torch.inference_mode()(component_runner("unet", tiny_checkpoint_dir, "cpu", torch.float32))
    generator = torch.Generator().manual_seed(0)
    requests = [
        {
            "sample": torch.randn(2, 4, 16, 16, generator=generator),
            "timestep": torch.full((2, 1), float(t)),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator),
        }
        for t in (981, 501, 21)
    ]
    merged = run_merged(unet, requests)
    for request, answer in zip(requests, merged, strict=True):
        alone = unet(request)["noise_pred"]
        assert (answer["noise_pred"] - alone).abs().max() <= 1e-5  # measured ≤ 1.3e-6 on a 2-core CPU (fp32)
