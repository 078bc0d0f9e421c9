"""The real tritonserver as a managed child process: readiness, requests, clean stop, clear failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

from nirvana_dev.install import (
    STUB_NAME,
    ServerPorts,
    TritonInstall,
    TritonServerError,
    child_env,
    find_tritonserver,
    free_ports,
)
from nirvana_dev.processes import SHM_DIR
from nirvana_dev.tritonserver import TritonServer, serve_forever

pytestmark = pytest.mark.timeout(60)
integration = pytest.mark.integration

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [
  { name: "TEXT_OUT", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "LENGTH", data_type: TYPE_INT32, dims: [ 1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

ECHO_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            length = np.array([len(text.reshape(-1)[0])], dtype=np.int32)
            outputs = [pb_utils.Tensor("TEXT_OUT", text), pb_utils.Tensor("LENGTH", length)]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
"""

SLOW_MODEL = """\
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(60)
"""

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("echo refuses to load: weights-missing-4711")
"""


def _write_repo(root: Path, model_py: str) -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "echo" / "1" / "model.py").write_text(model_py)
    return root


def test_find_tritonserver_rejects_a_folder_without_the_binary(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="bin/tritonserver does not exist"):
        find_tritonserver(tmp_path)


def test_find_tritonserver_names_the_stubs_the_wheel_ships() -> None:
    install = find_tritonserver()
    assert install.stub is not None and install.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(TritonServerError, match=r"no python backend stub for Python 2\.7 .*3\.11"):
        find_tritonserver(python_version="2.7")


def test_child_env_puts_server_libraries_and_venv_first() -> None:
    install = TritonInstall(root=Path("/srv/triton"), lib_dirs=(Path("/srv/libs"),))
    env = child_env(install, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/root"}, {"EXTRA": "1"})
    assert env["LD_LIBRARY_PATH"].startswith("/srv/libs:") and env["LD_LIBRARY_PATH"].endswith(":/opt/lib")
    assert env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin"  # the stub finds packages via this python3
    assert (env["OMP_WAIT_POLICY"], env["HOME"], env["EXTRA"]) == ("PASSIVE", "/root", "1")


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(port > 0 for port in ports)


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_repo(tmp_path_factory.mktemp("echo_repo"), ECHO_MODEL)


def _server(repo: Path, work_dir: Path, **kwargs: object) -> TritonServer:
    return TritonServer(repo, ServerPorts(*free_ports(3)), work_dir=work_dir, ready_timeout_s=30.0, **kwargs)


@pytest.fixture(scope="module")
def echo_server(echo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = _server(echo_repo, tmp_path_factory.mktemp("echo_server"))
    started = time.monotonic()
    with server:
        print(f"\nstart→READY {time.monotonic() - started:.2f} s")
        yield server


def _argvs() -> dict[int, list[str]]:
    """argv of every live (non-zombie) process: psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        procs = psutil.process_iter(["pid", "cmdline", "status"])
        return {p.pid: p.info["cmdline"] or [] for p in procs if p.info["status"] != psutil.STATUS_ZOMBIE}
    argvs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                argvs[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
    return argvs


def _stubs_of(server_pid: int) -> dict[int, str]:
    """Stub pid → its shm region name (the stub's argv: model.py, region, sizes, parent pid, ...)."""
    return {
        pid: argv[2]
        for pid, argv in _argvs().items()
        if argv and argv[0].endswith(STUB_NAME) and len(argv) > 5 and argv[5] == str(server_pid)
    }


def _servers_on(http_port: int) -> list[int]:
    return [pid for pid, argv in _argvs().items() if f"--http-port={http_port}" in argv]


@integration
def test_http_request_returns_echo(echo_server: TritonServer) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=echo_server.urls.http)
    text = httpclient.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hello triton"], dtype=object))
    result = client.infer("echo", [text])
    assert result.as_numpy("TEXT_OUT").tolist() == [b"hello triton"]
    assert result.as_numpy("LENGTH").tolist() == [12]


