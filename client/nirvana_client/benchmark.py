"""One benchmark run: replay with a progress bar, then write records, report.json, plots and report.md."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from nirvana_client.replay import Record, ReplayOptions, replay
from nirvana_client.report import build_report, to_markdown
from nirvana_client.workload import WorkItem


class Progress:
    """A tqdm bar over every request of the run, showing hits and errors so far."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, unit="req", desc="replay", disable=not enabled, dynamic_ncols=True, mininterval=0.5
        )
        self.lock = threading.Lock()
        self.hits = self.cached = self.errors = 0

    def __call__(self, record: Record) -> None:
        with self.lock:  # records arrive from the worker threads
            self.errors += not record.ok
            if record.ok and record.mode == "cached":
                self.cached += 1
                self.hits += record.cache_hit
            self.bar.set_postfix(hit_rate=f"{self.hits / max(1, self.cached):.2f}", errors=self.errors, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_and_report(
    items: Sequence[WorkItem], options: ReplayOptions, out_dir: Path, workload: str, *, progress: bool = True
) -> dict:
    """Replay `items`, write everything into `out_dir`, return the report dict.

    Files: requests.jsonl (one record per request, the raw data), report.json, report.md, *.png.
    """
    from nirvana_client.plots import write_plots  # matplotlib: only once there is something to plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress(len(items) * (2 if options.compare_bypass else 1), progress)
    try:
        run = replay(items, options, on_record=bar)
    finally:
        bar.close()
    with (out_dir / "requests.jsonl").open("w", encoding="utf-8") as f:
        for record in sorted(run.records, key=lambda r: r.sent_s):
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    report = build_report(run, options, workload)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plots = write_plots(run.records, out_dir)
    (out_dir / "report.md").write_text(to_markdown(report, [p.name for p in plots]), encoding="utf-8")
    return report
