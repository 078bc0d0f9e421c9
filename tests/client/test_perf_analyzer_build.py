"""client/perf_analyzer/build.sh: what a user reads before a 5-minute build, and its refusal of a wrong option.
The build itself runs outside CI (apt packages, four clones, a C++ build); its figures are in docs/benchmark.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "client" / "perf_analyzer" / "build.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_help_names_the_pinned_release_and_how_to_build_offline() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for expected in ("r24.10", "2.51.0", "--src DIR", "--no-apt", "--prefix DIR", "libgrpc++-dev"):
        assert expected in done.stdout, expected


def test_an_unknown_option_is_refused_by_name_before_anything_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), "--build-dir", str(tmp_path / "b"), "--frobnicate"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "unknown option: --frobnicate" in done.stderr
    assert not (tmp_path / "b").exists()  # nothing created, nothing installed


def test_the_patches_it_applies_are_in_the_repository() -> None:
    patches = sorted(p.name for p in (SCRIPT.parent / "patches").glob("*.patch"))
    assert patches == ["common-optional-tests.patch", "perf_analyzer-optional-unit-tests.patch"]
    assert (SCRIPT.parent / "cmake" / "protobuf-config.cmake").is_file()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0


def test_an_option_without_its_value_is_named() -> None:
    done = _run("--prefix")
    assert done.returncode == 2 and "--prefix needs a value" in done.stderr