@integration
def test_grpc_request_returns_echo(echo_server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=echo_server.urls.grpc)
    text = grpcclient.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array(["grüße".encode()], dtype=object))
    result = client.infer("echo", [text])
    assert result.as_numpy("TEXT_OUT").tolist() == ["grüße".encode()]
    assert result.as_numpy("LENGTH").tolist() == [len("grüße".encode())]


@integration
def test_metrics_endpoint_answers(echo_server: TritonServer) -> None:
    with urllib.request.urlopen(echo_server.urls.metrics, timeout=5) as response:
        body = response.read().decode()
    assert 'nv_inference_request_success{model="echo"' in body


@integration
def test_stop_leaves_no_process_or_shm(echo_repo: Path, tmp_path: Path) -> None:
    server = _server(echo_repo, tmp_path)
    with server:
        pid = server.pid
        stubs = _stubs_of(pid)
        assert len(stubs) == 1, "one instance of one python model runs one stub"
        assert all((SHM_DIR / region).exists() for region in stubs.values())
        started = time.monotonic()
        assert server.stop() == 0
        print(f"\nstop {time.monotonic() - started:.2f} s")
    assert not server.running and server.pid is None
    live = _argvs()
    assert pid not in live
    assert not set(stubs) & set(live)
    assert not [region for region in stubs.values() if (SHM_DIR / region).exists()]
    assert server.stop() == 0  # stopping again is harmless


@integration
def test_stop_after_crash_removes_stubs_and_shm(echo_repo: Path, tmp_path: Path) -> None:
    server = _server(echo_repo, tmp_path)
    with server:
        stubs = _stubs_of(server.pid)
        os.kill(server.pid, signal.SIGKILL)  # a crash skips Triton's own clean-up of stubs and shm
        assert server.stop() == -signal.SIGKILL
    assert not set(stubs) & set(_argvs())
    assert not [region for region in stubs.values() if (SHM_DIR / region).exists()]
    # Usually the launcher removes them; a stub that noticed its parent die first removes its own (a race under load)
    assert server.removed_shm_regions <= len(stubs)


@integration
def test_model_that_fails_to_load_reports_its_error(tmp_path: Path) -> None:
    repo = _write_repo(tmp_path / "repo", BROKEN_MODEL)
    server = _server(repo, tmp_path / "work")
    started = time.monotonic()
    with pytest.raises(TritonServerError) as error, server:
        pass
    assert "exited with code" in str(error.value)  # --exit-on-error: no wait for the timeout
    assert "weights-missing-4711" in str(error.value)
    assert time.monotonic() - started < 20
    assert not server.running


