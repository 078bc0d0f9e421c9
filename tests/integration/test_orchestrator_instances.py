"""N `nirvana` instances and one `cache` model: requests run at once, and nothing about them changes.

8 concurrent requests overlap in execution, each image equals its single-request image; hits, misses and K under
concurrent load equal a sequential replay of the same requests; the hit counters summed by Triton over the instances
and the LCBFU counts the cache model stores in Milvus both equal the hits the clients saw.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time

import numpy as np
import pytest
import requests

from nirvana.cache.factory import open_cache
from nirvana.config import load_config
from nirvana_client import GenerateOptions

pytestmark = pytest.mark.integration
IN_FLIGHT, STEPS = 8, 8
WARM = [f"a {c} paper boat on a quiet pond, watercolor" for c in ("red", "yellow", "blue")]
VARIANTS = ["{}", "watercolor: {}", "{}, soft light"]


def _metrics(served) -> dict[str, float]:
    """Every series of /metrics as 'name{labels}' → value."""
    text = requests.get(served["server"].urls.metrics, timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def _exec_counts(values: dict[str, float], model: str) -> tuple[float, float]:
    """(inference rows, executions) Triton counted for `model`."""
    rows = sum(v for k, v in values.items() if k.startswith("nv_inference_count{") and f'model="{model}"' in k)
    runs = sum(v for k, v in values.items() if k.startswith("nv_inference_exec_count{") and f'model="{model}"' in k)
    return rows, runs


def _run_at_once(clients, work: list[tuple[str, GenerateOptions]]) -> tuple[list, float]:
    """All of `work` at once, one client per request; returns (results in order, wall seconds)."""
    barrier = threading.Barrier(len(work))

    def send(index: int):
        barrier.wait()
        return clients[index].generate(*work[index])

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(send, range(len(work)), timeout=600))
    return results, time.monotonic() - start


def test_eight_requests_overlap_and_each_gets_its_single_request_image(served, connect) -> None:
    client = connect("grpc")
    options = [GenerateOptions(seed=i, steps=STEPS, cache_mode="bypass") for i in range(IN_FLIGHT)]
    work = [(f"a paper lantern number {i} at night", o) for i, o in enumerate(options)]
    client.generate(*work[0])  # warm every path once
    start = time.monotonic()
    alone = [client.generate(*w) for w in work]
    sequential_s = time.monotonic() - start
    clients = [connect("grpc" if i % 2 else "http") for i in range(IN_FLIGHT)]
    before = _metrics(served)
    together, wall_s = _run_at_once(clients, work)
    after = _metrics(served)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    # Each request's server-side time lies inside the clients' wall-clock window: when they add up to more than
    # the window, at least two requests were executing at the same time.
    busy_s = sum(r.server_timings_ms["total_ms"] for r in together) / 1e3
    rows, runs = (a - b for a, b in zip(_exec_counts(after, "unet"), _exec_counts(before, "unet"), strict=True))
    print(
        f"\n{IN_FLIGHT} requests: one at a time {IN_FLIGHT / sequential_s:.2f} images/s, all at once "
        f"{IN_FLIGHT / wall_s:.2f} images/s; server busy {busy_s:.2f} s in a {wall_s:.2f} s window "
        f"(mean {busy_s / wall_s:.2f} in execution); unet rows per execution {rows / max(runs, 1):.2f}"
    )
    assert busy_s > wall_s
    # Each instance is its own process: a UNet step learnt at more than one request in flight means the
    # instances saw each other's requests on the load board.
    shared = {k: v for k, v in after.items() if k.startswith("nirvana_unet_step_ms{")}
    assert any('requests="1"' not in k and v > 0 for k, v in shared.items()), shared
    assert all("predicted_total_ms" in r.server_timings_ms for r in together)  # learnt while warming
    predictions = after["nirvana_prediction_error_ratio_count"] - before["nirvana_prediction_error_ratio_count"]
    assert predictions == IN_FLIGHT
    assert after["nirvana_predicted_drain_ms"] >= 0


def _workload(tenant: str, scratch: str) -> list[tuple[str, GenerateOptions]]:
    """Hits on the warmed prompts of `tenant` (their outcome does not depend on order: hits admit nothing) and
    misses in tenants of their own (nothing they admit can serve another request)."""
    out = []
    for i in range(2 * IN_FLIGHT):
        if i % 4 == 3:
            out.append((f"an unrelated request {i}", GenerateOptions(seed=i, steps=STEPS, tenant=f"{scratch}-{i}")))
        else:
            prompt = VARIANTS[i % len(VARIANTS)].format(WARM[i % len(WARM)])
            out.append((prompt, GenerateOptions(seed=i % len(WARM), steps=STEPS, tenant=tenant)))
    return out


def _outcome(result) -> tuple[bool, int, float | None]:
    """Hit, K and similarity (None when no search ran: NaN never equals itself)."""
    similarity = None if math.isnan(result.similarity) else round(result.similarity, 5)
    return result.cache_hit, result.skipped_steps, similarity


def _warm(client, tenant: str) -> None:
    for seed, prompt in enumerate(WARM):
        client.generate(prompt, GenerateOptions(seed=seed, steps=STEPS, tenant=tenant, cache_mode="refresh"))


def test_a_request_whose_client_gives_up_does_not_disturb_the_others(served, connect) -> None:
    """A client deadline that expires mid-request (gRPC DEADLINE_EXCEEDED): the requests in flight beside it still
    get their single-request images, and the server answers afterwards."""
    from tritonclient.utils import InferenceServerException

    from nirvana_client import NirvanaClient

    urls = served["server"].urls
    work = [(f"a glass teapot number {i} on a shelf", GenerateOptions(seed=i, steps=STEPS, cache_mode="bypass"))
            for i in range(3)]  # fmt: skip
    alone = [connect("grpc").generate(*w).image for w in work]
    impatient = NirvanaClient(urls.grpc, "grpc", timeout_s=0.05)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            gave_up = pool.submit(impatient.generate, "a clock that is always late", GenerateOptions(steps=STEPS))
            others = [pool.submit(connect("grpc").generate, *w) for w in work]
            with pytest.raises(InferenceServerException, match=r"(?i)deadline"):
                gave_up.result(timeout=120)
            images = [f.result(timeout=600).image for f in others]
    finally:
        impatient.close()
    for image, reference in zip(images, alone, strict=True):
        np.testing.assert_array_equal(image, reference)
    assert connect("http").generate("after the timeout", GenerateOptions(steps=STEPS)).image.std() > 0


def test_concurrent_outcomes_equal_a_sequential_replay_and_every_hit_is_counted(served, connect) -> None:
    client = connect("grpc")
    _warm(client, "replayed")
    replay = [client.generate(*w) for w in _workload("replayed", "replay-miss")]
    _warm(client, "concurrent")
    clients = [connect("grpc" if i % 2 else "http") for i in range(2 * IN_FLIGHT)]
    hits_before = _metrics(served)["nirvana_cache_hits_total"]
    together, _ = _run_at_once(clients, _workload("concurrent", "concurrent-miss"))
    hits_counted = _metrics(served)["nirvana_cache_hits_total"] - hits_before
    assert [_outcome(r) for r in together] == [_outcome(r) for r in replay]
    for a, b in zip(replay, together, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    hits = sum(r.cache_hit for r in together)
    assert hits >= IN_FLIGHT  # the workload is mostly hits: the comparison above means something
    assert hits_counted == hits  # summed by Triton over the instances' counters

    served["server"].stop()  # clean stop: the cache model's finalize flushes the LCBFU counts
    engine = load_config(path=served["repo"] / "nirvana" / "engine.json")
    cache = open_cache(engine.cache.model_copy(update={"reconnect_interval_s": 0.2}), 384)
    deadline = time.monotonic() + 60
    while not cache.available and time.monotonic() < deadline:  # milvus-lite may hold its lock for a moment
        time.sleep(0.2)
    assert cache.available
    stored = {
        tenant: sum(e.hits for r in cache.mirror.records() if r.tenant == tenant for e in r.entries.values())
        for tenant in ("replayed", "concurrent")
    }
    cache.close()
    assert stored == {"replayed": sum(r.cache_hit for r in replay), "concurrent": hits}
