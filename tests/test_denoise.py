"""nirvana.denoise: K = 0 equals diffusers' pipeline; resuming at K equals the uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline

from nirvana.denoise import (
    UNET_SCHEDULERS,
    ResumeState,
    StepRangeError,
    UnsupportedSchedulerError,
    check_resumable,
    decode,
    denoise,
    encode_prompts,
    initial_latent,
    make_scheduler,
    scheduler_name,
)
from nirvana.runtime.torch_runtime import TorchSubModels
from nirvana.submodels import SubModels

PROMPT_A = "a photo of a cat in a garden"
PROMPT_B = "an oil painting of a castle at night"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5
SEED = 1234
N = 20


class CountingSubModels:
    """Wraps SubModels and counts text-encoder and UNet calls."""

    def __init__(self, inner: SubModels) -> None:
        self.inner = inner
        self.text_calls = self.unet_calls = 0

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.text_calls += 1
        return self.inner.encode_text(input_ids, attention_mask)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        self.unet_calls += 1
        return self.inner.unet(sample, timestep, encoder_hidden_states)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latent)


@pytest.fixture(scope="module")
def models(tiny_checkpoint) -> TorchSubModels:
    return TorchSubModels(tiny_checkpoint)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint_dir,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def embeddings(tiny_checkpoint, models) -> dict[str, torch.Tensor]:
    return {p: encode_prompts(tiny_checkpoint.tokenizer, models, p, NEGATIVE) for p in (PROMPT_A, PROMPT_B)}


def _start(tiny_checkpoint, name: str, seed: int = SEED):
    """Fresh scheduler, generator and x_T for an N-step run."""
    scheduler = make_scheduler(name, tiny_checkpoint.scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    shape = (1, tiny_checkpoint.latent_channels, *tiny_checkpoint.latent_size)
    return scheduler, generator, initial_latent(shape, generator, scheduler, num_steps=N)


@pytest.fixture(scope="module")
def full_runs(tiny_checkpoint, models, embeddings) -> dict:
    """Uninterrupted N-step runs of prompt A per scheduler, states captured at K = 5 and 10."""
    runs = {}
    for name in UNET_SCHEDULERS:
        scheduler, generator, x_t = _start(tiny_checkpoint, name)
        result = denoise(
            models, scheduler, N, embeddings[PROMPT_A], GUIDANCE, generator=generator, latent=x_t, capture_at=(5, 10)
        )
        runs[name] = (x_t, result)
    return runs


def _resume(tiny_checkpoint, models, name, embeds, state: ResumeState, seed: int = 999):
    """Resume with a fresh scheduler and an unrelated generator: everything must come from ``state``."""
    scheduler = make_scheduler(name, tiny_checkpoint.scheduler_config)
    return denoise(models, scheduler, N, embeds, GUIDANCE, generator=torch.Generator().manual_seed(seed), start=state)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", list(UNET_SCHEDULERS))
@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0])
def test_k0_matches_stable_diffusion_pipeline(name, guidance, pipe, tiny_checkpoint, models) -> None:
    steps = 8
    pipe.scheduler = make_scheduler(name, dict(pipe.scheduler.config))
    expected = pipe(
        PROMPT_A,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).images[0]

    scheduler = make_scheduler(name, tiny_checkpoint.scheduler_config)
    generator = torch.Generator().manual_seed(SEED)
    embeds = encode_prompts(tiny_checkpoint.tokenizer, models, PROMPT_A, NEGATIVE)
    x_t = initial_latent((1, 4, 16, 16), generator, scheduler, num_steps=steps)
    result = denoise(models, scheduler, steps, embeds, guidance, generator=generator, latent=x_t)
    image = decode(models, result.latent, tiny_checkpoint.scaling_factor)

    assert result.steps_run == steps
    assert image.dtype == np.float32 and image.shape == expected.shape == (64, 64, 3)
    assert image.std() > 0.01  # not a blank image: the comparison means something
    assert np.abs(image - expected).max() <= 1e-4


@pytest.mark.parametrize("prompt", [PROMPT_A, "x " * 100])
def test_one_batched_text_encoder_call_matches_the_pipelines_two(prompt, tiny_checkpoint, models) -> None:
    counting = CountingSubModels(models)
    batched = encode_prompts(tiny_checkpoint.tokenizer, counting, prompt, NEGATIVE)
    assert counting.text_calls == 1
    tokenizer = tiny_checkpoint.tokenizer
    ids = [
        tokenizer(t, padding="max_length", truncation=True, return_tensors="pt").input_ids for t in (NEGATIVE, prompt)
    ]
    two_calls = torch.cat([models.encode_text(i) for i in ids])
    # Batching changes float summation: measured max |diff| 0 for PROMPT_A, 2.4e-7 for the 77-token prompt.
    assert _max_diff(batched, two_calls) <= 1e-6


@pytest.mark.parametrize("name", list(UNET_SCHEDULERS))
@pytest.mark.parametrize("k", [5, 10])
def test_resume_at_k_equals_uninterrupted_run(name, k, full_runs, tiny_checkpoint, models, embeddings) -> None:
    _, full = full_runs[name]
    state = ResumeState.from_arrays(full.captured[k].to_arrays(), step=k)
    resumed = _resume(tiny_checkpoint, models, name, embeddings[PROMPT_A], state)
    assert resumed.steps_run == N - k
    assert _max_diff(resumed.latent, full.latent) <= 1e-5


def test_dpm_history_matters(full_runs, tiny_checkpoint, models, embeddings) -> None:
    _, full = full_runs["dpmpp"]
    state = full.captured[10]
    assert state.lower_order_nums == 2 and all(t is not None for t in state.model_outputs)
    without_history = _resume(tiny_checkpoint, models, "dpmpp", embeddings[PROMPT_A], state.for_new_prompt("reset"))
    assert _max_diff(without_history.latent, full.latent) > 1e-5


def test_euler_a_needs_generator_state(full_runs, tiny_checkpoint, models, embeddings) -> None:
    _, full = full_runs["euler_a"]
    state = full.captured[10]
    assert state.generator_state is not None
    resumed = _resume(tiny_checkpoint, models, "euler_a", embeddings[PROMPT_A], state.for_new_prompt("reset"))
    assert _max_diff(resumed.latent, full.latent) > 1e-5


@pytest.mark.parametrize("scheduler_cls", [PNDMScheduler, LMSDiscreteScheduler])
def test_stateful_schedulers_are_rejected(scheduler_cls, tiny_checkpoint) -> None:
    scheduler = scheduler_cls.from_config(tiny_checkpoint.scheduler_config)
    with pytest.raises(UnsupportedSchedulerError, match=scheduler_cls.__name__):
        check_resumable(scheduler)
    with pytest.raises(UnsupportedSchedulerError, match=scheduler_cls.__name__) as info:
        make_scheduler("auto", dict(scheduler.config))
    assert "'dpmpp'" in str(info.value)


def test_make_scheduler_names(tiny_checkpoint) -> None:
    for name in UNET_SCHEDULERS:
        assert scheduler_name(make_scheduler(name, tiny_checkpoint.scheduler_config)) == name
    assert scheduler_name(make_scheduler("auto", tiny_checkpoint.scheduler_config)) == "ddim"
    assert make_scheduler("dpmpp", tiny_checkpoint.scheduler_config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(UnsupportedSchedulerError, match="'euler_a'"):
        make_scheduler("heun", tiny_checkpoint.scheduler_config)
    sde = make_scheduler("dpmpp", tiny_checkpoint.scheduler_config)
    sde.register_to_config(algorithm_type="sde-dpmsolver++")
    with pytest.raises(UnsupportedSchedulerError, match="sde-dpmsolver"):
        check_resumable(sde)


@pytest.mark.parametrize("history", ["reset", "carry"])
@pytest.mark.parametrize("name", ["dpmpp", "euler_a", "ddim"])
def test_other_prompt_runs_only_remaining_steps(name, history, full_runs, tiny_checkpoint, models, embeddings) -> None:
    _, full = full_runs[name]
    counting = CountingSubModels(models)
    state = ResumeState.from_arrays(full.captured[10].to_arrays(), step=10).for_new_prompt(history)
    scheduler = make_scheduler(name, tiny_checkpoint.scheduler_config)
    result = denoise(
        counting, scheduler, N, embeddings[PROMPT_B], GUIDANCE, generator=torch.Generator().manual_seed(7), start=state
    )
    assert counting.unet_calls == result.steps_run == N - 10
    assert torch.isfinite(result.latent).all()
    assert result.latent.shape == (1, 4, 16, 16)


def test_resume_state_round_trip_and_reset() -> None:
    latent = torch.randn(1, 4, 16, 16)
    state = ResumeState(
        step=5,
        latent=latent,
        model_outputs=[None, torch.randn(1, 4, 16, 16)],
        lower_order_nums=1,
        generator_state=torch.Generator().manual_seed(3).get_state(),
    )
    arrays = state.to_arrays()
    assert arrays["lower_order_nums"].dtype == np.int64 and arrays["lower_order_nums"].shape == (1,)
    assert "model_output_0" not in arrays and "model_output_1" in arrays
    back = ResumeState.from_arrays(arrays, step=5)
    assert torch.equal(back.latent, latent) and back.model_outputs[0] is None
    assert torch.equal(back.model_outputs[1], state.model_outputs[1])
    assert back.lower_order_nums == 1 and torch.equal(back.generator_state, state.generator_state)

    reset = state.for_new_prompt("reset")
    assert reset.model_outputs == [None, None] and reset.lower_order_nums == 0 and reset.generator_state is None
    assert torch.equal(reset.latent, latent)
    carried = state.for_new_prompt("carry")
    assert carried.lower_order_nums == 1 and carried.generator_state is not None
    with pytest.raises(ValueError, match="'keep'"):
        state.for_new_prompt("keep")


@pytest.mark.parametrize(("start_step", "capture"), [(0, ()), (N, ()), (None, (0,)), (None, (N,)), (8, (5,))])
def test_step_ranges_are_checked(start_step, capture, tiny_checkpoint, models, embeddings) -> None:
    scheduler, generator, x_t = _start(tiny_checkpoint, "ddim")
    start = None if start_step is None else ResumeState(step=start_step, latent=x_t)
    bad = capture[0] if capture else start_step
    with pytest.raises(StepRangeError, match=f"step {bad} is outside"):
        denoise(
            models,
            scheduler,
            N,
            embeddings[PROMPT_A],
            GUIDANCE,
            generator=generator,
            latent=None if start else x_t,
            start=start,
            capture_at=capture,
        )


def test_history_reset_vs_carry_for_another_prompt(full_runs, tiny_checkpoint, models, embeddings, capsys) -> None:
    """Measures what a cached DPM-Solver++ entry should carry when another prompt resumes from it.

    Reference: prompt B's own uncached run from prompt A's x_T. Printed for the docs (run with ``-s``).
    """
    x_t, full_a = full_runs["dpmpp"]
    scheduler = make_scheduler("dpmpp", tiny_checkpoint.scheduler_config)
    uncached_b = denoise(
        models, scheduler, N, embeddings[PROMPT_B], GUIDANCE, generator=torch.Generator(), latent=x_t
    ).latent
    lines = [
        f"DPM-Solver++ N={N}, g={GUIDANCE}: final latent std {float(uncached_b.std()):.3g}; "
        f"A vs B uncached: max {_max_diff(full_a.latent, uncached_b):.4g}",
    ]
    for k in (5, 10):
        for history in ("reset", "carry"):
            state = full_a.captured[k].for_new_prompt(history)
            resumed = _resume(tiny_checkpoint, models, "dpmpp", embeddings[PROMPT_B], state).latent
            assert torch.isfinite(resumed).all()
            lines.append(
                f"  K={k:2d} {history}: max |resumed - B uncached| {_max_diff(resumed, uncached_b):.4g}, "
                f"max |resumed - A| {_max_diff(resumed, full_a.latent):.4g}"
            )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
