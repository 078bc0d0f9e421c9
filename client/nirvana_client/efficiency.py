"""Cache efficiency: how much of the UNet time a hit skips shows up as server time saved, and what a miss pays.

Both are computed from the server's own per-request TIMINGS (ms per phase), for requests sent with the cache on
(`cached`) and the same requests sent with CACHE_MODE=bypass (`bypass`):

- server time of a request: `total_ms` (text encoding, embedding, lookup, UNet, decode and admission);
- UNet time per step: Σ `unet_ms` ÷ Σ steps over the bypass requests (every step runs there, no cache work);
- UNet time saved by a cached request: skipped steps × UNet time per step (0 for a miss);
- efficiency of a hit: (mean bypass server time of the requests with the same step count − its server time)
  ÷ its UNet time saved. 1.0: the hit saved exactly the UNet steps it skipped; less: the cache path and the
  resume ate some of it; above 1: noise, or the hit also skipped something else;
- overall efficiency: (mean paired bypass server time − mean cached server time) ÷ mean UNet time saved per
  request, over every cached request (hits and misses), so what misses pay counts against what hits save; with
  a 95% bootstrap interval (cached and bypass requests resampled), because a few % of drift in step time between
  the two modes moves it by tenths: N − K steps run at the drifted speed against K saved;
- the cache path's share of a miss: a miss's cache work (embedding + lookup + admission) ÷ the mean bypass
  server time (same step count). The lookup is `cache_call_ms` when the server reports it (the BLS round trip to
  the `cache` model, search, selection and latent load included), else search + select + latent load. The
  admission is `admit_ms`: what the response waited for it after the VAE decode, beside which it runs (its whole
  call is `admit_call_ms`). Capturing the latents to admit happens inside the denoising loop: it is in
  `unet_ms`, not in the cache path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LOOKUP_PARTS = ("search_ms", "select_ms", "latent_load_ms")  # inside `cache_call_ms` when that is reported
PHASE_KEYS = {"embed_ms": ("embed_ms",), "lookup_ms": ("cache_call_ms", *LOOKUP_PARTS), "admit_ms": ("admit_ms",)}


@dataclass(frozen=True)
class Sample:
    """One answered request, as the server reported it."""

    mode: str  # cached | bypass
    steps: int
    skipped: int
    hit: bool
    timings: Mapping[str, float]
    index: int = -1


def lookup_ms(timings: Mapping[str, float]) -> float:
    """The lookup's time: the BLS round trip when reported (it contains the parts), else the parts' sum."""
    if "cache_call_ms" in timings:
        return float(timings["cache_call_ms"])
    return float(sum(timings.get(part, 0.0) for part in LOOKUP_PARTS))


def cache_work_ms(timings: Mapping[str, float]) -> dict[str, float]:
    """A request's cache work by phase: embed, lookup, admit (0 where the phase did not run)."""
    return {
        "embed_ms": float(timings.get("embed_ms", 0.0)),
        "lookup_ms": lookup_ms(timings),
        "admit_ms": float(timings.get("admit_ms", 0.0)),
    }


def unet_step_ms(bypass: Iterable[Sample]) -> float | None:
    """UNet time per denoising step on bypass requests (they run every step)."""
    timed = [s for s in bypass if "unet_ms" in s.timings and s.steps > 0]
    steps = sum(s.steps for s in timed)
    return sum(s.timings["unet_ms"] for s in timed) / steps if steps else None


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    quantiles = {f"p{q}": float(np.percentile(array, q)) for q in (10, 50, 90)}
    return {"mean": float(array.mean()), **quantiles, "count": len(values)}


def _baselines(bypass: Sequence[Sample]) -> dict[int, float]:
    """Mean bypass server time per step count."""
    by_steps: dict[int, list[float]] = {}
    for s in bypass:
        if "total_ms" in s.timings:
            by_steps.setdefault(s.steps, []).append(float(s.timings["total_ms"]))
    return {steps: float(np.mean(times)) for steps, times in by_steps.items()}


def _missing(cached: Sequence[Sample], bypass: Sequence[Sample]) -> str | None:
    """Why efficiency cannot be computed, or None."""
    if not cached or not bypass:
        return "needs both cached and bypass requests (run with --compare-bypass)"
    if not any("total_ms" in s.timings for s in bypass):
        return "the server reported no total_ms"
    if not any("unet_ms" in s.timings for s in bypass):
        return "the server reported no unet_ms on bypass requests"
    return None


def per_request(cached: Sequence[Sample], baselines: Mapping[int, float], step_ms: float) -> list[dict]:
    """Each cached request with a same-step-count bypass baseline: server time, UNet time saved, efficiency
    (None for a miss: it saved no UNet time) and `delta_ms` = baseline − its server time (negative: it cost)."""
    rows = []
    for s in cached:
        if s.steps not in baselines or "total_ms" not in s.timings:
            continue
        saved = s.skipped * step_ms
        delta = baselines[s.steps] - float(s.timings["total_ms"])
        rows.append(
            {
                "index": s.index,
                "steps": s.steps,
                "k": s.skipped,
                "hit": s.hit,
                "server_ms": float(s.timings["total_ms"]),
                "bypass_server_ms": baselines[s.steps],
                "unet_saved_ms": saved,
                "delta_ms": delta,
                "efficiency": delta / saved if saved > 0 else None,
            }
        )
    return rows


