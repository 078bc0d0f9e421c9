"""Where a tritonserver lives and what it needs to run python models: the pytriton wheel's copy (no Docker).

The `nvidia-pytriton` wheel ships a complete Triton 2.51 server with the python backend and one python backend
stub per Python version. The recipe: a writable copy of the server folder with this Python's stub in
`backends/python/`, the wheel's libraries and this Python's LIBDIR on `LD_LIBRARY_PATH`, and this venv's `bin`
first on `PATH` (the stub ignores PYTHONPATH and finds packages through the first `python3` on PATH).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import sysconfig
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nirvana.threads import THREAD_POLICY_ENV

STUB_NAME = "triton_python_backend_stub"
_COPY_MARKER = ".nirvana-server-copy"


class TritonServerError(RuntimeError):
    """The server could not be found, started, made ready or stopped; the message says which and why."""


@dataclass(frozen=True)
class ServerPorts:
    """TCP ports of the three Triton endpoints."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver installation.

    `root` holds `bin/tritonserver` and `backends/` and may be read-only. `stub` is the python backend stub that
    must be copied into `backends/python/` before the server can run python models (None: the installation
    already has it and runs in place, as `/opt/tritonserver` in the NGC image does). `lib_dirs` go first on
    `LD_LIBRARY_PATH`.
    """

    root: Path
    stub: Path | None = None
    lib_dirs: tuple[Path, ...] = ()


def free_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    """Return `n` distinct ports that were free on `host` a moment ago (Triton rejects port 0, so we choose)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in sockets:  # all bound at once, so the ports are distinct
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def find_tritonserver(path: Path | str | None = None, *, python_version: str | None = None) -> TritonInstall:
    """Locate a tritonserver: the folder at `path` (e.g. /opt/tritonserver), else the one in the pytriton wheel.

    `python_version` ("3.11") picks the wheel's stub; by default the running interpreter's, because the stub
    embeds that Python and imports packages from the venv whose `python3` is first on PATH.
    """
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    if path is not None:
        return _install_at(Path(path), version)
    spec = importlib.util.find_spec("pytriton")  # finds the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "tritonserver not found: the nvidia-pytriton wheel is not installed in this Python "
            f"({sys.executable}); `pip install nvidia-pytriton==0.7.0`, or pass the path of a tritonserver folder"
        )
    return _install_at(Path(next(iter(spec.submodule_search_locations))) / "tritonserver", version)


def _install_at(root: Path, version: str) -> TritonInstall:
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"not a tritonserver folder: {root}/bin/tritonserver does not exist")
    # The pytriton wheel keeps the server's libraries beside its package (without them it exits 127 at once);
    # a regular install keeps them in lib/.
    candidates = (root.parent.parent / "nvidia_pytriton.libs", root / "lib")
    lib_dirs = tuple(p for p in candidates if p.is_dir())
    if (root / "backends" / "python" / STUB_NAME).is_file() or not (root / "python_backend_stubs").is_dir():
        return TritonInstall(root=root, stub=None, lib_dirs=lib_dirs)
    stub = root / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        shipped = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise TritonServerError(f"no python backend stub for Python {version} in {root} (it ships {shipped})")
    return TritonInstall(root=root, stub=stub, lib_dirs=lib_dirs)


def prepare_server_dir(install: TritonInstall, work_dir: Path) -> Path:
    """Return a server folder that can run python models: `install.root` itself, or a copy under `work_dir`.

    The copy (≈ 25 MB) is made once and reused; it is built under a temporary name and renamed so that a copy
    interrupted halfway is never mistaken for a complete one.
    """
    if install.stub is None:
        return install.root
    target = work_dir / "tritonserver"
    identity = f"{install.root}\n{install.stub}\n"
    marker = target / _COPY_MARKER
    if marker.is_file() and marker.read_text() == identity:
        return target
    staging = work_dir / f".tritonserver-{uuid.uuid4().hex}"
    try:
        shutil.copytree(install.root, staging, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        stub_copy = staging / "backends" / "python" / STUB_NAME
        shutil.copy2(install.stub, stub_copy)
        stub_copy.chmod(0o755)
        (staging / _COPY_MARKER).write_text(identity)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def child_env(
    install: TritonInstall, base: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of the server and its stubs, built from `base` (the caller's os.environ)."""
    env = dict(base)
    libdir = sysconfig.get_config_var("LIBDIR")  # the stub must load this Python's libpython, not another build
    lib_path = [str(p) for p in install.lib_dirs] + ([libdir] if libdir else [])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*lib_path, *filter(None, [base.get("LD_LIBRARY_PATH")])])
    # The stub ignores PYTHONPATH: it finds packages through the first `python3` on PATH and its pyvenv.cfg.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *filter(None, [base.get("PATH")])])
    env.update(THREAD_POLICY_ENV)  # several stubs share few cores: no spinning OpenMP threads
    env.update(overrides or {})
    return env
