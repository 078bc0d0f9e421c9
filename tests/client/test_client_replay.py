"""Acceptance: replay through a real tritonserver; the report agrees with the responses and the server's counters."""

from __future__ import annotations

import collections
import http.client
import json
import math
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from nirvana_client.cli import app
from nirvana_dev.install import ServerPorts, free_ports
from nirvana_dev.launch import ServeOptions, make_server, prepare

pytestmark = pytest.mark.integration
STEPS = 6  # small N keeps 120 requests within seconds on two cores
SUBJECTS = [
    "a red fox in the snow",
    "a bowl of ramen on a wooden table",
    "a lighthouse on a cliff at dusk",
    "a koi pond in autumn",
    "an old steam locomotive",
    "a cat sleeping on a windowsill",
    "a mountain lake at sunrise",
    "a robot playing chess",
    "a medieval castle in fog",
    "a hot air balloon over a desert",
    "a vintage typewriter on a desk",
    "a sailboat in a storm",
    "a field of sunflowers",
    "an astronaut riding a horse",
    "a cozy library with a fireplace",
    "a city street at night in the rain",
    "a hummingbird drinking nectar",
    "a bonsai tree in a ceramic pot",
    "a snowy cabin in the woods",
    "a plate of sushi, top view",
]
STYLES = ["{}", "a photograph of {}", "{}, oil painting"]
COUNTERS = ("nirvana_cache_hits_total", "nirvana_cache_misses_total", "nirvana_cache_bypass_total")


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("replay-serve")
    http_port, grpc_port, metrics_port = free_ports(3)
    options = ServeOptions(
        cache_dir=cache_dir,
        checkpoint=tiny_checkpoint_dir,
        ports=ServerPorts(http_port, grpc_port, metrics_port),
        ready_timeout_s=180,
        instances=4,
    )
    repo, _ = prepare(options)
    triton = make_server(options, repo)
    triton.start()
    try:
        triton.wait_ready()
        yield triton
    finally:
        triton.stop()


def counters(server) -> dict[str, float]:
    """The server's own counters, from its metrics endpoint (loopback, no proxy)."""
    url = urlsplit(server.urls.metrics)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", url.path)
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in (*COUNTERS, "nirvana_skipped_steps_total"):
            values[name] = float(line.split()[-1])
    return values


def test_report_matches_responses_and_server_counters(server, tmp_path) -> None:
    workload = tmp_path / "prompts.txt"
    prompts = [style.format(subject) for style in STYLES for subject in SUBJECTS]  # each subject recurs later
    workload.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "report"
    before = counters(server)
    args = ["replay", str(workload), "--out", str(out), "--url", server.urls.grpc, "--steps", str(STEPS)]
    args += ["--concurrency", "2", "--compare-bypass", "--block-size", "10", "--no-progress", "--tenant", "accept"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after = counters(server)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}

    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    cached = [r for r in records if r["mode"] == "cached"]
    bypass = [r for r in records if r["mode"] == "bypass"]
    hits = [r for r in cached if r["cache_hit"]]

    assert len(prompts) >= 50 and report["requests"] == len(cached) == len(prompts) and report["errors"] == 0
    assert sorted(r["index"] for r in bypass) == list(range(len(prompts)))
    assert report["hits"] == len(hits) == delta["nirvana_cache_hits_total"] > 0
    assert delta["nirvana_cache_misses_total"] == len(cached) - len(hits)
    assert delta["nirvana_cache_bypass_total"] == len(bypass) == len(prompts)
    assert report["hit_rate"] == len(hits) / len(prompts)
    skipped = sum(r["skipped_steps"] for r in cached)
    assert skipped == delta["nirvana_skipped_steps_total"]  # bypass responses skip nothing
    assert report["steps_saved_fraction"] == skipped / (len(prompts) * STEPS)
    assert report["k_histogram"] == {
        str(k): n for k, n in collections.Counter(r["skipped_steps"] for r in hits).items()
    }
    assert all(not r["cache_hit"] and r["skipped_steps"] == 0 for r in bypass)
    mean = sum(r["latency_ms"] for r in cached) / len(cached)
    assert report["latency_ms"]["cached"]["mean"] == pytest.approx(mean)
    assert report["latency_ms"]["bypass"]["p99"] > 0 and report["throughput_rps"]["bypass"] > 0
    assert "unet_ms" in report["server_stage_ms"]["bypass"] and "search_ms" in report["server_stage_ms"]["cached"]
    assert "hit_rate=" in result.output and "steps_saved=" in result.output
    efficiency = report["cache_efficiency"]
    assert "unavailable" not in efficiency and "cache efficiency: overall=" in result.output
    assert len(efficiency["requests"]) == len(cached) and efficiency["per_hit"]["count"] == len(hits)
    figures = [efficiency[k] for k in ("overall", "unet_step_ms", "unet_saved_ms_mean", "server_saved_ms_mean")]
    figures += [efficiency["per_hit"]["p50"], efficiency["miss"]["share"], efficiency["miss"]["cache_ms_mean"]]
    assert all(math.isfinite(v) for v in figures) and efficiency["unet_step_ms"] > 0
    assert efficiency["miss"]["cache_ms_by_phase"]["lookup_ms"] > 0  # the served lookup: the BLS round trip
    for name in ("report.md", "latency_cdf.png", "k_histogram.png", "warmup.png", "stages.png"):
        assert (out / name).stat().st_size > 0


def test_trace_replay_over_http_stops_at_max_seconds(server, tmp_path) -> None:
    workload = tmp_path / "trace.csv"
    rows = [f"a lantern number {i} in the dark,{i},2022-08-14 00:{i // 2:02d}:00+00:00" for i in range(100)]
    workload.write_text("prompt,seed,timestamp\n" + "\n".join(rows) + "\n")
    out = tmp_path / "trace"
    args = ["replay", str(workload), "-o", str(out), "--protocol", "http", "--url", server.urls.http]
    args += ["--timing", "trace", "--speed", "30", "--steps", str(STEPS), "--max-seconds", "3", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    sent = report["by_mode"]["cached"]
    assert 0 < sent["requests"] < 100 and sent["not_sent"] == 100 - sent["requests"] and report["errors"] == 0
    assert report["wall_s"] < 3 + 10  # stops sending at 3 s; what is in flight finishes
    assert report["timing"]["mode"] == "trace" and report["schedule_lag_ms"] is not None


def test_generate_command_writes_the_image(server, tmp_path) -> None:
    out = tmp_path / "fox.png"
    args = ["generate", "a red fox in the snow", "-o", str(out), "--url", server.urls.grpc, "--steps", str(STEPS)]
    result = CliRunner().invoke(app, [*args, "--seed", "3", "--cache-mode", "bypass"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "hit=False skipped_steps=0" in result.output
