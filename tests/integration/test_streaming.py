"""`nirvana_stream` through the real server: events in order, previews, the same image as `nirvana`, cancellation."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from nirvana_client import GenerateOptions
from nirvana_client.stream import StreamCancelled, generate_stream

pytestmark = pytest.mark.integration
STEPS = 10
LATENT = (16, 16, 3)  # the tiny model's 16×16 latent, as RGB


def _kinds(events) -> list[str]:
    return [e.event for e in events]


def _hit_when_admitted(client, prompt, options, timeout_s=30.0):
    """Stream `prompt` until it hits (its own admission is written behind the first response)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result, events = generate_stream(client, prompt, options)
        if result.cache_hit or time.monotonic() > deadline:
            return result, events
        time.sleep(0.5)


def test_events_arrive_in_order_one_progress_per_step_run(connect) -> None:
    client = connect("grpc")
    options = GenerateOptions(seed=4, steps=STEPS, tenant="stream-order")
    prompt = "a lighthouse on a cliff at dawn, oil painting"
    miss, events = generate_stream(client, prompt, options)
    assert not miss.cache_hit
    assert _kinds(events) == ["cache"] + ["progress"] * STEPS + ["final"]
    assert events[0].data["hit"] is False and events[0].data["skipped_steps"] == 0
    assert [e.data["step"] for e in events[1:-1]] == list(range(1, STEPS + 1))
    assert all(e.data["steps"] == STEPS for e in events[1:-1])
    assert [e.elapsed_ms for e in events] == sorted(e.elapsed_ms for e in events)
    assert events[-1].data["steps_run"] == STEPS and events[-1].data["admitted"] > 0

    hit, events = _hit_when_admitted(client, prompt, options)
    k = hit.skipped_steps
    assert hit.cache_hit and k > 0
    assert events[0].data == {
        "event": "cache",
        "hit": True,
        "skipped_steps": k,
        "steps": STEPS,
        "similarity": pytest.approx(hit.similarity, abs=1e-5),
        "reason": "hit",
    }
    assert _kinds(events) == ["cache"] + ["progress"] * (STEPS - k) + ["final"]
    assert [e.data["step"] for e in events[1:-1]] == list(range(k + 1, STEPS + 1))
    # The plain model hits the same entry at the same K, and gives the same image.
    plain = client.generate(prompt, options)
    assert (plain.cache_hit, plain.skipped_steps) == (True, k)
    np.testing.assert_array_equal(plain.image, hit.image)


def test_streamed_image_equals_the_plain_models_image(connect) -> None:
    client = connect("grpc")
    options = GenerateOptions(seed=11, steps=STEPS, cache_mode="bypass")
    prompt = "a bowl of ramen, studio lighting"
    streamed, events = generate_stream(client, prompt, options)
    plain = client.generate(prompt, options)
    np.testing.assert_array_equal(streamed.image, plain.image)
    assert streamed.image.shape == (64, 64, 3) and streamed.image.dtype == np.uint8
    assert events[0].data["reason"] == "bypass" and events[0].data["similarity"] is None
    assert math.isnan(streamed.similarity) and not streamed.cache_hit
    assert {"unet_ms", "decode_ms", "total_ms"} <= set(streamed.server_timings_ms)


def test_previews_every_m_steps_decode_to_the_latent_size(connect) -> None:
    client = connect("grpc")
    options = GenerateOptions(seed=2, steps=STEPS, cache_mode="bypass")
    _, events = generate_stream(client, "a green heron by a pond", options, preview_every=3)
    progress = [e for e in events if e.event == "progress"]
    with_preview = [e for e in progress if e.preview is not None]
    assert [e.data["step"] for e in with_preview] == [3, 6, 9]
    for event in with_preview:
        assert event.preview.shape == LATENT and event.preview.dtype == np.uint8 and event.preview.std() > 0
    assert all(e.preview is None for e in events if e.event != "progress")


def test_bad_preview_interval_is_a_clear_error(connect) -> None:
    client = connect("grpc")
    with pytest.raises(InferenceServerException) as err:
        generate_stream(client, "a cat", GenerateOptions(steps=STEPS), preview_every=-1)
    assert "PREVIEW_EVERY=-1" in err.value.message()
    assert client.ready()


