"""In-process end to end: tiny checkpoint + real MiniLM embedder + milvus-lite + latent directory."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nirvana.cache.blob_format import Binding
from nirvana.cache.records import blob_key
from nirvana.config import load_config
from nirvana.embed import ClipEmbedder, make_embedder
from nirvana.pipeline import Pipeline
from nirvana.request import RequestError
from nirvana.runtime.torch_runtime import TorchSubModels

STEPS = 20
FOX = "a red fox in the snow, photograph"


class CountingModels(TorchSubModels):
    """The real torch sub-models, counting text-encoder calls and UNet calls (steps actually run)."""

    text_calls = unet_calls = 0
    text_rows: list[int]

    def encode_text(self, input_ids, attention_mask=None):
        self.text_calls += 1
        self.__dict__.setdefault("text_rows", []).append(len(input_ids))
        return super().encode_text(input_ids, attention_mask)

    def unet(self, sample, timestep, encoder_hidden_states):
        self.unet_calls += 1
        return super().unet(sample, timestep, encoder_hidden_states)


@pytest.fixture(scope="module")
def embedder():
    return make_embedder("minilm")


@pytest.fixture
def make_pipe(tiny_checkpoint, embedder, tmp_path):
    made = []

    def make(**cache):
        config = load_config(
            {
                "checkpoint": str(tiny_checkpoint.path),
                "default_steps": STEPS,
                "cache": {"dir": str(tmp_path / "cache"), "predictor": {"enabled": False}, **cache},
            }
        )
        pipe = Pipeline(config, checkpoint=tiny_checkpoint, models=CountingModels(tiny_checkpoint), embedder=embedder)
        made.append(pipe)
        return pipe

    yield make
    for pipe in made:
        pipe.close()


def test_paraphrase_hits_unrelated_misses_and_reopened_cache_still_hits(make_pipe) -> None:
    pipe = make_pipe()
    first = pipe.generate(FOX, seed=1)
    assert (
        not first.cache_hit and first.reason == "empty" and first.admitted == len(pipe.cache.selector.admit_ks(STEPS))
    )
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8 and first.image.std() > 0
    calls = pipe.models.unet_calls
    para = pipe.generate("photo of a red fox in snow", seed=2)
    assert para.cache_hit and para.skipped_steps > 0 and para.matched_prompt == FOX
    assert pipe.models.unet_calls - calls == STEPS - para.skipped_steps  # the first K steps were really skipped
    assert para.similarity > 0.9 and para.admitted == 0
    other = pipe.generate("a bowl of ramen on a wooden table, studio lighting", seed=3)
    assert not other.cache_hit and other.skipped_steps == 0 and other.reason == "below-threshold"
    pipe.close()
    reopened = make_pipe()
    again = reopened.generate("photo of a red fox in snow", seed=2)
    assert again.cache_hit and again.skipped_steps == para.skipped_steps
    np.testing.assert_array_equal(again.image, para.image)
    assert reopened.cache.record(reopened.cache_key(STEPS, 7.5), "default", FOX).entries[para.skipped_steps].hits == 2


def test_repeat_of_same_prompt_and_seed_reproduces_the_uncached_image(make_pipe) -> None:
    pipe = make_pipe(latent_dtype="float32")
    miss = pipe.generate(FOX, seed=5)
    hit = pipe.generate(FOX, seed=5)
    assert hit.cache_hit and hit.skipped_steps == pipe.cache.selector.k_opt(1.0, STEPS)
    bypass = pipe.generate(FOX, seed=5, cache_mode="bypass")
    assert bypass.reason == "bypass" and not bypass.cache_hit
    assert np.abs(hit.image.astype(int) - bypass.image.astype(int)).max() <= 1
    assert np.array_equal(miss.image, bypass.image)


def test_a_q6_cache_hits_as_float16_does_with_nearly_the_same_image(make_pipe, tmp_path) -> None:
    """`cache.latent_dtype = "q6"`: the same hits and K as float16, entries a third the bytes, and the hit's image
    within a few grey levels of the float16 hit's (what `nirvana-quality latents` measures over many pairs)."""
    hits = {}
    for dtype in ("float16", "q6"):
        pipe = make_pipe(latent_dtype=dtype, dir=str(tmp_path / dtype))
        pipe.generate(FOX, seed=5)
        hits[dtype] = pipe.generate("photo of a red fox in snow", seed=5)
        pipe.close()
        hits[dtype + " bytes"] = sum(f.stat().st_size for f in (tmp_path / dtype).rglob("*.safetensors"))
    q6, fp16 = hits["q6"], hits["float16"]
    assert q6.cache_hit and (q6.skipped_steps, q6.matched_prompt) == (fp16.skipped_steps, fp16.matched_prompt)
    assert hits["q6 bytes"] < hits["float16 bytes"]
    difference = np.abs(q6.image.astype(int) - fp16.image.astype(int))
    assert 0 < difference.max() <= 12 and difference.mean() < 2


