"""Overload is rejected at the queue with a clear error; the server stays ready and answers afterwards."""

from __future__ import annotations

import concurrent.futures

import pytest
from tritonclient.utils import InferenceServerException

from nirvana_client import GenerateOptions, NirvanaClient
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, make_server, prepare

pytestmark = pytest.mark.integration


def test_queue_limit_rejects_overload(tiny_checkpoint_dir, tmp_path) -> None:
    options = ServeOptions(
        cache_dir=tmp_path,
        checkpoint=tiny_checkpoint_dir,
        ports=ServerPorts(*free_ports(3)),
        max_queue_size=2,
        instances=4,  # fewer than the default 8: 4 execute, 2 wait, the rest of 12 are rejected
    )
    repo, _ = prepare(options)
    with make_server(options, repo) as server:
        clients = [NirvanaClient(server.urls.grpc, "grpc") for _ in range(12)]

        def send(i: int) -> str:
            try:
                clients[i].generate(f"an overloaded request {i}", GenerateOptions(steps=30, cache_mode="bypass"))
                return "ok"
            except InferenceServerException as err:
                return err.message()

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(send, range(12), timeout=600))
        rejected = [o for o in outcomes if o != "ok"]
        assert rejected and all("queue" in o.lower() for o in rejected), outcomes
        assert outcomes.count("ok") >= 2
        assert clients[0].ready()
        assert clients[0].generate("after the storm", GenerateOptions(steps=4)).image.size
        for client in clients:
            client.close()
