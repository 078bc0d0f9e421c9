"""Two `nirvana serve` replicas share one cache: one Milvus server and one latent directory.

A prompt admitted through replica A is a hit through replica B; concurrent hits on both replicas on one entry are
all counted in Milvus (per-replica counts, merged at flush). The Milvus server is the embedded Milvus 2.3.5 server
of the `milvus` wheel (`nirvana_dev.milvus_server`: one process, no Docker, on loopback ports from free_ports).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid

import numpy as np
import pytest
import requests

from nirvana.cache.factory import open_cache
from nirvana.cache.index import MilvusIndex
from nirvana.cache.manager import ApproximateCache
from nirvana.config import CacheConfig, PredictorConfig
from nirvana_client import GenerateOptions, NirvanaClient
from nirvana_dev.bench.replicas_scale import run_replicas
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, prepare
from nirvana_dev.milvus_server import MilvusServerFailed, embedded_milvus_server
from nirvana_dev.tritonserver import TritonServer

pytestmark = pytest.mark.integration
milvus = pytest.importorskip("milvus", reason="needs the embedded Milvus server wheel: pip install milvus==2.3.5")

STEPS = 10
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
CLIENTS_PER_REPLICA, HITS_PER_CLIENT = 2, 4
DIM, RACE_HITS = 16, 150


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    """A Milvus server for this module, its data under a temporary folder."""
    started = time.monotonic()
    try:
        with embedded_milvus_server(tmp_path_factory.mktemp("milvus")) as uri:
            print(f"\nMilvus {milvus.__version__} server ready in {time.monotonic() - started:.1f} s")
            yield uri
    except MilvusServerFailed as err:
        pytest.fail(str(err))


def _metric(server: TritonServer, name: str) -> float:
    text = requests.get(server.urls.metrics, timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name]
    assert values, f"{name} not on {server.urls.metrics}"
    return values[0]


def _wait_for_entries(server: TritonServer, client: NirvanaClient, want: int, timeout_s: float = 60) -> None:
    """Until the replica's mirror holds `want` entries; a bypass request refreshes its gauges without touching
    the cache."""
    deadline = time.monotonic() + timeout_s
    while True:
        client.generate("warm-up, not cached", GenerateOptions(steps=2, cache_mode="bypass"))
        if _metric(server, "nirvana_cache_entries") >= want:
            return
        assert time.monotonic() < deadline, f"replica still holds {_metric(server, 'nirvana_cache_entries')} entries"
        time.sleep(0.5)


def test_two_replicas_share_one_cache(tiny_checkpoint_dir, tmp_path, milvus_uri) -> None:
    config_file = tmp_path / "engine.json"
    config_file.write_text(json.dumps({"cache": {"flush_interval_s": 0.5, "refresh_interval_s": 0.5}}))
    # One model repository and one cache dir (latents) for both; each server its own ports and work dir.
    options = ServeOptions(
        cache_dir=tmp_path / "shared",
        checkpoint=tiny_checkpoint_dir,
        milvus_uri=milvus_uri,
        config_file=config_file,
        instances=2,  # two servers on 2 cores: each stub loads torch
    )
    repo, engine = prepare(options)
    servers = [
        TritonServer(repo, ServerPorts(*free_ports(3)), work_dir=tmp_path / name, ready_timeout_s=180)
        for name in ("replica-a", "replica-b")
    ]
    a, b = servers
    clients: list[NirvanaClient] = []
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        on_a, on_b = NirvanaClient(a.urls.grpc, "grpc"), NirvanaClient(b.urls.grpc, "grpc")
        clients += [on_a, on_b]

        admitted = on_a.generate(PROMPT, GenerateOptions(seed=1, steps=STEPS))
        assert not admitted.cache_hit
        # Admission is written behind the response: wait for A's writer, then for A's flush and B's refresh.
        _wait_for_entries(a, on_a, 1)
        entries = _metric(a, "nirvana_cache_entries")
        _wait_for_entries(b, on_b, entries)

        hit = on_b.generate(PROMPT, GenerateOptions(seed=1, steps=STEPS))
        assert hit.cache_hit and hit.skipped_steps > 0 and hit.similarity > 0.99
        assert _metric(b, "nirvana_cache_hits_total") == 1 and _metric(b, "nirvana_cache_misses_total") == 0

        # Concurrent hits on one entry, through both replicas at once.
        pool_clients = [NirvanaClient(s.urls.grpc, "grpc") for s in servers for _ in range(CLIENTS_PER_REPLICA)]
        clients += pool_clients

        def run(client: NirvanaClient) -> list[bool]:
            return [
                client.generate(PROMPT, GenerateOptions(seed=1, steps=STEPS)).cache_hit for _ in range(HITS_PER_CLIENT)
            ]

        with concurrent.futures.ThreadPoolExecutor(len(pool_clients)) as pool:
            outcomes = list(pool.map(run, pool_clients, timeout=600))
        assert all(all(o) for o in outcomes)
        hits_a, hits_b = _metric(a, "nirvana_cache_hits_total"), _metric(b, "nirvana_cache_hits_total")
        assert (hits_a, hits_b) == (CLIENTS_PER_REPLICA * HITS_PER_CLIENT, 1 + CLIENTS_PER_REPLICA * HITS_PER_CLIENT)
    finally:
        for client in clients:
            client.close()
        for server in servers:  # clean stops, one after the other: each flushes its counts at finalize
            server.stop()

    from pymilvus import MilvusClient

    store = MilvusClient(milvus_uri)
    (row,) = store.query(
        engine.cache.collection,
        filter=f'prompt == "{PROMPT}"',
        output_fields=["hits", "entries"],
        consistency_level="Strong",
    )
    store.close()
    k = str(hit.skipped_steps)
    per_replica = row["entries"][k]["replica_hits"]
    print(f"\nobserved hits A={hits_a:.0f} B={hits_b:.0f}; stored in Milvus for K={k}: {per_replica}")
    assert row["hits"] == row["entries"][k]["hits"] == hits_a + hits_b
    assert sorted(per_replica.values()) == sorted([hits_a, hits_b])


def test_racing_flushes_converge_to_every_hit(tmp_path, milvus_uri) -> None:
    """Two caches hammer one entry with a 50 ms flush and a 200 ms refresh, so their flushes of the row overlap
    (each a Strong read then an upsert): a count overwritten by the other replica's flush is rewritten at the
    owner's next refresh, and after both close Milvus holds every hit."""
    config = CacheConfig(
        dir=tmp_path / "cache",
        milvus_uri=milvus_uri,
        collection=f"race_{uuid.uuid4().hex}",
        flush_interval_s=0.05,
        refresh_interval_s=0.2,
        predictor=PredictorConfig(enabled=False),
    )
    vector = np.eye(DIM, dtype=np.float32)[0]
    states = {k: {"latent": np.zeros((1, 4, 8, 8), np.float32)} for k in (5, 25)}
    a = open_cache(config.model_copy(update={"replica_id": "a"}), DIM)
    b = open_cache(config.model_copy(update={"replica_id": "b"}), DIM)
    rewritten = {"a": 0, "b": 0}
    for cache in (a, b):  # count what each replica's background refresh writes back
        refresh = cache.replicas.refresh

        def counted(index, refresh=refresh, name=cache.replica) -> dict[str, int]:
            counts = refresh(index)
            rewritten[name] += counts.get("rewritten", 0)
            return counts

        cache.replicas.refresh = counted
    try:
        a.admit(PROMPT, vector, "key", "t", states)
        deadline = time.monotonic() + 30
        while b.record("key", "t", PROMPT) is None:  # A's flush, then B's refresh
            assert time.monotonic() < deadline
            time.sleep(0.05)

        def hammer(cache: ApproximateCache) -> int:
            return sum(cache.lookup(vector, "key", "t", 50).hit for _ in range(RACE_HITS))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            hits = list(pool.map(hammer, [a, b, a, b], timeout=300))
    finally:
        a.close()  # one after the other, as replicas stop in a rolling update
        b.close()
    assert hits == [RACE_HITS] * 4
    check = MilvusIndex(milvus_uri, config.collection, DIM, flush_interval_s=3600)
    (row,) = list(check.load_all())
    check.close()
    print(f"\n{4 * RACE_HITS} hits; stored {row.entries[25].replica_hits}; rows rewritten after a race: {rewritten}")
    assert row.entries[25].replica_hits == {"a": 2 * RACE_HITS, "b": 2 * RACE_HITS}