def miss_share(misses: Sequence[Sample], baselines: Mapping[int, float]) -> dict | None:
    """What a miss spends in cache work (mean ms by phase) and its share of a bypass request's server time."""
    paired = [s for s in misses if s.steps in baselines]
    if not paired:
        return None
    work = [cache_work_ms(s.timings) for s in paired]
    phases = {phase: float(np.mean([w[phase] for w in work])) for phase in work[0]}
    total = [sum(w.values()) for w in work]
    baseline = float(np.mean([baselines[s.steps] for s in paired]))
    shares = [t / baselines[s.steps] for t, s in zip(total, paired, strict=True) if baselines[s.steps] > 0]
    reported = {p for s in paired for p in s.timings}
    return {
        "misses": len(paired),
        "cache_ms_mean": float(np.mean(total)),
        "cache_ms_by_phase": phases,
        "bypass_server_ms_mean": baseline,
        "share": float(np.mean(total)) / baseline if baseline > 0 else None,
        "share_per_miss": _stats(shares),
        "phases_not_reported": [phase for phase, keys in PHASE_KEYS.items() if not reported.intersection(keys)],
    }


def overall_interval(
    rows: Sequence[Mapping], bypass: Sequence[Sample], draws: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """95% bootstrap interval of the overall efficiency: cached rows and bypass requests resampled separately."""
    timed = [s for s in bypass if "total_ms" in s.timings]
    if not rows or not timed:
        return None
    rng = np.random.default_rng(seed)
    server = np.array([r["server_ms"] for r in rows])
    saved = np.array([r["unet_saved_ms"] for r in rows])
    row_steps = np.array([r["steps"] for r in rows])
    bypass_ms = np.array([float(s.timings["total_ms"]) for s in timed])
    bypass_steps = np.array([s.steps for s in timed])
    values = []
    for _ in range(draws):
        pick, base_pick = rng.integers(len(rows), size=len(rows)), rng.integers(len(timed), size=len(timed))
        means = {n: bypass_ms[base_pick][bypass_steps[base_pick] == n] for n in set(row_steps[pick].tolist())}
        if saved[pick].mean() <= 0 or any(len(v) == 0 for v in means.values()):
            continue  # a draw without a hit, or without a baseline for some step count
        baseline = np.array([means[n].mean() for n in row_steps[pick]])
        values.append((baseline.mean() - server[pick].mean()) / saved[pick].mean())
    if len(values) < draws // 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def cache_efficiency(samples: Sequence[Sample]) -> dict:
    """The efficiency figures of a run (see the module's docstring); `unavailable` says why when they are not."""
    cached = [s for s in samples if s.mode == "cached"]
    bypass = [s for s in samples if s.mode == "bypass"]
    reason = _missing(cached, bypass)
    step_ms = None if reason else unet_step_ms(bypass)
    if reason or step_ms is None:
        return {"unavailable": reason or "no UNet steps timed on bypass requests"}
    baselines = _baselines(bypass)
    rows = per_request(cached, baselines, step_ms)
    if not rows:
        return {"unavailable": "no cached request has a bypass request of the same step count"}
    saved_mean = float(np.mean([r["unet_saved_ms"] for r in rows]))
    bypass_mean = float(np.mean([r["bypass_server_ms"] for r in rows]))
    cached_mean = float(np.mean([r["server_ms"] for r in rows]))
    hits = [r for r in rows if r["efficiency"] is not None]
    by_k: dict[int, list[float]] = {}
    for r in hits:
        by_k.setdefault(r["k"], []).append(r["efficiency"])
    return {
        "unet_step_ms": step_ms,
        "bypass_server_ms_mean": bypass_mean,
        "cached_server_ms_mean": cached_mean,
        "unet_saved_ms_mean": saved_mean,
        "server_saved_ms_mean": bypass_mean - cached_mean,
        "overall": (bypass_mean - cached_mean) / saved_mean if saved_mean > 0 else None,
        "overall_ci95": overall_interval(rows, bypass),
        "per_hit": _stats([r["efficiency"] for r in hits]),
        "by_k": {str(k): float(np.mean(v)) for k, v in sorted(by_k.items())},
        "miss": miss_share([s for s in cached if not s.hit], baselines),
        "requests": rows,
    }


def summary(figures: Mapping) -> str:
    """One line: overall efficiency, the per-hit median and the cache path's share of a miss."""
    if "unavailable" in figures:
        return f"cache efficiency: n/a ({figures['unavailable']})"
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)  # noqa: E731
    per_hit = figures["per_hit"]
    miss = figures["miss"]
    interval = figures.get("overall_ci95")
    ci = f" (95% CI {interval[0]:.3f}–{interval[1]:.3f})" if interval else ""
    return (
        f"cache efficiency: overall={fmt(figures['overall'])}{ci} per-hit median={fmt(per_hit and per_hit['p50'])} "
        f"(UNet step {figures['unet_step_ms']:.2f} ms); cache path share of a miss="
        f"{fmt(miss and miss['share'], '.1%')}"
    )
