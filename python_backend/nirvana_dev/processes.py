"""The processes and shared-memory regions of a tritonserver, read from /proc and /dev/shm (Linux)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from nirvana_dev.install import STUB_NAME

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


def proc_entries() -> Iterator[tuple[int, int, str, list[str]]]:
    """(pid, process group, state, argv) of every process we can read in /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may contain spaces
        yield int(entry.name), int(fields[2]), fields[0], argv


def server_processes(server_pid: int) -> list[int]:
    """Live processes of one server: its process group, plus stubs naming it as their parent (argv[5])."""
    pids = []
    for pid, pgrp, state, argv in proc_entries():
        is_stub = argv[0].endswith(STUB_NAME) and len(argv) > 5 and argv[5] == str(server_pid)
        if state != "Z" and (pgrp == server_pid or is_stub):
            pids.append(pid)
    return pids


def shm_regions() -> set[str]:
    return {p.name for p in SHM_DIR.glob(SHM_PREFIX + "*")} if SHM_DIR.is_dir() else set()


def mapped_shm_regions() -> set[str]:
    """Python-backend regions some live process still maps, i.e. regions of servers that are still running."""
    mapped = set()
    marker = f"{SHM_DIR}/{SHM_PREFIX}"
    for pid, _, _, _ in proc_entries():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if marker in line:
                    mapped.add(line.rsplit("/", 1)[1].split()[0])
    return mapped


def tail(path: Path, n: int, max_bytes: int = 256 * 1024) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []
