"""A real tritonserver (cpu profile, tiny model, milvus-lite) per test module, and clients that get closed."""

from __future__ import annotations

import pytest

from nirvana_client import NirvanaClient
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, make_server, prepare

TEST_INSTANCES = 4


def _start_server(checkpoint_dir, cache_dir, config_file=None) -> dict:
    """Prepare the repository and start tritonserver on free loopback ports; returns {server, options, repo}."""
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(
        cache_dir=cache_dir,
        checkpoint=checkpoint_dir,
        config_file=config_file,
        ports=ServerPorts(http, grpc, metrics),
        ready_timeout_s=180,
        # Several instances, fewer than the default 8: each stub loads torch, and CI starts many servers on 2 cores.
        instances=TEST_INSTANCES,
    )
    repo, _ = prepare(options)
    server = make_server(options, repo)
    server.start()
    server.wait_ready()
    return {"server": server, "options": options, "repo": repo}


@pytest.fixture(scope="session")
def start_server():
    """``start_server(checkpoint_dir, cache_dir, config_file=None)`` for modules that need their own server."""
    return _start_server


@pytest.fixture(scope="module")
def served(tiny_checkpoint_dir, tmp_path_factory):
    """A running server; yields (server, options). Tests may restart it through `restart`."""
    state = _start_server(tiny_checkpoint_dir, tmp_path_factory.mktemp("serve"))
    yield state
    state["server"].stop()


@pytest.fixture
def connect(served):
    """Client factory; every client is closed at teardown (an open HTTP connection delays Triton's shutdown)."""
    made: list[NirvanaClient] = []

    def make(protocol: str) -> NirvanaClient:
        urls = served["server"].urls
        made.append(NirvanaClient(urls.grpc if protocol == "grpc" else urls.http, protocol))
        return made[-1]

    yield make
    for client in made:
        client.close()
