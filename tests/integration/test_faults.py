"""Faults against the real server: Milvus unreachable, and SIGKILL in the middle of admissions."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests

from nirvana.cache.index import MilvusIndex
from nirvana.cache.latents import LatentStore
from nirvana.cache.records import blob_key
from nirvana_client import GenerateOptions, NirvanaClient
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, make_server, prepare

pytestmark = pytest.mark.integration


def _options(tmp_path, checkpoint, **overrides) -> ServeOptions:
    return ServeOptions(
        cache_dir=tmp_path,
        checkpoint=checkpoint,
        ports=ServerPorts(*free_ports(3)),
        ready_timeout_s=180,
        instances=2,  # one client at a time in these tests; each instance's stub loads torch
        **overrides,
    )


def test_unreachable_milvus_serves_uncached(tiny_checkpoint_dir, tmp_path) -> None:
    config_file = tmp_path / "engine.json"
    config_file.write_text(json.dumps({"cache": {"rpc_timeout_s": 1.0, "reconnect_interval_s": 1.0}}))
    options = _options(
        tmp_path, tiny_checkpoint_dir, milvus_uri=f"http://127.0.0.1:{free_ports(1)[0]}", config_file=config_file
    )
    repo, _ = prepare(options)
    with make_server(options, repo) as server:
        client = NirvanaClient(server.urls.grpc, "grpc")
        for _ in range(2):
            res = client.generate("a red fox in the snow", GenerateOptions(steps=6))
            assert not res.cache_hit and res.image.shape == (64, 64, 3)
        client.close()
        metrics = requests.get(server.urls.metrics, timeout=10).text
        assert "nirvana_cache_available 0" in metrics and "nirvana_cache_unavailable_total 2" in metrics
        assert "serving uncached" in server.log_path.read_text()


def _consistency(engine) -> tuple[int, int]:
    """(entries whose blob is missing, blobs no entry refers to), read straight from Milvus and the directory."""
    deadline = time.monotonic() + 60
    while True:  # the stopped server's milvus-lite process may hold the file lock for a moment
        try:
            index = MilvusIndex(engine.cache.resolved_milvus_uri, engine.cache.collection, 384)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    records = list(index.load_all())
    index.close()
    store = LatentStore(engine.cache.latent_dir)
    keys = set(store.keys())
    wanted = {blob_key(r.id, k) for r in records for k in r.entries}
    return len(wanted - keys), len(keys - wanted)


def test_sigkill_during_admission_is_reconciled_on_restart(tiny_checkpoint_dir, tmp_path) -> None:
    options = _options(tmp_path, tiny_checkpoint_dir)
    repo, engine = prepare(options)
    server = make_server(options, repo)
    server.start()
    server.wait_ready()
    done, stop = [], threading.Event()

    def load() -> None:  # bounded: at most 40 misses, each admitting 5 latents
        client = NirvanaClient(server.urls.grpc, "grpc", timeout_s=30)
        for i in range(40):
            if stop.is_set():
                break
            try:
                client.generate(
                    f"distinct prompt number {i} about {np.random.default_rng(i).integers(1e9)}",
                    GenerateOptions(steps=6, seed=i),
                )
                done.append(i)
            except Exception:
                break
        client.close()

    worker = threading.Thread(target=load)
    worker.start()
    deadline = time.monotonic() + 120
    while len(done) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGKILL)  # the whole group: server, stubs, milvus-lite
    stop.set()
    worker.join(60)
    server.stop()  # reaps, removes leftover stubs and shm regions
    assert len(done) >= 5
    restarted = make_server(options, repo)
    with restarted:
        client = NirvanaClient(restarted.urls.grpc, "grpc")
        assert client.generate("distinct prompt number 0 about nothing", GenerateOptions(steps=6)).image.size
        client.close()
        log_text = restarted.log_path.read_text()
    assert _consistency(engine) == (0, 0)  # after a clean stop: no dangling vectors, no orphan blobs
    print(
        f"\ncompleted before SIGKILL: {len(done)}; startup log: "
        f"{[line for line in log_text.splitlines() if 'reconciled' in line or 'cache open' in line]}"
    )