def test_a_cancelled_stream_admits_nothing_and_the_server_stays_healthy(connect) -> None:
    client = connect("grpc")
    prompt, options = "an isometric diagram of a diesel engine", GenerateOptions(seed=5, steps=30, tenant="cancel")
    seen = []

    def close_after_three_steps(event) -> bool:
        seen.append(event)
        return len(seen) < 4  # the cache event and three progress events, then close the stream

    with pytest.raises(StreamCancelled):
        generate_stream(client, prompt, options, on_event=close_after_three_steps)
    assert _kinds(seen) == ["cache", "progress", "progress", "progress"]
    assert client.ready()
    time.sleep(3)  # had it been admitted, the write-behind queue would have written it by now
    again = client.generate(prompt, options)
    assert not again.cache_hit  # the tenant's partition is still empty
    # and the stream model still serves
    result, events = generate_stream(client, prompt, GenerateOptions(seed=5, steps=4, tenant="cancel"))
    assert _kinds(events)[-1] == "final" and result.image.shape == (64, 64, 3)


def test_eight_streams_and_plain_requests_with_three_cancelled(connect) -> None:
    """8 streams (the stream model's capacity: 2 instances × 4 threads) beside 4 plain requests, all in flight at
    once on separate tenants; 3 streams close after a few steps. The others' images equal their single-request
    images, the cancelled requests leave no entry, the completed ones do."""
    from concurrent.futures import ThreadPoolExecutor

    steps, cancelled = 12, {1, 4, 6}
    jobs = [
        (f"a {animal} in a field of sunflowers", f"load-{i}", 100 + i)
        for i, animal in enumerate(
            ["fox", "owl", "hare", "stag", "wolf", "lynx", "bear", "crow", "mole", "seal", "boar", "wren"]
        )
    ]
    streams, plains = jobs[:8], jobs[8:]
    reference_client = connect("grpc")
    reference = {
        tenant: reference_client.generate(prompt, GenerateOptions(seed=seed, steps=steps, cache_mode="bypass")).image
        for prompt, tenant, seed in jobs
    }

    barrier = threading.Barrier(len(jobs))

    def stream(index: int):
        prompt, tenant, seed = streams[index]
        client = connect("grpc")
        barrier.wait()
        progress = []

        def close_after_four_steps(event) -> bool:
            progress.append(event)
            return index not in cancelled or len(progress) < 5

        try:
            return generate_stream(
                client,
                prompt,
                GenerateOptions(seed=seed, steps=steps, tenant=tenant),
                on_event=close_after_four_steps,
            )[0]
        except StreamCancelled:
            return None

    def plain(index: int):
        prompt, tenant, seed = plains[index]
        client = connect("http")
        barrier.wait()
        return client.generate(prompt, GenerateOptions(seed=seed, steps=steps, tenant=tenant))

    start = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        stream_futures = [pool.submit(stream, i) for i in range(len(streams))]
        plain_futures = [pool.submit(plain, i) for i in range(len(plains))]
        stream_results = [f.result(timeout=300) for f in stream_futures]
        plain_results = [f.result(timeout=300) for f in plain_futures]
    wall_s = time.monotonic() - start

    assert [i for i, r in enumerate(stream_results) if r is None] == sorted(cancelled)
    finished = [(job, r) for job, r in zip(streams, stream_results, strict=True) if r is not None]
    finished += list(zip(plains, plain_results, strict=True))
    for (_, tenant, _), result in finished:
        assert not result.cache_hit
        np.testing.assert_array_equal(result.image, reference[tenant], err_msg=tenant)
    # Server time of the finished requests exceeds the window they ran in: they were executing side by side.
    busy_s = sum(result.server_timings_ms["total_ms"] for _, result in finished) / 1e3
    print(f"\n9 requests finished in {wall_s:.2f} s, {busy_s:.2f} s of server time")
    assert busy_s > wall_s
    assert reference_client.ready()
    time.sleep(3)  # admissions are written behind the response
    for index, (prompt, tenant, seed) in enumerate(streams):
        again = reference_client.generate(prompt, GenerateOptions(seed=seed, steps=steps, tenant=tenant))
        assert again.cache_hit is (index not in cancelled), (tenant, again.cache_hit)
