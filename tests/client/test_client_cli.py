"""`nirvana-client replay` argument handling and its error path, without a server."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from nirvana_client.cli import app
from nirvana_dev.install import free_ports


def test_bad_column_and_shuffled_trace_are_refused(tmp_path) -> None:
    workload = tmp_path / "w.csv"
    workload.write_text("prompt,timestamp\na cat,2022-08-14 00:45:00\n")
    result = CliRunner().invoke(app, ["replay", str(workload), "-o", str(tmp_path / "o"), "--column", "caption"])
    assert result.exit_code == 2 and "caption" in result.output
    result = CliRunner().invoke(app, ["replay", str(workload), "-o", str(tmp_path / "o"), "--speed", "10", "--shuffle"])
    assert result.exit_code == 2 and "--shuffle" in result.output


def test_trace_timing_needs_timestamps(tmp_path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("a cat\n")
    result = CliRunner().invoke(app, ["replay", str(workload), "-o", str(tmp_path / "o"), "--timing", "trace"])
    assert result.exit_code == 2 and "timestamp column" in result.output


def test_unreachable_server_is_reported_as_errors_and_a_failing_exit(tmp_path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("a cat\na dog\n")
    (port,) = free_ports(1)  # nothing listens there
    out = tmp_path / "o"
    args = ["replay", str(workload), "-o", str(out), "--url", f"127.0.0.1:{port}", "--rate", "50", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--compare-bypass", "--timeout", "5"])
    assert result.exit_code == 1
    report = json.loads((out / "report.json").read_text())
    assert report["timing"]["mode"] == "poisson" and report["errors"] == 4 and report["hits"] == 0
    assert report["latency_ms"] == {"cached": None, "bypass": None} and report["error_examples"]
    assert (out / "report.md").exists() and (out / "latency_cdf.png").stat().st_size > 0