def test_bypass_neither_reads_nor_writes_and_refresh_rewrites(make_pipe) -> None:
    pipe = make_pipe()
    pipe.generate(FOX, cache_mode="bypass")
    assert pipe.cache.entries == 0 and pipe.cache.counters.misses == 0
    pipe.generate(FOX)
    before = pipe.cache.entries
    refreshed = pipe.generate(FOX, cache_mode="refresh")
    assert not refreshed.cache_hit and refreshed.admitted == before and pipe.cache.entries == before


def test_cache_key_separates_step_counts_and_guidance(make_pipe) -> None:
    pipe = make_pipe()
    pipe.generate(FOX)
    assert not pipe.generate(FOX, steps=STEPS + 2).cache_hit
    assert not pipe.generate(FOX, guidance=3.0).cache_hit
    assert pipe.generate(FOX).cache_hit


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"prompt": ""}, "PROMPT"),
        ({"prompt": "   "}, "PROMPT"),
        ({"prompt": "x" * 10_000}, "PROMPT"),
        ({"prompt": "bad\x00byte"}, "PROMPT"),
        ({"steps": 0}, "NUM_INFERENCE_STEPS"),
        ({"steps": 10_000}, "NUM_INFERENCE_STEPS"),
        ({"guidance": float("nan")}, "GUIDANCE_SCALE"),
        ({"guidance": 1000.0}, "GUIDANCE_SCALE"),
        ({"seed": -1}, "SEED"),
        ({"cache_mode": "sometimes"}, "CACHE_MODE"),
        ({"tenant": "t" * 1000}, "TENANT"),
        ({"negative_prompt": 5}, "NEGATIVE_PROMPT"),
    ],
)
def test_bad_requests_name_the_field_and_change_nothing(make_pipe, options, field) -> None:
    pipe = make_pipe()
    pipe.generate(FOX)
    entries, nbytes = pipe.cache.entries, pipe.cache.total_bytes
    prompt = options.pop("prompt", FOX)
    with pytest.raises(RequestError, match=field) as err:
        pipe.generate(prompt, **options)
    assert err.value.field == field
    assert (pipe.cache.entries, pipe.cache.total_bytes) == (entries, nbytes)


class NaNModels(CountingModels):
    """An fp16 engine that overflows: the UNet answers NaN while `poisoned` (a fault we cannot cause in fp32)."""

    poisoned = False

    def unet(self, sample, timestep, encoder_hidden_states):
        out = super().unet(sample, timestep, encoder_hidden_states)
        return out * float("nan") if self.poisoned else out


def test_non_finite_output_fails_clearly_and_caches_nothing(tiny_checkpoint, embedder, tmp_path) -> None:
    from nirvana.pipeline import NonFiniteError

    config = load_config(
        {"checkpoint": str(tiny_checkpoint.path), "default_steps": STEPS, "cache": {"dir": str(tmp_path)}}
    )
    models = NaNModels(tiny_checkpoint)
    pipe = Pipeline(config, checkpoint=tiny_checkpoint, models=models, embedder=embedder)
    try:
        models.poisoned = True
        with pytest.raises(NonFiniteError, match="non-finite"):
            pipe.generate(FOX)
        assert pipe.cache.entries == 0  # no NaN latent was admitted for later hits to serve
        models.poisoned = False
        assert pipe.generate(FOX).admitted > 0  # the same request works once the model does
    finally:
        pipe.close()


