"""Prompts and seeds of a workload file for `nirvana calibrate --workload` (the client's reader, in replay order)."""

from __future__ import annotations

from pathlib import Path

from nirvana_client.workload import load_workload

__all__ = ["load_prompts"]


def load_prompts(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Prompts and seeds of ``path`` (txt/csv/tsv/jsonl/parquet, as `nirvana_client.workload` reads them), first
    ``limit`` in replay order; raises ``WorkloadError`` (a ValueError) naming the file and what is wrong."""
    items = load_workload(Path(path), limit=limit)
    return [item.prompt for item in items], [item.seed for item in items]
