"""The engine's progress hook (in process, tiny checkpoint) and the latent preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nirvana.cache.outcome import Reason
from nirvana.config import load_config
from nirvana.embed import make_embedder
from nirvana.pipeline import Pipeline
from nirvana.progress import SD_LATENT_RGB, CacheEvent, Cancelled, StepEvent, latent_preview
from nirvana.runtime.torch_runtime import TorchSubModels

STEPS = 12
PROMPT = "a lighthouse on a cliff at dawn, oil painting"


class CountingModels(TorchSubModels):
    unet_calls = 0

    def unet(self, sample, timestep, encoder_hidden_states):
        self.unet_calls += 1
        return super().unet(sample, timestep, encoder_hidden_states)


@pytest.fixture
def pipe(tiny_checkpoint, tmp_path):
    config = load_config(
        {
            "checkpoint": str(tiny_checkpoint.path),
            "cache": {"dir": str(tmp_path / "cache"), "predictor": {"enabled": False}},
        }
    )
    made = Pipeline(config, checkpoint=tiny_checkpoint, models=CountingModels(tiny_checkpoint), embedder=_minilm())
    yield made
    made.close()


_EMBEDDER = []


def _minilm():
    if not _EMBEDDER:
        _EMBEDDER.append(make_embedder("minilm"))
    return _EMBEDDER[0]


def test_one_cache_event_then_one_step_event_per_step_run_and_the_same_image(pipe) -> None:
    events: list = []
    miss = pipe.generate(PROMPT, on_event=events.append, seed=3, steps=STEPS)
    assert isinstance(events[0], CacheEvent) and (events[0].hit, events[0].skipped_steps) == (False, 0)
    assert [e.step for e in events[1:]] == list(range(1, STEPS + 1))
    assert all(isinstance(e, StepEvent) and e.steps == STEPS for e in events[1:])
    assert tuple(events[-1].latent.shape) == (1, 4, 16, 16)

    events.clear()
    hit = pipe.generate(PROMPT, on_event=events.append, seed=3, steps=STEPS)
    k = hit.skipped_steps
    assert hit.cache_hit and k > 0 and events[0] == CacheEvent(True, k, STEPS, hit.similarity, "hit")
    assert [e.step for e in events[1:]] == list(range(k + 1, STEPS + 1))  # N − K of them

    unhooked = pipe.generate(PROMPT, seed=3, steps=STEPS)  # the hook changes nothing the request computes
    np.testing.assert_array_equal(unhooked.image, hit.image)
    bypass_hooked = pipe.generate(PROMPT, on_event=lambda e: None, seed=3, steps=STEPS, cache_mode="bypass")
    np.testing.assert_array_equal(bypass_hooked.image, miss.image)


def test_cancelling_stops_at_that_step_and_admits_nothing(pipe) -> None:
    def cancel_at_third_step(event) -> None:
        if isinstance(event, StepEvent) and event.step == 3:
            raise Cancelled("client gone")

    with pytest.raises(Cancelled):
        pipe.generate(PROMPT, on_event=cancel_at_third_step, seed=1, steps=STEPS)
    assert pipe.models.unet_calls == 3  # no step after the one it was cancelled at
    again = pipe.generate(PROMPT, seed=1, steps=STEPS)
    assert not again.cache_hit and again.reason == Reason.EMPTY


def test_bypass_reports_a_cache_event_without_a_search(pipe) -> None:
    events: list = []
    pipe.generate(PROMPT, on_event=events.append, steps=4, cache_mode="bypass")
    assert events[0] == CacheEvent(False, 0, 4, None, "bypass")
    assert events[0].to_json() == {
        "event": "cache",
        "hit": False,
        "skipped_steps": 0,
        "steps": 4,
        "similarity": None,
        "reason": "bypass",
    }
    assert events[1].to_json() == {"event": "progress", "step": 1, "steps": 4}


def test_preview_is_the_fixed_linear_map_as_uint8() -> None:
    latent = torch.zeros(1, 4, 8, 6)
    assert latent_preview(latent).shape == (8, 6, 3) and latent_preview(latent).dtype == np.uint8
    assert (latent_preview(latent) == 128).all()  # 0 maps to the middle of [-1, 1]
    latent[0, 3] = 1.0  # the fourth channel alone: its row of the matrix
    expected = ((SD_LATENT_RGB[3] + 1) * 127.5).round().astype(np.uint8)
    assert (latent_preview(latent) == expected).all()
    assert (latent_preview(np.full((4, 2, 2), 100.0, np.float32)) == 255).all()  # clipped, not wrapped


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 9, 8, 8), (8, 8)])
def test_preview_refuses_what_is_not_one_sd_latent(shape) -> None:
    with pytest.raises(ValueError, match="latent"):
        latent_preview(torch.zeros(shape))
