"""PNG plots of the quality evaluation (accuracy and leak rate vs K per similarity bin) and a dataset preview."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI, and no GUI toolkit to import

import matplotlib.pyplot as plt  # after matplotlib.use, or it would pick a GUI backend
import numpy as np

__all__ = ["accuracy_vs_k", "dataset_preview"]

MIN_BIN_PAIRS = 3  # bins with fewer pairs are left out of the plot (still in the JSON report)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bin_label(cell: dict) -> str:
    low, high = cell["bin"]
    return f"s in ({low:g}, {high:g}] (n={cell['n']})" if low > -1 else f"s <= {high:g} (n={cell['n']})"


def accuracy_vs_k(report: dict, path: str | Path) -> Path:
    """Left: attribute accuracy of cached B vs K, one line per similarity bin (K = 0: the same pairs uncached).
    Right: near-miss leak rate vs K per bin (K = 0: the uncached images' own rate of reading A's value)."""
    steps = report["settings"]["steps"]
    cells: dict[tuple[float, float], list[dict]] = {}
    for cell in report["by_k_and_bin"]:
        cells.setdefault(tuple(cell["bin"]), []).append(cell)
    fig, (acc_ax, leak_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(cells), 1)))
    for color, (_, row) in zip(colors, sorted(cells.items()), strict=False):
        row = sorted(row, key=lambda c: c["k"])
        if row[0]["n"] < MIN_BIN_PAIRS:
            continue
        ks = [0] + [c["k"] for c in row]
        acc_ax.plot(ks, [row[0]["uncached_accuracy"]] + [c["accuracy"] for c in row], "o-", color=color,
                    label=_bin_label(row[0]))  # fmt: skip
        if row[0]["n_near_miss"]:
            leaks = [row[0]["uncached_leak_rate_near_miss"]] + [c["leak_rate_near_miss"] for c in row]
            leak_ax.plot(ks, leaks, "o-", color=color, label=f"{_bin_label(row[0])}, {row[0]['n_near_miss']} near")
    acc_ax.axhline(report["uncached_accuracy"], color="black", linestyle=":", linewidth=1, label="uncached, all pairs")
    acc_ax.set(
        xlabel=f"skipped steps K (of {steps}); 0 = uncached",
        ylabel="attribute accuracy (judge)",
        title="Accuracy of cached generations vs K",
    )
    leak_ax.set(
        xlabel=f"skipped steps K (of {steps}); 0 = uncached",
        ylabel="near misses showing A's value",
        title="Leak rate vs K (near misses)",
    )
    leak_ax.set_ylim(-0.02, 1.02)
    for ax in (acc_ax, leak_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(path))


def dataset_preview(images: np.ndarray, captions: Sequence[str], path: str | Path, columns: int = 6) -> Path:
    """A grid of ``images`` (uint8 ``[n, H, W, 3]``) with their captions underneath."""
    count = len(images)
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.7 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(captions[i], 30)), fontsize=6)
    return _save(fig, Path(path))
