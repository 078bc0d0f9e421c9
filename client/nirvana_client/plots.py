"""PNG plots of a replay: latency CDF cached vs bypass, K histogram, cache warm-up over time, server stages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI, and no GUI toolkit to import

import matplotlib.pyplot as plt  # after matplotlib.use, or it would pick a GUI backend
import numpy as np

from nirvana_client.replay import Record
from nirvana_client.report import STAGES

COLORS = {"cached": "tab:blue", "bypass": "tab:orange"}
WARMUP_WINDOW = 50  # requests in the rolling hit rate
STAGE_ORDER = tuple(s for s in STAGES if s != "total_ms")  # stacked per stage; the total is their sum


def _ok(records: Sequence[Record], mode: str) -> list[Record]:
    return [r for r in records if r.ok and r.mode == mode]


def _legend(ax: plt.Axes, **kwargs: object) -> None:
    if ax.get_legend_handles_labels()[0]:  # a run with no responses has nothing to label
        ax.legend(**kwargs)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdf(records: Sequence[Record], path: Path) -> Path:
    """Empirical CDF of client latency per mode, with each mode's mean and p99 marked."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, color in COLORS.items():
        values = np.sort([r.latency_ms for r in _ok(records, mode)])
        if values.size == 0:
            continue
        label = f"{mode} (n={values.size}, mean {values.mean():.0f} ms, p99 {np.percentile(values, 99):.0f} ms)"
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", color=color, label=label)
        ax.axvline(values.mean(), color=color, linestyle=":", linewidth=1)
    ax.set(xlabel="latency (ms, client side)", ylabel="fraction of requests ≤ x", title="Latency CDF: cache on vs off")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower right", fontsize=8)
    return _save(fig, path)


def k_histogram(records: Sequence[Record], path: Path) -> Path:
    """Requests by skipped steps K (0 = miss), cached mode."""
    cached = _ok(records, "cached")
    steps = max((r.steps for r in cached), default=0)
    counts: dict[int, int] = {}
    for r in cached:
        counts[r.skipped_steps if r.cache_hit else 0] = counts.get(r.skipped_steps if r.cache_hit else 0, 0) + 1
    ks = sorted(counts)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar([str(k) if k else "miss" for k in ks], [counts[k] for k in ks])
    for bar, k in zip(bars, ks, strict=True):
        bar.set_color("tab:gray" if k == 0 else "tab:blue")
    ax.bar_label(bars, labels=[f"{counts[k] / len(cached):.0%}" for k in ks], fontsize=8)
    ax.set(
        xlabel=f"skipped steps K (of {steps})",
        ylabel="cached requests",
        title=f"Where requests resumed (n={len(cached)})",
    )
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def warmup(records: Sequence[Record], path: Path) -> Path:
    """Hit rate (cumulative and rolling) and fraction of steps saved, by cached request number in send order."""
    cached = sorted(_ok(records, "cached"), key=lambda r: r.sent_s)
    hit = np.array([r.cache_hit for r in cached], dtype=float)
    skipped = np.array([r.skipped_steps for r in cached], dtype=float)
    steps = np.array([r.steps for r in cached], dtype=float)
    n = np.arange(1, len(cached) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(cached):
        ax.plot(n, np.cumsum(hit) / n, color="tab:blue", label="hit rate (cumulative)")
        window = min(WARMUP_WINDOW, max(1, len(cached) // 4))  # short runs still get a visible rolling curve
        rolling = np.convolve(hit, np.ones(window) / window, mode="valid")
        ax.plot(n[window - 1 :], rolling, color="tab:blue", alpha=0.35, label=f"hit rate (last {window})")
        ax.plot(n, np.cumsum(skipped) / np.cumsum(steps), color="tab:green", label="steps saved (cumulative)")
    ax.set(xlabel="cached request number (send order)", ylabel="fraction", title="Cache warming up")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    _legend(ax, loc="upper left", fontsize=8)
    return _save(fig, path)


def stages(records: Sequence[Record], path: Path) -> Path:
    """Mean server time per request, stacked by stage, per mode: where the time goes and what the cache adds."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    modes = [m for m in COLORS if _ok(records, m)]
    left = np.zeros(len(modes))
    cmap = plt.get_cmap("tab10")
    for i, stage in enumerate(STAGE_ORDER):
        means = np.array([np.mean([r.server_timings_ms.get(stage, 0.0) for r in _ok(records, m)]) for m in modes])
        if not means.any():
            continue
        ax.barh(modes, means, left=left, color=cmap(i), label=stage.removesuffix("_ms"))
        left += means
    ax.set(xlabel="mean server time per request (ms)", title="Server time by stage")
    _legend(ax, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return _save(fig, path)


def write_plots(records: Sequence[Record], out_dir: Path) -> list[Path]:
    """All plots into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    return [
        latency_cdf(records, out_dir / "latency_cdf.png"),
        k_histogram(records, out_dir / "k_histogram.png"),
        warmup(records, out_dir / "warmup.png"),
        stages(records, out_dir / "stages.png"),
    ]
