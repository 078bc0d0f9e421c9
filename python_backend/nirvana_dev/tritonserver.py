"""Run the real `tritonserver` binary as a managed child process (no Docker).

`TritonServer` turns the recipe in `nirvana_dev.install` into a process: free loopback ports checked first, a
bounded wait for READY that shows the server's own errors, a stop that leaves no stub process or `/dev/shm`
region behind, and a server that dies with its launcher (`PR_SET_PDEATHSIG`): a launcher killed by SIGKILL (the
OOM killer) must not leave a server holding the ports and the milvus-lite file.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from nirvana.service_time import BOARD_ENV
from nirvana_dev.install import (
    ServerPorts,
    TritonInstall,
    TritonServerError,
    child_env,
    find_tritonserver,
    prepare_server_dir,
)
from nirvana_dev.processes import SHM_DIR, mapped_shm_regions, server_processes, shm_regions, tail

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 60
# glog error lines ("E1127 13:13:12.264 ...") and the final "error: creating server: ..." line.
_ERROR_LINE = re.compile(r"^(E\d{4} |error: )")
_CPU_NOISE = "CudaDriverHelper has not been initialized"  # logged as an error on every machine without a GPU
_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Resolved before any fork: the child may only call it (no dlopen between fork and exec).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _check_cpus(cpus: Sequence[int] | None) -> frozenset[int] | None:
    """`cpus` as a set, refused at once (not in the child) when it names a core this process may not use."""
    if cpus is None:
        return None
    allowed = os.sched_getaffinity(0)
    wanted = frozenset(int(c) for c in cpus)
    if not wanted or not wanted <= allowed:
        raise TritonServerError(f"cpus={sorted(wanted)}: must be a non-empty subset of the usable {sorted(allowed)}")
    return wanted


def _die_with_parent(parent_pid: int, cpus: frozenset[int] | None = None) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive SIGTERM when the launcher dies (as pytriton does for its server),
    and confines it to `cpus` when given (its stubs and milvus-lite inherit that).

    SIGTERM rather than SIGKILL: Triton then unloads its models, so `finalize` flushes the cache and stops
    milvus-lite, and the stubs exit with it. The signal is tied to the launching *thread*: start the server from
    a thread that lives as long as the launcher (the main thread in `nirvana serve`).
    """

    def set_death_signal() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the launcher died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return set_death_signal


@dataclass(frozen=True)
class ServerUrls:
    """Where clients reach a server: `http`/`grpc` as "host:port" (tritonclient's form), `metrics` as a full URL."""

    http: str
    grpc: str
    metrics: str


