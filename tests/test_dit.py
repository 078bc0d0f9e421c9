"""Transformer families (SD 3.x, FLUX.1) in process: images equal diffusers' pipelines, a resume at K equals the
uninterrupted run, a paraphrase hits and skips steps, and a latent never crosses resolutions, shifts or T5 lengths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from nirvana.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_info
from nirvana.config import load_config
from nirvana.denoise import denoise, initial_latent, make_scheduler
from nirvana.dit.conditioning import DitConditioning
from nirvana.embed import make_embedder
from nirvana.pipeline import Pipeline
from nirvana.request import RequestError
from nirvana.runtime.torch_dit import TorchDitModels
from nirvana.schedulers import UnsupportedSchedulerError, resolve_scheduler

STEPS = 10
PROMPT = "a red fox in the snow, photograph"
GUIDANCE = {"sd3": 5.0, "flux": 3.5}
REFERENCE = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def embedder():
    return make_embedder("minilm")


@pytest.fixture(scope="module")
def checkpoints(tiny_dit_dirs):
    return {family: load_checkpoint(path) for family, path in tiny_dit_dirs.items()}


def _pipe(checkpoint, embedder, cache_dir: Path) -> Pipeline:
    config = load_config(
        {
            "checkpoint": str(checkpoint.path),
            "default_steps": STEPS,
            "cache": {"dir": str(cache_dir), "latent_dtype": "float32", "predictor": {"enabled": False}},
        }
    )
    return Pipeline(config, checkpoint=checkpoint, embedder=embedder)


def _u8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().clip(0, 255).astype(np.uint8)


def test_dit_folders_are_read_with_their_geometry_and_schedule(tiny_dit_dirs) -> None:
    sd3, flux = (load_checkpoint_info(tiny_dit_dirs[f]) for f in FAMILIES)
    assert (sd3.family, flux.family) == FAMILIES
    for info in (sd3, flux):
        assert info.image_size == (64, 64) and info.latent_size == (16, 16) and info.latent_channels == 16
        assert info.max_sequence_length == 32 and info.shift_factor is not None
        assert info.scheduler_config["_image_seq_len"] == 64  # 8×8 patches of 2×2 latent pixels
    assert sd3.pooled_size == 64 and flux.pooled_size == 32
    assert not make_scheduler("auto", sd3.scheduler_config).config.use_dynamic_shifting
    assert make_scheduler("auto", flux.scheduler_config).config.use_dynamic_shifting


@pytest.mark.parametrize("family", FAMILIES)
def test_images_equal_the_diffusers_pipeline(family, tiny_dit_dirs, checkpoints, embedder, tmp_path) -> None:
    reference = REFERENCE[family].from_pretrained(tiny_dit_dirs[family], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    pipe = _pipe(checkpoints[family], embedder, tmp_path / "cache")
    try:
        for negative in ("",) if family == "flux" else ("", "blurry"):
            extra = {"negative_prompt": negative} if negative else {}
            expected = reference(
                PROMPT,
                height=64,
                width=64,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE[family],
                max_sequence_length=32,
                generator=torch.Generator().manual_seed(4),
                output_type="np",
                **extra,
            ).images[0]
            ours = pipe.generate(
                PROMPT, seed=4, guidance=GUIDANCE[family], cache_mode="bypass", negative_prompt=negative
            )
            assert ours.image.shape == (64, 64, 3) and ours.image.std() > 2
            # one text-encoder call for both rows where diffusers makes two: at most a grey level apart
            assert np.abs(ours.image.astype(int) - _u8(expected).astype(int)).max() <= 1
    finally:
        pipe.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_at_k_equals_the_uninterrupted_run(family, checkpoints) -> None:
    checkpoint = checkpoints[family]
    models = TorchDitModels(checkpoint)
    conditioning = DitConditioning(checkpoint, models)
    text, added = conditioning.encode(PROMPT)
    scale, added = conditioning.loop_guidance(GUIDANCE[family], added)
    scheduler = make_scheduler("auto", checkpoint.scheduler_config)
    x_t = initial_latent((1, 16, 16, 16), torch.Generator().manual_seed(2), scheduler, num_steps=STEPS)
    args = (models, scheduler, STEPS, text, scale)
    full = denoise(*args, generator=torch.Generator(), latent=x_t, capture_at=(3, 7), added_cond=added)
    for k, state in full.captured.items():
        resumed = denoise(*args, generator=torch.Generator(), start=state, added_cond=added)
        assert resumed.steps_run == STEPS - k
        assert torch.equal(resumed.latent, full.latent)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_paraphrase_hits_and_skips_steps(family, checkpoints, embedder, tmp_path) -> None:
    pipe = _pipe(checkpoints[family], embedder, tmp_path / "cache")
    try:
        miss = pipe.generate(PROMPT, seed=1, guidance=GUIDANCE[family])
        again = pipe.generate(PROMPT, seed=1, guidance=GUIDANCE[family])
        hit = pipe.generate("a red fox in snow, a photograph", seed=2, guidance=GUIDANCE[family])
    finally:
        pipe.close()
    assert not miss.cache_hit and miss.admitted > 0
    # the same request resumes from its own full state: the image it would have had
    assert again.cache_hit and again.skipped_steps > 0 and np.array_equal(again.image, miss.image)
    assert hit.cache_hit and hit.skipped_steps > 0 and hit.image.std() > 2


def _variant(path: Path, tmp_path: Path, name: str, settings: dict | None = None, schedule: dict | None = None) -> Path:
    copy = Path(shutil.copytree(path, tmp_path / name))
    if settings:
        current = json.loads((copy / "nirvana.json").read_text())
        (copy / "nirvana.json").write_text(json.dumps({**current, **settings}))
    if schedule:
        config_path = copy / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **schedule}))
    return copy


@pytest.mark.parametrize("family", FAMILIES)
def test_a_latent_never_crosses_resolutions_shifts_or_t5_lengths(family, tiny_dit_dirs, embedder, tmp_path) -> None:
    base = tiny_dit_dirs[family]
    variants = {
        "base": base,
        "resolution": _variant(base, tmp_path, "res", {"image_size": [96, 64]}),
        "t5_length": _variant(base, tmp_path, "t5", {"max_sequence_length": 16}),
        # SD 3's static shift; FLUX's comes from mu (max_shift at its largest images, `shift` is unused there)
        "shift": _variant(base, tmp_path, "shift", schedule={"shift": 2.0} if family == "sd3" else {"max_shift": 1.3}),
    }
    shared = tmp_path / "shared-cache"
    keys, results = {}, {}
    for name, path in variants.items():
        pipe = _pipe(load_checkpoint(path), embedder, shared)
        try:
            keys[name] = pipe.cache_key(STEPS, GUIDANCE[family])
            results[name] = pipe.generate(PROMPT, seed=1, guidance=GUIDANCE[family])
        finally:
            pipe.close()
    assert len(set(keys.values())) == len(variants)
    assert not any(result.cache_hit for result in results.values())
    assert results["resolution"].image.shape == (96, 64, 3)


def test_other_families_latents_are_not_used(tiny_dit_dirs, checkpoints, embedder, tmp_path) -> None:
    shared = tmp_path / "shared-cache"
    first = _pipe(checkpoints["sd3"], embedder, shared)
    try:
        first.generate(PROMPT, seed=1, guidance=5.0)
    finally:
        first.close()
    second = _pipe(checkpoints["flux"], embedder, shared)
    try:
        assert not second.generate(PROMPT, seed=1, guidance=5.0).cache_hit
    finally:
        second.close()


def test_a_flux_negative_prompt_is_refused_naming_the_field(checkpoints, embedder, tmp_path) -> None:
    pipe = _pipe(checkpoints["flux"], embedder, tmp_path / "cache")
    try:
        with pytest.raises(RequestError, match=r"NEGATIVE_PROMPT='blurry'.*FLUX"):
            pipe.generate(PROMPT, negative_prompt="blurry")
    finally:
        pipe.close()


def test_schedulers_never_cross_unet_and_flow_matching(tiny_dit_dirs, tiny_checkpoint) -> None:
    flow = load_checkpoint_info(tiny_dit_dirs["flux"]).scheduler_config
    with pytest.raises(UnsupportedSchedulerError, match="'dpmpp' cannot run a flow-matching"):
        make_scheduler("dpmpp", flow)
    with pytest.raises(UnsupportedSchedulerError, match="'flow_euler' cannot run a UNet"):
        make_scheduler("flow_euler", tiny_checkpoint.scheduler_config)
    # fresh noise in every step is not a state a cached latent could carry: refused at start, with no fallback
    stochastic = {**flow, "stochastic_sampling": True}
    for name in ("flow_euler", "auto"):
        with pytest.raises(UnsupportedSchedulerError, match=r"stochastic_sampling=True.*'flow_euler'"):
            resolve_scheduler(name, stochastic)
    with pytest.raises(UnsupportedSchedulerError, match=r"'lms' cannot run a flow-matching .*\['flow_euler'\]$"):
        make_scheduler("lms", flow)


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_retrieval_is_the_pooled_projection(family, checkpoints) -> None:
    checkpoint = checkpoints[family]
    clip = make_embedder("clip", checkpoint)
    assert clip.dim == checkpoint.pooled_size and clip.pools_from_conditioning
    _, added = DitConditioning(checkpoint, TorchDitModels(checkpoint)).encode(PROMPT)
    pooled = clip.embed_from_pooled(added["pooled_projections"][-1:])
    np.testing.assert_allclose(pooled, clip.embed([PROMPT]), atol=1e-5)
    assert np.linalg.norm(pooled) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("family", "profile", "says"),
    [
        ("sd3", "gpu", "has no TensorRT engines"),
        ("flux", "gpu", "has no TensorRT engines"),
    ],
)
def test_a_profile_a_transformer_family_lacks_is_refused_naming_it(tiny_dit_dirs, tmp_path, family, profile, says):
    from nirvana_export.repository import write_repository

    folder = tiny_dit_dirs[family]
    with pytest.raises(CheckpointError, match=rf"{family} \(a transformer family\) {says}.*--profile torch"):
        write_repository(folder, tmp_path / "repo", profile, {"checkpoint": str(folder)})
    assert not (tmp_path / "repo" / "unet").exists()


@pytest.mark.parametrize("family", FAMILIES)  # checked at 1 and 2 rows: FLUX's export once kept its traced batch
def test_the_onnx_export_matches_the_torch_modules(family, tiny_dit_dirs, tmp_path) -> None:
    from nirvana_export.onnx_export import export_all

    export_all(tiny_dit_dirs[family], tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "export_manifest.json").read_text())
    served = {"text_encoder", "text_encoder_2", "prompt_embedder", "unet", "vae_decoder"}
    assert set(manifest["models"]) == served | ({"text_encoder_3"} if family == "sd3" else set())
    assert all(entry["max_abs_diff"] <= entry["atol"] for entry in manifest["models"].values())


def test_the_tiny_transformer_checkpoints_are_the_same_bytes_for_the_same_seed(tiny_dit_dirs, tmp_path) -> None:
    from nirvana_dev.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again", seed=8, architecture="tiny-flux")
    written = sorted(p for p in again.rglob("*") if p.is_file())
    assert len(written) > 10
    for path in written:
        assert path.read_bytes() == (tiny_dit_dirs["flux"] / path.relative_to(again)).read_bytes(), path


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_runs_on_a_transformer_checkpoint(family, tiny_dit_dirs, tmp_path) -> None:
    from typer.testing import CliRunner

    from test_calibrate import WIDE, _cli
    from test_calibrate_workload import PROMPTS

    workload = tmp_path / "prompts.txt"
    workload.write_text("\n".join(PROMPTS) + "\n")
    out, report_dir = tmp_path / "thresholds.toml", tmp_path / "report"
    args = ["calibrate", "--checkpoint", str(tiny_dit_dirs[family]), "--workload", str(workload), "--out", str(out)]
    args += ["--report-dir", str(report_dir), "--steps", "6", "--ks", "2,4", "--pairs", "6", "--min-count", "2"]
    args += ["--embedder", "minilm"]  # guidance 7.5 (the default): CFG for SD 3, the guidance input for FLUX
    result = CliRunner().invoke(_cli(), args, env=WIDE)
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["pairs"] == 6
    scores = [s for r in report["records"] for s in r["scores"].values()]
    assert len(scores) == 12 and all(-1 <= s <= 1 for s in scores) and len(set(scores)) > 1
    assert load_config({"checkpoint": "unused"}, path=out).cache.selection.reference_steps == 6


def test_the_gpu_timing_script_times_the_served_transformer_call_on_the_tiny_layouts(tmp_path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "export" / "gpu_dit_timing.py"
    out = tmp_path / "timing.json"
    args = ["--arch", "tiny-sd3,tiny-flux", "--device", "cpu", "--rows", "1,2", "--iterations", "1", "--warmup", "0"]
    subprocess.run([sys.executable, str(script), *args, "--json", str(out)], check=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert [(r["arch"], r["rows"]) for r in results] == [(a, n) for a in ("tiny-sd3", "tiny-flux") for n in (1, 2)]
    assert all(r["mean_ms"] > 0 and r["params_m"] > 0 for r in results)


@pytest.mark.parametrize("folder", ["transformer", "text_encoder_3"])
def test_the_fingerprint_covers_the_transformer_and_t5(folder, tiny_dit_dirs, tmp_path) -> None:
    from nirvana.fingerprint import fingerprint_checkpoint

    copy = Path(shutil.copytree(tiny_dit_dirs["sd3"], tmp_path / "model"))
    weights = next((copy / folder).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: a fine-tune that differs only there
    weights.write_bytes(bytes(data))
    assert fingerprint_checkpoint(copy) != fingerprint_checkpoint(tiny_dit_dirs["sd3"])


def test_add_ons_are_refused_for_a_transformer_family_naming_it(checkpoints, embedder, tmp_path) -> None:
    from nirvana.addons.lora import AdapterError

    config = load_config(
        {
            "checkpoint": str(checkpoints["flux"].path),
            "adapters": {"dir": str(tmp_path / "adapters")},
            "cache": {"dir": str(tmp_path / "cache"), "predictor": {"enabled": False}},
        }
    )
    with pytest.raises(AdapterError, match=r"flux \(a transformer family\) runs without add-ons"):
        Pipeline(config, checkpoint=checkpoints["flux"], embedder=embedder)