@integration
def test_port_in_use_is_a_clear_error(echo_repo: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http, metrics = free_ports(2)
        server = TritonServer(echo_repo, ServerPorts(http, busy.getsockname()[1], metrics), work_dir=tmp_path)
        with pytest.raises(TritonServerError, match=r"grpc port .* is in use"):
            server.start()
    assert server.pid is None


def test_wait_ready_before_start_is_an_error(echo_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="not started"):
        _server(echo_repo, tmp_path).wait_ready()


SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nirvana_dev.install import ServerPorts
    from nirvana_dev.tritonserver import TritonServer, serve_forever

    ports = ServerPorts(*map(int, sys.argv[3:6]))
    server = TritonServer(Path(sys.argv[1]), ports, work_dir=Path(sys.argv[2]))
    sys.exit(serve_forever(server, on_ready=lambda: print("READY", server.pid, flush=True)))
    """
)


def _wait_for_ready_line(child: subprocess.Popen, timeout_s: float) -> int:
    """The server pid that the child prints from on_ready; the timer bounds a child that never prints."""
    timer = threading.Timer(timeout_s, child.kill)
    timer.start()
    try:
        line = child.stdout.readline()
    finally:
        timer.cancel()
    assert line.startswith("READY"), f"serve_forever child did not become ready (exit code {child.poll()})"
    return int(line.split()[1])


@integration
def test_serve_forever_stops_cleanly_on_sigterm(echo_repo: Path, tmp_path: Path) -> None:
    ports = ServerPorts(*free_ports(3))
    argv = [sys.executable, "-c", SERVE_SCRIPT, str(echo_repo), str(tmp_path), *map(str, astuple(ports))]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = _wait_for_ready_line(child, timeout_s=30)
        assert _servers_on(ports.http) == [server_pid]
        stubs = _stubs_of(server_pid)
        assert stubs
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
        assert not {server_pid, *stubs} & set(_argvs())
    finally:
        if child.poll() is None:
            child.kill()
        for pid in _servers_on(ports.http):  # never leave a server behind a failed test
            os.killpg(pid, signal.SIGKILL)


@integration
def test_serve_forever_stops_a_server_still_loading_on_sigterm(tmp_path: Path) -> None:
    repo = _write_repo(tmp_path / "repo", SLOW_MODEL)
    ports = ServerPorts(*free_ports(3))
    argv = [sys.executable, "-c", SERVE_SCRIPT, str(repo), str(tmp_path / "work"), *map(str, astuple(ports))]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (servers := _servers_on(ports.http)) or not _stubs_of(servers[0]):  # loading, not ready
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.1)
        stubs = _stubs_of(servers[0])
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) in (0, 128 + signal.SIGTERM)  # Triton dies of SIGTERM while loading
        assert child.stdout.read() == ""  # never became ready
        assert not {*servers, *stubs} & set(_argvs())
    finally:
        if child.poll() is None:
            child.kill()
        for pid in _servers_on(ports.http):
            os.killpg(pid, signal.SIGKILL)


@integration
def test_serve_forever_returns_when_server_exits(echo_repo: Path, tmp_path: Path) -> None:
    handler_before = signal.getsignal(signal.SIGTERM)
    server = _server(echo_repo, tmp_path)
    with server:
        os.killpg(server.pid, signal.SIGTERM)  # the server ends on its own, not through us
        assert serve_forever(server) == 0
    assert signal.getsignal(signal.SIGTERM) is handler_before


@integration
def test_server_and_stubs_die_with_a_launcher_killed_by_sigkill(echo_repo: Path, tmp_path: Path) -> None:
    """What the OOM killer does to `nirvana serve`: nothing of its server may run on holding ports and files."""
    ports = ServerPorts(*free_ports(3))
    argv = [sys.executable, "-c", SERVE_SCRIPT, str(echo_repo), str(tmp_path), *map(str, astuple(ports))]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = _wait_for_ready_line(child, timeout_s=30)
        stubs = _stubs_of(server_pid)
        assert stubs
        child.kill()
        child.wait(timeout=10)
        deadline = time.monotonic() + 15
        while left := {server_pid, *stubs} & set(_argvs()):
            assert time.monotonic() < deadline, f"processes of the killed launcher still run: {sorted(left)}"
            time.sleep(0.1)
        with socket.create_server(("127.0.0.1", ports.http)):  # and its port is free again
            pass
    finally:
        if child.poll() is None:
            child.kill()
        for pid in _servers_on(ports.http):
            os.killpg(pid, signal.SIGKILL)


@integration
def test_a_server_confined_to_one_core_keeps_its_stubs_there(echo_repo: Path, tmp_path: Path) -> None:
    core = max(os.sched_getaffinity(0))
    with _server(echo_repo, tmp_path, cpus=[core]) as server:
        stubs = _stubs_of(server.pid)
        assert stubs, "the echo model's stub is running"
        for pid in [server.pid, *stubs]:
            assert os.sched_getaffinity(pid) == {core}
        environ = Path(f"/proc/{next(iter(stubs))}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=1" in environ


def test_cpus_outside_this_process_are_refused_before_start(echo_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="cpus=\\[4096\\]"):
        _server(echo_repo, tmp_path, cpus=[4096])
    with pytest.raises(TritonServerError, match="non-empty"):
        _server(echo_repo, tmp_path, cpus=[])
