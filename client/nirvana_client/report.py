"""The replay report: `report.json` (figures) and `report.md` (the same, as tables a person reads).

Every figure is computed from the records, i.e. from the server's responses: hits are responses with
CACHE_HIT true, steps saved is Σ SKIPPED_STEPS over the steps the cached requests asked for, stage times are
the server's own TIMINGS. Latency is the client's (request sent to response decoded).
"""

from __future__ import annotations

import collections
import os
import platform
from collections.abc import Sequence

import numpy as np

from nirvana_client.efficiency import Sample, cache_efficiency
from nirvana_client.replay import ReplayOptions, ReplayRun

STAGES = (
    "embed_ms",
    "search_ms",
    "select_ms",
    "latent_load_ms",
    "cache_call_ms",
    "text_encode_ms",
    "unet_ms",
    "decode_ms",
    "admit_ms",
    "total_ms",
)
CACHE_PATH_STAGES = ("embed_ms", "search_ms", "select_ms", "latent_load_ms")  # what the cache adds before the UNet


def latency_stats(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99/mean (ms) of `values`; None when there are none."""
    if len(values) == 0:
        return None
    array = np.asarray(values, dtype=float)
    stats = {f"p{q}": float(np.percentile(array, q)) for q in (50, 95, 99)}
    return stats | {"mean": float(array.mean())}


def stage_stats(records: Sequence) -> dict[str, dict[str, float]]:
    """Per server stage: mean/p50/p99 (ms) over the requests in which the stage ran, and how many those were."""
    out = {}
    for stage in STAGES:
        values = [r.server_timings_ms[stage] for r in records if stage in r.server_timings_ms]
        if values:
            array = np.asarray(values)
            out[stage] = {
                "mean": float(array.mean()),
                "p50": float(np.percentile(array, 50)),
                "p99": float(np.percentile(array, 99)),
                "count": len(values),
            }
    return out


def overhead(records: Sequence) -> dict[str, float] | None:
    """The cache path's cost per cached request, also in units of one UNet step (what a skipped step saves)."""
    if not records:
        return None
    path_ms = np.array([sum(r.server_timings_ms.get(s, 0.0) for s in CACHE_PATH_STAGES) for r in records])
    admit_ms = [r.server_timings_ms["admit_ms"] for r in records if "admit_ms" in r.server_timings_ms]
    run_steps = sum(r.steps - r.skipped_steps for r in records)
    unet_ms = sum(r.server_timings_ms.get("unet_ms", 0.0) for r in records)
    step_ms = unet_ms / run_steps if run_steps else float("nan")
    return {
        "cache_path_ms_mean": float(path_ms.mean()),
        "cache_path_ms_p99": float(np.percentile(path_ms, 99)),
        "admit_ms_mean": float(np.mean(admit_ms)) if admit_ms else 0.0,  # over the requests that admitted
        "unet_step_ms_mean": float(step_ms),
        "cache_path_in_unet_steps": float(path_ms.mean() / step_ms) if step_ms > 0 else float("nan"),
        "skipped_steps_per_request": float(np.mean([r.skipped_steps for r in records])),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _sample(r) -> Sample:
    return Sample(r.mode, r.steps, r.skipped_steps, r.cache_hit, r.server_timings_ms, r.index)


def prediction_error(records: Sequence) -> dict[str, dict[str, float | int | None]]:
    """|predicted − actual| / actual server time (TIMINGS predicted_total_ms vs total_ms, both the server's) for
    hits, misses and all requests that reported a prediction: count, median, p90, and the signed median (> 0:
    predicted too slow)."""
    groups: dict[str, list[float]] = {"hits": [], "misses": [], "all": []}
    for r in records:
        predicted, actual = r.server_timings_ms.get("predicted_total_ms"), r.server_timings_ms.get("total_ms")
        if predicted is None or not actual:
            continue
        signed = (predicted - actual) / actual
        groups["hits" if r.cache_hit else "misses"].append(signed)
        groups["all"].append(signed)
    out = {}
    for name, signed in groups.items():
        errors = np.abs(signed)
        out[name] = {
            "count": len(signed),
            "median": float(np.median(errors)) if signed else None,
            "p90": float(np.percentile(errors, 90)) if signed else None,
            "median_signed": float(np.median(signed)) if signed else None,
        }
    return out


def prediction_summary(report: dict) -> str:
    """One line per mode: the server's predicted-time error over the requests that reported a prediction."""
    parts = []
    for mode, groups in report.get("prediction_error", {}).items():
        g = groups["all"]
        if g["count"]:
            parts.append(f"{mode}: median {g['median']:.1%}, p90 {g['p90']:.1%} over {g['count']}")
    return "predicted server time error: " + ("; ".join(parts) if parts else "no predictions reported")


def _machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count()}


def build_report(run: ReplayRun, options: ReplayOptions, workload: str) -> dict:
    """The report.json dict. Ratios are cached/bypass for latency; speedup = bypass mean / cached mean."""
    by_mode = {m: [r for r in run.records if r.mode == m] for m in run.mode_wall_s}
    ok = {m: [r for r in rs if r.ok] for m, rs in by_mode.items()}
    cached = ok["cached"]
    hits = [r for r in cached if r.cache_hit]
    skipped = sum(r.skipped_steps for r in cached)
    total_steps = sum(r.steps for r in cached)
    latency = {m: latency_stats([r.latency_ms for r in ok.get(m, [])]) for m in ("cached", "bypass")}
    throughput = {
        m: (len(ok[m]) / run.mode_wall_s[m] if run.mode_wall_s[m] > 0 else None) if m in ok else None
        for m in ("cached", "bypass")
    }
    mean = {m: latency[m]["mean"] if latency[m] else None for m in latency}
    p99 = {m: latency[m]["p99"] if latency[m] else None for m in latency}
    errors = [r for r in run.records if not r.ok]
    lags = [r.schedule_lag_ms for r in run.records if r.schedule_lag_ms is not None]
    return {
        "workload": workload,
        "server": {"url": options.url, "protocol": options.protocol},
        "steps_per_request": options.steps,
        "guidance": options.guidance,
        "timing": {**vars(options.timing), "max_seconds": options.max_seconds},
        "compare_bypass": options.compare_bypass,
        "block_size": options.block_size if options.compare_bypass else None,
        "requests": len(by_mode["cached"]),
        "errors": len(errors),
        "by_mode": {
            m: {"requests": len(rs), "ok": len(ok[m]), "errors": len(rs) - len(ok[m]), "not_sent": run.not_sent[m]}
            for m, rs in by_mode.items()
        },
        "error_examples": sorted({r.error or "" for r in errors})[:5],
        "hits": len(hits),
        "hit_rate": len(hits) / len(cached) if cached else 0.0,
        "skipped_steps": skipped,
        "total_steps": total_steps,
        "steps_saved_fraction": skipped / total_steps if total_steps else 0.0,
        "k_histogram": {str(k): n for k, n in sorted(collections.Counter(r.skipped_steps for r in hits).items())},
        "latency_ms": latency,
        "throughput_rps": throughput,
        "speedup_mean_latency": _ratio(mean["bypass"], mean["cached"]),
        "latency_ratio_cached_over_bypass": {
            "mean": _ratio(mean["cached"], mean["bypass"]),
            "p99": _ratio(p99["cached"], p99["bypass"]),
        },
        "server_stage_ms": {m: stage_stats(rs) for m, rs in ok.items()},
        "overhead": overhead(cached),
        "cache_efficiency": cache_efficiency([_sample(r) for r in run.records if r.ok]),
        "prediction_error": {m: prediction_error(rs) for m, rs in ok.items()},
        "schedule_lag_ms": latency_stats(lags),
        "wall_s": run.wall_s,
        "mode_wall_s": run.mode_wall_s,
        "started_at": run.started_at,
        "machine": _machine(),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:,.{digits}f}"


def _latency_rows(report: dict) -> list[str]:
    latency, ratio_of = report["latency_ms"], report["latency_ratio_cached_over_bypass"]
    rows = []
    for key in ("mean", "p50", "p95", "p99"):
        cached, bypass = (latency[m][key] if latency[m] else None for m in ("cached", "bypass"))
        ratio = ratio_of.get(key) if key in ratio_of else _ratio(cached, bypass)
        rows.append(f"| latency {key} (ms) | {_fmt(cached)} | {_fmt(bypass)} | {_fmt(ratio, 3)} |")
    rps = report["throughput_rps"]
    rows.append(
        f"| throughput (req/s) | {_fmt(rps['cached'], 2)} | {_fmt(rps['bypass'], 2)} "
        f"| {_fmt(_ratio(rps['cached'], rps['bypass']), 3)} |"
    )
    return rows


def _stage_rows(report: dict) -> list[str]:
    stages = report["server_stage_ms"]
    rows = []
    for stage in STAGES:
        cells = []
        for mode in ("cached", "bypass"):
            s = stages.get(mode, {}).get(stage)
            cells.append(f"{_fmt(s['mean'])} / {_fmt(s['p99'])} ({s['count']})" if s else "–")
        if any(c != "–" for c in cells):
            rows.append(f"| {stage.removesuffix('_ms')} | {cells[0]} | {cells[1]} |")
    return rows


def _interval(e: dict) -> str:
    interval = e.get("overall_ci95")
    return f" (95% CI {_fmt(interval[0], 3)}–{_fmt(interval[1], 3)})" if interval else ""


def _efficiency_lines(e: dict) -> list[str]:
    lines = ["## Cache efficiency", ""]
    if "unavailable" in e:
        return [*lines, f"Not computed: {e['unavailable']}."]
    lines += [
        "Efficiency = (bypass server time − cached server time) ÷ UNet time saved (skipped steps × "
        f"{_fmt(e['unet_step_ms'], 2)} ms, the UNet time per step of bypass requests); server times are the "
        "server's `total_ms`, each cached request paired with the mean of bypass requests of its step count.",
        "",
        "| | value |",
        "|---|---:|",
        f"| **overall** (all cached requests, hits and misses) | **{_fmt(e['overall'], 3)}**{_interval(e)} |",
        f"| server time saved per request (ms) | {_fmt(e['server_saved_ms_mean'], 2)} "
        f"({_fmt(e['bypass_server_ms_mean'], 2)} bypass − {_fmt(e['cached_server_ms_mean'], 2)} cached) |",
        f"| UNet time saved per request (ms) | {_fmt(e['unet_saved_ms_mean'], 2)} |",
    ]
    if h := e["per_hit"]:
        lines.append(
            f"| per hit: mean / p10 / p50 / p90 ({h['count']} hits) | {_fmt(h['mean'], 3)} / {_fmt(h['p10'], 3)} / "
            f"{_fmt(h['p50'], 3)} / {_fmt(h['p90'], 3)} |"
        )
    if m := e["miss"]:
        phases = " + ".join(f"{p.removesuffix('_ms')} {_fmt(v, 2)}" for p, v in m["cache_ms_by_phase"].items())
        lines.append(
            f"| **cache path's share of a miss** ({m['misses']} misses) | **{_fmt(m['share'] and m['share'] * 100)}%** "
            f"({_fmt(m['cache_ms_mean'], 2)} ms = {phases} of {_fmt(m['bypass_server_ms_mean'], 2)} ms) |"
        )
        if m["phases_not_reported"]:
            lines += ["", f"Phases no miss reported (counted as 0): {', '.join(m['phases_not_reported'])}."]
    return lines


def _prediction_lines(report: dict) -> list[str]:
    lines = [
        "## Predicted server time",
        "",
        "Each answer's TIMINGS carry the server's prediction of its own server time, made once the cache has "
        "answered (`predicted_total_ms`, from the replica's learnt step costs and the requests beside it). Error = "
        "|predicted − actual| ÷ actual.",
        "",
        "| mode | requests | median | p90 | signed median |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, groups in report.get("prediction_error", {}).items():
        for name, g in groups.items():
            if g["count"]:
                lines.append(
                    f"| {mode}, {name} | {g['count']} | {_fmt(g['median'] * 100)}% | {_fmt(g['p90'] * 100)}% "
                    f"| {_fmt(g['median_signed'] * 100)}% |"
                )
    return lines


def to_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    """report.md: what a person reads first; report.json has every figure."""
    modes = report["by_mode"]
    by_k = report["cache_efficiency"].get("by_k", {})
    bypass = modes.get("bypass", {"ok": "–", "errors": "–"})
    t = report["timing"]
    pacing = {
        "trace": f"trace timestamps ×{t['speed']:g}",
        "closed": f"closed loop, concurrency {t['concurrency']}",
        "poisson": f"Poisson, {t['rate']:g} req/s",
    }[t["mode"]]
    compare = (
        f"cache on vs off in alternating blocks of {report['block_size']} requests (docs/benchmark.md)"
        if report["compare_bypass"]
        else "no bypass comparison (run with --compare-bypass)"
    )
    lines = [
        f"# Replay report: `{report['workload']}`",
        "",
        f"{report['requests']} requests × {report['steps_per_request']} steps; {pacing}; {compare}.",
        f"Server {report['server']['url']} ({report['server']['protocol']}), started {report['started_at']}, "
        f"wall {report['wall_s']:.0f} s; client machine {report['machine']['platform']}, "
        f"{report['machine']['cpu_count']} CPUs.",
        "",
        f"**Hit rate {report['hit_rate']:.1%}** ({report['hits']} of {modes['cached']['ok']}), "
        f"**steps saved {report['steps_saved_fraction']:.1%}** ({report['skipped_steps']} of "
        f"{report['total_steps']} UNet steps), speedup of mean latency {_fmt(report['speedup_mean_latency'], 3)}×.",
        "",
        "| | cached (CACHE_MODE=auto) | bypass | cached / bypass |",
        "|---|---:|---:|---:|",
        f"| requests ok / errors | {modes['cached']['ok']} / {modes['cached']['errors']} "
        f"| {bypass['ok']} / {bypass['errors']} | |",
        *_latency_rows(report),
        "",
        "## Hits by skipped steps K",
        "",
        "| K | hits | share of cached requests | cache efficiency (mean) |",
        "|---:|---:|---:|---:|",
        *(
            f"| {k} | {n} | {n / max(1, modes['cached']['ok']):.1%} | {_fmt(by_k.get(k), 3)} |"
            for k, n in report["k_histogram"].items()
        ),
        "",
        "## Server time per stage (ms: mean / p99 (requests in which it ran))",
        "",
        "| stage | cached | bypass |",
        "|---|---:|---:|",
        *_stage_rows(report),
    ]
    if report["overhead"]:
        o = report["overhead"]
        lines += [
            "",
            f"Cache path (embed + search + select + latent load): mean {_fmt(o['cache_path_ms_mean'], 2)} ms, "
            f"p99 {_fmt(o['cache_path_ms_p99'], 2)} ms = {_fmt(o['cache_path_in_unet_steps'], 2)} UNet steps "
            f"of {_fmt(o['unet_step_ms_mean'], 2)} ms; admitting latents on a miss: mean {_fmt(o['admit_ms_mean'], 2)} "
            f"ms; skipped steps per request: {_fmt(o['skipped_steps_per_request'], 2)}.",
        ]
    lines += ["", *_efficiency_lines(report["cache_efficiency"]), "", *_prediction_lines(report)]
    if report["errors"]:
        lines += ["", f"**{report['errors']} errors**, e.g.:", *(f"- `{e}`" for e in report["error_examples"])]
    if plots:
        lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in plots)]
    return "\n".join(lines) + "\n"