def test_four_replica_processes_count_every_hit(tmp_path, milvus_uri) -> None:
    """`nirvana bench replicas` on this module's server: what one replica admits reaches the other three through
    their refresh, and after concurrent hits from all four and a rolling stop Milvus holds exactly the hits counted."""
    report = run_replicas(replicas=4, prompts=200, hits=100, dim=DIM, work_dir=tmp_path, milvus_uri=milvus_uri)
    assert [r["entries"] for r in report["replicas"]] == [200] * 4
    assert report["hits_counted"] == 400 and report["hits_stored"] == 400
    assert report["count_error"] == {"total": 0, "max_per_entry": 0}
    assert report["new_replica_entries"] == 200


def test_a_new_replica_takes_vectors_from_the_shared_snapshot(tmp_path, milvus_uri, monkeypatch) -> None:
    """Replica A closes (writing the mirror snapshot beside the shared latents); replica B, opened after, reads
    no vector from the Milvus server and finds A's prompts."""
    config = CacheConfig(
        dir=tmp_path / "cache",
        milvus_uri=milvus_uri,
        collection=f"snap_{uuid.uuid4().hex}",
        predictor=PredictorConfig(enabled=False),
    )
    vectors = np.eye(DIM, dtype=np.float32)
    states = {25: {"latent": np.ones((1, 4, 8, 8), np.float32)}}
    a = open_cache(config.model_copy(update={"replica_id": "a"}), DIM)
    for i in range(8):
        a.admit(f"prompt {i}", vectors[i], "key", "t", states)
    a.close()

    def no_vectors(self, ids):
        raise AssertionError(f"vectors of {list(ids)} read from the Milvus server")

    monkeypatch.setattr(MilvusIndex, "fetch_vectors", no_vectors)
    b = open_cache(config.model_copy(update={"replica_id": "b"}), DIM)
    try:
        assert len(b) == 8
        assert all(b.lookup(vectors[i], "key", "t", 50).matched_prompt == f"prompt {i}" for i in range(8))
    finally:
        b.close()
