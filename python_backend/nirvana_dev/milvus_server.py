"""An embedded Milvus 2.3 server (the `milvus` wheel: etcd and local storage in one process, no Docker) for tests
and benchmarks of replicas sharing one cache.

Clients reach it on 127.0.0.1 only, on ports from `free_ports`; Milvus 2.3 has no listen-address setting, so its
gRPC ports listen on all interfaces (its components register as 127.0.0.1), and its embedded etcd's peer port is
2380 (fixed): one such server at a time on a machine. Ready in ≈ 10 s, ≈ 220 MB RSS on a fresh data folder.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from nirvana_dev.install import free_ports

PORT_KEYS = (
    "proxy_port",
    "proxy_internal_port",
    "etcd_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)


class MilvusServerFailed(RuntimeError):
    """The server did not start; the message ends with its log."""


@contextlib.contextmanager
def embedded_milvus_server(data_dir: Path, timeout_s: float = 120) -> Iterator[str]:
    """Start the server with its data under `data_dir`; yields its URI (http://127.0.0.1:port), stops it after."""
    import milvus  # the test/bench extra's wheel; not a serving dependency

    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))
    config = milvus.MilvusServerConfig()
    for component in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode"):
        config.set(f"{component}.ip", "127.0.0.1")  # the address components register and reach each other at
    server = milvus.MilvusServer(config, wait_for_started=False, data_dir=str(data_dir))
    server.config.update(**ports)
    server.start()
    try:
        try:
            server.wait_started(timeout=int(timeout_s * 1000))
        except Exception as err:
            logs = Path(server.config.base_data_dir, "logs", "milvus-stderr.log")
            tail = logs.read_text()[-3000:] if logs.exists() else "no log"
            raise MilvusServerFailed(f"Milvus server did not start in {timeout_s:.0f} s: {tail}") from err
        yield f"http://127.0.0.1:{ports['proxy_port']}"
    finally:
        server.stop()
        shutil.rmtree(Path(server.config.base_data_dir, "bin"), ignore_errors=True)  # ≈ 0.5 GB of unpacked binaries
