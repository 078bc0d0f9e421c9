"""`nirvana serve` killed by SIGKILL (what the OOM killer does) leaves no tritonserver, stub or milvus-lite behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nirvana_dev.install import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _children() -> dict[int, list[int]]:
    """Parent pid → live (non-zombie) child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def test_killed_launcher_takes_its_server_stubs_and_milvus_with_it(tiny_checkpoint_dir, tmp_path) -> None:
    http, grpc, metrics = free_ports(3)
    argv = [sys.executable, "-m", "nirvana_cli.main", "serve", "--checkpoint", str(tiny_checkpoint_dir)]
    argv += ["--cache-dir", str(tmp_path), "--http-port", str(http), "--grpc-port", str(grpc)]
    # Two orchestrator instances are stubs enough to leave behind, and start in half the time of the default 8
    argv += ["--metrics-port", str(metrics), "--ready-timeout", "180", "--instances", "2"]
    launcher = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    timer = threading.Timer(240, launcher.kill)  # bounds a launcher that never gets ready
    timer.start()
    tree: set[int] = set()
    try:
        for line in launcher.stderr:
            if line.startswith("READY"):
                break
        else:
            pytest.fail(f"nirvana serve exited with {launcher.wait()} before READY")
        tree = _descendants(launcher.pid)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree}
        assert {"tritonserver", "triton_python_b", "milvus"} <= names, names  # server, stubs, milvus-lite
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 30
        while left := _alive(tree):
            assert time.monotonic() < deadline, f"still running after the launcher was killed: {sorted(left)}"
            time.sleep(0.2)
    finally:
        timer.cancel()
        if launcher.poll() is None:
            launcher.kill()
        for pid in _alive(tree):
            os.kill(pid, signal.SIGKILL)