def _client_host(host: str) -> str:
    """A wildcard bind address is not something to connect to; loopback reaches the same server."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _check_ports_free(host: str, ports: ServerPorts) -> None:
    """Fail fast on a busy port; otherwise a foreign server on it could even answer our readiness probe."""
    for name, port in (("http", ports.http), ("grpc", ports.grpc), ("metrics", ports.metrics)):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                sock.bind((host, port))
            except OSError as exc:
                msg = f"cannot start tritonserver: {name} port {host}:{port} is in use ({exc})"
                raise TritonServerError(msg) from exc


class TritonServer:
    """One tritonserver child process serving `model_repository` on `host`:`ports`.

    `env` entries override the environment built for the child; `extra_args` come last on the command line, so
    they can override the defaults (e.g. `--cuda-memory-pool-byte-size=0:268435456` on a GPU).
    Use as a context manager (start, wait for READY, stop), or call `start`/`wait_ready`/`stop`.
    """

    def __init__(
        self,
        model_repository: Path,
        ports: ServerPorts,
        *,
        host: str = "127.0.0.1",
        work_dir: Path,
        install: TritonInstall | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        cpus: Sequence[int] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports
        self.host = host
        self.work_dir = Path(work_dir).resolve()
        self.install = install
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.cpus = _check_cpus(cpus)
        self.log_path = self.work_dir / "tritonserver.log"
        self.returncode: int | None = None
        self.removed_shm_regions = 0  # set by stop(): leftover regions of this server that it removed
        self._process: subprocess.Popen | None = None
        self._shm_before: set[str] = set()

    @property
    def pid(self) -> int | None:
        """Process id of the running server (also its process group id), None when not running."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def urls(self) -> ServerUrls:
        host = _client_host(self.host)
        host = f"[{host}]" if ":" in host else host
        return ServerUrls(
            http=f"{host}:{self.ports.http}",
            grpc=f"{host}:{self.ports.grpc}",
            metrics=f"http://{host}:{self.ports.metrics}/metrics",
        )

    def command(self, server_dir: Path) -> list[str]:
        """The server's command line."""
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={server_dir / 'backends'}",
            *(f"--{name}-address={self.host}" for name in ("http", "grpc", "metrics")),
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            # No pinned or CUDA pools: nothing to pin on CPU; a GPU deployment overrides these via extra_args.
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            # A model that fails to load stops the server, so wait_ready reports its error instead of waiting.
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Our configs state inputs and outputs explicitly; auto-complete would start one more stub per
            # python model just to ask it (start to READY 1.6 s instead of 0.4 s for one model).
            "--disable-auto-complete-config",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Launch the server (returns at once; call `wait_ready`). Its output goes to `log_path`."""
        if self.running:
            raise TritonServerError(f"tritonserver already running (pid {self.pid})")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        _check_ports_free(self.host, self.ports)
        install = self.install or find_tritonserver()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        server_dir = prepare_server_dir(install, self.work_dir)
        self._shm_before = shm_regions()
        self.returncode = None
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                self.command(server_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=child_env(install, os.environ, self._child_variables()),
                start_new_session=True,  # its own group: stop() signals the server and its stubs together
                preexec_fn=_die_with_parent(os.getpid(), self.cpus),
            )
        log.info("tritonserver started (pid %d), http %s, log %s", self._process.pid, self.urls.http, self.log_path)

    def _child_variables(self) -> dict[str, str]:
        # the orchestrators' load board lives and goes with this server's work directory; the `adapters` model
        # loads LoRA sets' UNet models through this server's own gRPC endpoint
        own = {BOARD_ENV: str(self.work_dir / "load-board")}
        if self.cpus:  # thread pools sized to the cores it may use (torch and OpenMP read these at start)
            own |= {name: str(len(self.cpus)) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        return {**own, **self.env}

    def wait_ready(self, timeout_s: float | None = None, *, cancel: threading.Event | None = None) -> None:
        """Block until GET /v2/health/ready answers 200 (all models loaded, strict readiness).

        Raises TritonServerError with the server's error lines and log tail if it exits first, if `timeout_s`
        (default `ready_timeout_s`) passes, or if `cancel` is set. A python stub that cannot load its libraries
        makes model loading hang rather than fail, so the timeout is what ends that case.
        """
        if self._process is None:
            raise TritonServerError("tritonserver was not started")
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready{self._log_report()}")
            if cancel is not None and cancel.is_set():
                raise TritonServerError("stop requested while waiting for tritonserver to become ready")
            if self._health_ready() and self._process.poll() is None:
                log.info("tritonserver ready after %.1f s", time.monotonic() - started)
                return
            if time.monotonic() - started > timeout_s:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout_s:.0f} s (a model still loading, or a python stub that "
                    f"cannot load its libraries){self._log_report()}"
                )
            time.sleep(_POLL_S)

    def _health_ready(self) -> bool:
        # http.client, not urllib: urllib would send loopback traffic through any configured HTTP proxy.
        conn = http.client.HTTPConnection(_client_host(self.host), self.ports.http, timeout=1.0)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stop the server and return its exit code (0 if never started). Safe to call again.

        SIGTERM goes to the server process only: Triton then unloads every model, so each python model's
        `finalize` runs while the helpers it started (e.g. a milvus-lite server flushing the cache) are still
        alive; signalling the whole group would kill those first and hang that finalize. After `timeout_s` the
        whole group gets SIGKILL.
        Stubs left over (e.g. after a crash) are killed, and python-backend `/dev/shm` regions that appeared
        since `start` and that no live process maps any more are removed; `removed_shm_regions` counts them.
        """
        process = self._process
        if process is None:
            return self.returncode if self.returncode is not None else 0
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, timeout_s)
                self._signal_group(signal.SIGKILL)
                process.wait()
        self._kill_leftovers(process.pid)
        self.removed_shm_regions = self._remove_leftover_shm()
        self.returncode = process.returncode
        self._process = None
        log.info(
            "tritonserver (pid %d) stopped with code %d; removed %d leftover shm regions",
            process.pid,
            self.returncode,
            self.removed_shm_regions,
        )
        return self.returncode

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    @staticmethod
    def _kill_leftovers(server_pid: int, timeout_s: float = 5.0) -> None:
        """SIGKILL whatever of the server's group or stubs outlived it; they are not our children to wait for."""
        deadline = time.monotonic() + timeout_s
        while pids := server_processes(server_pid):
            if time.monotonic() > deadline:
                raise TritonServerError(f"processes of tritonserver {server_pid} survive SIGKILL: {pids}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(_POLL_S)

    def _remove_leftover_shm(self) -> int:
        # Regions that a live process maps belong to another server started meanwhile: leave them.
        leftovers = (shm_regions() - self._shm_before) - mapped_shm_regions()
        for name in leftovers:
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / name).unlink()
        return len(leftovers)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        """The last `n` lines of the server log."""
        return "\n".join(tail(self.log_path, n))

    def _log_report(self) -> str:
        """Error lines of the whole log (a model's load error may be far from the end), then the log tail."""
        lines = tail(self.log_path, 10**6, max_bytes=4 * 1024 * 1024)
        errors = [line for line in lines if _ERROR_LINE.match(line) and _CPU_NOISE not in line][-20:]
        report = "\nerrors in the log:\n" + "\n".join(errors) if errors else ""
        last = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"{report}\nlast {LOG_TAIL_LINES} lines of {self.log_path}:\n{last}"

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_forever(server: TritonServer, *, on_ready: Callable[[], None] | None = None) -> int:
    """Run `server` until it exits or SIGINT/SIGTERM arrives, then stop it cleanly; return its exit status.

    The status is the server's exit code, or 128 + N if signal N ended it (the shell's convention, since this is
    the exit status of `nirvana serve`): Triton exits 0 on SIGTERM once ready, but dies of it while loading.

    If `server` was not started, starts it, waits for READY and calls `on_ready`. Prefer that to starting it
    yourself: the handlers are installed first, so a signal during startup still stops the server, which runs
    in its own session and would otherwise outlive this process. Main thread only (signal handlers).
    """
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping tritonserver", signal.Signals(signum).name)
        stop_requested.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if server.pid is None:  # not started yet (a server that already exited is not restarted)
            server.start()
            try:
                server.wait_ready(cancel=stop_requested)
            except TritonServerError:
                if not stop_requested.is_set():
                    raise
            else:
                if on_ready is not None:
                    on_ready()
        while server.running and not stop_requested.wait(0.2):
            pass
    finally:
        code = server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code if code >= 0 else 128 - code
