"""nirvana.runtime.onnx_runtime: the exported graphs reproduce the torch sub-models through the denoising loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nirvana.checkpoint import Checkpoint
from nirvana.contract.specs import submodel_specs
from nirvana.denoise import decode, denoise, encode_prompts, initial_latent, make_scheduler
from nirvana.runtime.onnx_runtime import OnnxModelError, OnnxSubModels, onnx_path
from nirvana.runtime.torch_runtime import TorchSubModels
from nirvana.submodels import SubModels
from nirvana_export.onnx_export import export_submodel

# Max pixel diff (image in [0, 1]) allowed between onnxruntime and torch after a full CFG denoise + decode.
# Measured 1.3e-6 on the tiny checkpoint (fp32, 20 DDIM steps, g=7.5); the bound leaves room for other CPUs' kernels.
PIXEL_ATOL = 1e-3
STEPS = 20


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three diffusion sub-models exported (the embedder is not needed by SubModels)."""
    out = tmp_path_factory.mktemp("onnx_models")
    specs = submodel_specs(tiny_checkpoint)
    for name in ("text_encoder", "unet", "vae_decoder"):
        export_submodel(tiny_checkpoint, specs[name], onnx_path(out, name))
    return out


def _generate(models: SubModels, checkpoint: Checkpoint, prompt: str, seed: int) -> np.ndarray:
    scheduler = make_scheduler("ddim", checkpoint.scheduler_config)
    embeddings = encode_prompts(checkpoint.tokenizer, models, prompt, "blurry")
    generator = torch.Generator().manual_seed(seed)
    shape = (1, checkpoint.latent_channels, *checkpoint.latent_size)
    x_t = initial_latent(shape, generator, scheduler, num_steps=STEPS)
    result = denoise(models, scheduler, STEPS, embeddings, 7.5, generator=generator, latent=x_t)
    return decode(models, result.latent, checkpoint.scaling_factor)


def test_onnx_submodels_reproduce_the_torch_image(tiny_checkpoint: Checkpoint, onnx_dir: Path) -> None:
    onnx_models = OnnxSubModels(onnx_dir)
    assert isinstance(onnx_models, SubModels)
    want = _generate(TorchSubModels(tiny_checkpoint), tiny_checkpoint, "a photo of a cat in a garden", seed=7)
    got = _generate(onnx_models, tiny_checkpoint, "a photo of a cat in a garden", seed=7)
    assert got.shape == want.shape == (64, 64, 3)
    assert float(np.abs(got - want).max()) <= PIXEL_ATOL


def test_each_call_matches_torch_and_accepts_int64_scalar_timesteps(
    tiny_checkpoint: Checkpoint, onnx_dir: Path
) -> None:
    onnx_models, torch_models = OnnxSubModels(onnx_dir), TorchSubModels(tiny_checkpoint)
    ids = torch.randint(0, 400, (2, 77), generator=torch.Generator().manual_seed(0))
    text = torch_models.encode_text(ids)
    torch.testing.assert_close(onnx_models.encode_text(ids), text, atol=1e-5, rtol=1e-5)
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor(981)  # DDIM hands a 0-dim int64; the graph takes float32 [B]
    eps = onnx_models.unet(sample, timestep, text)
    assert eps.dtype == torch.float32 and eps.shape == sample.shape
    torch.testing.assert_close(eps, torch_models.unet(sample, timestep.expand(2), text), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(onnx_models.decode(sample[:1]), torch_models.decode(sample[:1]), atol=1e-4, rtol=1e-4)


def test_missing_files_and_foreign_checkpoints_are_refused(onnx_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OnnxModelError, match=r"not found.*run the export"):
        OnnxSubModels(tmp_path)
    with pytest.raises(OnnxModelError, match=r"export_manifest.json not found"):
        OnnxSubModels(onnx_dir, fingerprint="0" * 64)
