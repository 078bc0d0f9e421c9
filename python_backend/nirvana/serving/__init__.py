"""Serving: run the real Triton Inference Server (tritonserver) as a managed child process."""

from nirvana.serving.tritonserver import (
    ServerPorts,
    ServerUrls,
    TritonInstall,
    TritonServer,
    TritonServerError,
    find_tritonserver,
    free_ports,
    serve_forever,
)

__all__ = [
    "ServerPorts",
    "ServerUrls",
    "TritonInstall",
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "free_ports",
    "serve_forever",
]
