"""The report of `nirvana calibrate --workload`: report.json, summary.md and a PNG grid per similarity band."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["write_report"]

_LABEL_HEIGHT = 14


def _tile(image: np.ndarray, label: str) -> Image.Image:
    tile = Image.new("RGB", (image.shape[1], image.shape[0] + _LABEL_HEIGHT), "white")
    tile.paste(Image.fromarray(image), (0, _LABEL_HEIGHT))
    ImageDraw.Draw(tile).text((2, 1), label, fill="black")
    return tile


def band_grid(examples: Sequence[dict], ks: Sequence[int], scores: Sequence[dict]) -> Image.Image:
    """Rows: a band's example pairs; columns: A, B uncached, B cached at each K (labelled with its score)."""
    rows = []
    for example, record_scores in zip(examples, scores, strict=True):
        tiles = [_tile(example["cached_source"], "A"), _tile(example["uncached"], "B uncached")]
        tiles += [_tile(example["cached"][k], f"K={k} {record_scores[str(k)]:.3f}") for k in ks]
        rows.append(tiles)
    width = sum(t.width for t in rows[0])
    height = sum(row[0].height for row in rows)
    grid = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for tile in row:
            grid.paste(tile, (x, y))
            x += tile.width
        y += row[0].height
    return grid


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_markdown(report: dict) -> str:
    """A page a person can read: the table written, each band's figures per K, what a rejected K still needs."""
    s = report["settings"]
    lines = [
        f"# Calibration of {s['checkpoint']}",
        "",
        f"Workload `{s['workload']}`: {report['pairs']} pairs (nearest earlier prompt under `{report['embedder']}`), "
        f"N={s['steps']}, Ks {s['ks']}, scorer `{s['scorer']}`; a band is admitted at K when the one-sided 95% lower "
        f"bound of its mean score is ≥ {s['min_score']} over ≥ {s['min_count']} pairs. Took {report['seconds']} s.",
        "",
        "Thresholds written to `"
        + report["config"]
        + "`: "
        + (", ".join(f"s > {t:.4f} → K={k}" for t, k in report["thresholds"]) or "none"),
    ]
    if report["caching_disabled"]:
        lines.append("\n**No band met the budget**: the table written never resumes from another prompt.")
    lines += ["", "## Rejected Ks", ""]
    for r in report["rejected"]:
        need = r.get("pairs_needed")
        more = f"needs about {need} pairs in its top band" if need else "more pairs of this kind would not help"
        lines.append(
            f"- K={r['k']}: {r['reason']} (n={r['n']}, mean {_fmt(r['mean'])}, "
            f"lower bound {_fmt(r['lower95'])}); {more}"
        )
    lines += ["", "## Per similarity band", ""]
    header = "| band | n | served K | " + " | ".join(f"K={k} mean / lower95 / need" for k in s["ks"]) + " |"
    lines += [header, "|" + "---|" * (3 + len(s["ks"]))]
    for band in report["band_table"]:
        cells = []
        for k in s["ks"]:
            c = band["by_k"][str(k)]
            mark = "✓" if c["within"] else (str(c["pairs_needed"]) if c["pairs_needed"] else "✗")
            cells.append(f"{_fmt(c['mean'])} / {_fmt(c['lower95'])} / {mark}")
        lo, hi = band["edges"]
        grid = f" ([grid](band_{band['band']}.png))" if band.get("grid") else ""
        lines.append(f"| [{lo}, {hi}){grid} | {band['n']} | {band['served_k']} | " + " | ".join(cells) + " |")
    lines += ["", "✓: the band alone meets the budget at K; a number: pairs it would need; ✗: its mean is below."]
    return "\n".join(lines) + "\n"


def write_report(report_dir: Path, report: dict, examples: dict[int, list[dict]], records: Sequence[dict]) -> Path:
    """Write report.json (figures and records), summary.md and band_<i>.png; returns the folder."""
    report_dir.mkdir(parents=True, exist_ok=True)
    scores = {r["index"]: r["scores"] for r in records}
    ks = report["settings"]["ks"]
    for band in report["band_table"]:
        chosen = examples.get(band["band"], [])
        if chosen:
            grid = band_grid(chosen, ks, [scores[e["pair"]["index"]] for e in chosen])
            grid.save(report_dir / f"band_{band['band']}.png")
            band["grid"] = f"band_{band['band']}.png"
            band["examples"] = [e["pair"] for e in chosen]
    (report_dir / "report.json").write_text(json.dumps({**report, "records": list(records)}, indent=1) + "\n")
    (report_dir / "summary.md").write_text(summary_markdown(report))
    return report_dir