def _overwrite_latents(pipe, value: float) -> int:
    """Every cached latent of FOX replaced by `value`, still bound to its row (as an entry written before the checks,
    or one damaged in a way the digest allows, would be)."""
    record = pipe.cache.record(pipe.cache_key(STEPS, 7.5), "default", FOX)
    for k in record.entries:
        key, binding = blob_key(record.id, k), Binding(record.id, record.cache_key, record.tenant, k)
        blob = pipe.cache.latents.get(key)
        latent = np.full_like(blob.tensors["latent"], value)
        pipe.cache.latents.put(key, {**blob.tensors, "latent": latent}, blob.meta, binding)  # bound: only the value
    return len(record.entries)


def test_a_cached_non_finite_latent_is_dropped_at_load_and_served_uncached(make_pipe) -> None:
    pipe = make_pipe(latent_dtype="float32")
    pipe.generate(FOX, seed=5)
    _overwrite_latents(pipe, np.nan)
    served = pipe.generate(FOX, seed=5)
    assert (served.reason, served.cache_hit, served.skipped_steps) == ("blob-corrupt", False, 0)
    bypass = pipe.generate(FOX, seed=5, cache_mode="bypass")
    np.testing.assert_array_equal(served.image, bypass.image)  # the full, uncached image


def test_a_hit_whose_latent_makes_the_unet_overflow_is_invalidated(make_pipe) -> None:
    """A finite latent the UNet turns into inf/NaN (fp32 overflow): the request is run again uncached and the entry
    is dropped on this first failure, so the next similar request does not meet it again."""
    pipe = make_pipe(latent_dtype="float32")
    pipe.generate(FOX, seed=5)
    poisoned = _overwrite_latents(pipe, 3e38)
    for failures in range(1, poisoned + 1):  # each poisoned K serves once at most, then is gone
        served = pipe.generate(FOX, seed=5)
        assert (served.reason, served.cache_hit, served.non_finite) == ("non-finite", False, 1)
        np.testing.assert_array_equal(served.image, pipe.generate(FOX, seed=5, cache_mode="bypass").image)
        assert pipe.cache.counters.invalidated == failures
    again = pipe.generate(FOX, seed=5)
    assert again.non_finite == 0 and again.reason != "non-finite"


@pytest.mark.parametrize("name", ["clip", "minilm"])
def test_one_text_encoder_call_per_request_and_clip_retrieval_comes_from_it(
    name, tiny_checkpoint, embedder, tmp_path, monkeypatch
) -> None:
    config = load_config(
        {"checkpoint": str(tiny_checkpoint.path), "embedder": name, "default_steps": 4, "cache": {"dir": str(tmp_path)}}
    )
    models = CountingModels(tiny_checkpoint)
    # clip as served: pooled from the models' own encode_text, so any separate embedding call would count too
    used = ClipEmbedder(tiny_checkpoint, encode_text=models.encode_text) if name == "clip" else embedder
    embed_calls, vectors = [], []
    embed = used.embed
    monkeypatch.setattr(used, "embed", lambda texts: embed_calls.append(texts) or embed(texts))
    pipe = Pipeline(config, checkpoint=tiny_checkpoint, models=models, embedder=used)
    lookup = pipe.cache.lookup
    monkeypatch.setattr(pipe.cache, "lookup", lambda vector, *args: vectors.append(vector) or lookup(vector, *args))
    try:
        for mode, hit in [("auto", False), ("auto", True), ("refresh", False), ("bypass", False)]:
            before = (models.text_calls, len(embed_calls))
            result = pipe.generate(FOX, negative_prompt="blurry", seed=1, cache_mode=mode)
            assert result.cache_hit == hit
            own_call = name == "minilm" and mode != "bypass"  # MiniLM is another model: one call of its own
            assert (models.text_calls - before[0], len(embed_calls) - before[1]) == (1, int(own_call)), mode
            assert ("embed_ms" in result.timings_ms) == (mode != "bypass")
    finally:
        pipe.close()
    monkeypatch.undo()
    np.testing.assert_allclose(vectors[0], used.embed_one(FOX), atol=1e-6)  # what the embedder gives alone


