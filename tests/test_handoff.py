"""A loop handed to the step scheduler and its answer survive the wire exactly."""

from __future__ import annotations

import json

import pytest
import torch

from nirvana.denoise import DenoiseResult, ResumeState
from nirvana.handoff import DenoiseJob, HandoffError, JobControl, decode_final, decode_job, encode_final, encode_job


def test_job_round_trips_exactly() -> None:
    start = ResumeState(
        step=3, latent=torch.randn(1, 4, 8, 8), model_outputs=[None, torch.randn(1, 4, 8, 8)], lower_order_nums=1
    )
    job = DenoiseJob(
        "j1",
        "dpmpp",
        20,
        7.5,
        torch.randn(2, 77, 32),
        torch.Generator().manual_seed(3).get_state(),
        start=start,
        capture_at=[5, 10],
        added_cond={"time_ids": torch.ones(2, 6)},
        events=True,
    )
    header, blob = encode_job(job)
    back = decode_job(json.loads(header), blob)
    assert (back.job_id, back.scheduler, back.steps, back.guidance, back.capture_at, back.events) == (
        "j1",
        "dpmpp",
        20,
        7.5,
        [5, 10],
        True,
    )
    assert torch.equal(back.embeddings, job.embeddings) and torch.equal(back.generator_state, job.generator_state)
    assert back.latent is None and back.start.step == 3 and torch.equal(back.start.latent, start.latent)
    assert back.start.model_outputs[0] is None and torch.equal(back.start.model_outputs[1], start.model_outputs[1])
    assert torch.equal(back.added_cond["time_ids"], torch.ones(2, 6))


def test_final_answer_round_trips_with_captures_and_step_times() -> None:
    captured = {5: ResumeState(step=5, latent=torch.randn(1, 4, 8, 8))}
    result = DenoiseResult(torch.randn(1, 4, 8, 8), captured, 15)
    header, blob = encode_final(result, [(8, 12.5), (7, 11.0)])
    back, step_ms = decode_final(json.loads(header), blob)
    assert back.steps_run == 15 and torch.equal(back.latent, result.latent)
    assert list(back.captured) == [5] and torch.equal(back.captured[5].latent, captured[5].latent)
    assert step_ms == [(8, 12.5), (7, 11.0)]


def test_a_malformed_job_is_refused_by_name() -> None:
    with pytest.raises(HandoffError, match="not a safetensors blob"):
        decode_job({"id": "x"}, b"\xff" * 32)
    with pytest.raises(HandoffError, match="'embeddings'"):
        decode_job({"id": "x"}, b"")


def test_a_job_names_only_a_lora_sets_unet_model() -> None:
    job = DenoiseJob("j2", "ddim", 4, 7.5, torch.zeros(2, 7, 8), torch.Generator().get_state())
    header, blob = encode_job(job)
    assert decode_job(json.loads(header), blob).unet_model is None
    job.unet_model = "unet_lora_0123456789abcdef"
    header, blob = encode_job(job)
    assert decode_job(json.loads(header), blob).unet_model == "unet_lora_0123456789abcdef"
    for bad in ("text_encoder", "unet", "unet_lora_0123456789abcdeg", 7, "unet_lora_0123456789abcdef/../x"):
        with pytest.raises(HandoffError, match="unet_model="):
            decode_job({**json.loads(header), "unet_model": bad}, blob)


def test_a_controlnet_job_round_trips_and_names_only_controlnet_and_control_unet_models() -> None:
    image = torch.rand(1, 3, 16, 16)
    job = DenoiseJob("j3", "ddim", 4, 7.5, torch.zeros(2, 7, 8), torch.Generator().get_state())
    job.control, job.unet_model = JobControl("controlnet_edges", image, 0.6), "unet_control"
    header, blob = encode_job(job)
    back = decode_job(json.loads(header), blob)
    assert (back.control.model, back.control.scale, back.unet_model) == ("controlnet_edges", 0.6, "unet_control")
    assert torch.equal(back.control.image, image)
    lora = {**json.loads(header), "unet_model": "unet_lora_0123456789abcdef"}  # a LoRA set fused into unet_control
    assert decode_job(lora, blob).unet_model == "unet_lora_0123456789abcdef"
    refused = [
        ("control.model=", {"model": "unet", "scale": 0.6}),
        ("control.model=", {"model": "controlnet_../x", "scale": 0.6}),
        ("control.scale=", {"model": "controlnet_edges", "scale": 2.5}),
        ("control.scale=", {"model": "controlnet_edges", "scale": True}),
        ("control=", "edges"),
    ]
    for named, control in refused:
        with pytest.raises(HandoffError, match=named):
            decode_job({**json.loads(header), "control": control}, blob)
    for bad_unet in (None, "unet", "controlnet_edges"):  # with a ControlNet, the UNet model must take residuals
        with pytest.raises(HandoffError, match="unet_model="):
            decode_job({**json.loads(header), "unet_model": bad_unet}, blob)
    no_image = encode_job(DenoiseJob("j4", "ddim", 4, 7.5, torch.zeros(2, 7, 8), torch.Generator().get_state()))[1]
    with pytest.raises(HandoffError, match="control/image"):
        decode_job(json.loads(header), no_image)