def test_the_empty_negative_prompt_is_encoded_once_and_images_do_not_depend_on_order(make_pipe) -> None:
    pipe = make_pipe()
    models = pipe.models
    first = pipe.generate(FOX, seed=3, cache_mode="bypass")
    assert models.text_rows == [1, 1]  # the empty negative prompt alone (kept), then the prompt's row
    again = pipe.generate(FOX, seed=3, cache_mode="bypass")
    assert models.text_rows == [1, 1, 1]  # from then on: one call of one row per request
    np.testing.assert_array_equal(first.image, again.image)
    pipe.generate(FOX, negative_prompt="blurry", seed=3, cache_mode="bypass")
    assert models.text_rows[-1] == 2  # any other negative prompt: both rows in one call
    fresh = make_pipe()  # a process that never saw the first request makes the same image
    np.testing.assert_array_equal(fresh.generate(FOX, seed=3, cache_mode="bypass").image, first.image)


def test_an_embedder_with_its_own_model_call_runs_beside_the_text_encoder(tiny_checkpoint, embedder, tmp_path) -> None:
    spans: dict[str, tuple[float, float]] = {}

    def recorded(name, fn, *args):
        start = time.monotonic()
        time.sleep(0.3)  # long enough that running one after the other could not look overlapped
        out = fn(*args)
        spans[name] = (start, time.monotonic())
        return out

    class SlowText(CountingModels):
        def encode_text(self, input_ids, attention_mask=None):
            return recorded("text", super().encode_text, input_ids, attention_mask)

    class SlowMiniLM(type(embedder)):
        def __init__(self) -> None:  # the loaded MiniLM, its call slowed and recorded
            self.__dict__.update(embedder.__dict__)

        def embed(self, texts):
            return recorded("embed", super().embed, texts)

    config = load_config({"checkpoint": str(tiny_checkpoint.path), "cache": {"dir": str(tmp_path / "cache")}})
    pipe = Pipeline(config, checkpoint=tiny_checkpoint, models=SlowText(tiny_checkpoint), embedder=SlowMiniLM())
    try:
        result = pipe.generate(FOX, negative_prompt="blurry", seed=1, steps=2)
    finally:
        pipe.close()
    (text_start, text_end), (embed_start, embed_end) = spans["text"], spans["embed"]
    assert embed_start < text_end and text_start < embed_end  # the two calls were in flight together
    assert not result.cache_hit and "embed_ms" in result.timings_ms


def test_a_miss_admits_beside_the_vae_decode_and_counts_only_the_wait(make_pipe) -> None:
    pipe = make_pipe()
    spans: dict[str, tuple[float, float]] = {}
    decode, admit = pipe.models.decode, pipe.cache.admit

    def recorded(name, fn, *args, **kwargs):
        start = time.monotonic()
        time.sleep(0.3)  # long enough that running one after the other could not look overlapped
        out = fn(*args, **kwargs)
        spans[name] = (start, time.monotonic())
        return out

    pipe.models.decode = lambda latent: recorded("decode", decode, latent)
    pipe.cache.admit = lambda *args, **kwargs: recorded("admit", admit, *args, **kwargs)
    result = pipe.generate(FOX, seed=2)
    (decode_start, decode_end), (admit_start, admit_end) = spans["decode"], spans["admit"]
    assert admit_start < decode_end and decode_start < admit_end  # in flight together
    assert result.admitted > 0 and pipe.cache.entries == result.admitted  # written before the answer, as before
    timings = result.timings_ms
    assert timings["admit_call_ms"] >= 300 and timings["admit_ms"] < 150  # the response waited for little of it
