"""Reading prompt workloads for the benchmarks: text, CSV/TSV, JSONL, parquet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PROMPT_COLUMNS = ("prompt", "Prompt", "text", "caption")


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    tenant: str = "default"


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        return pd.DataFrame({"prompt": [line for line in lines if line]})
    raise WorkloadError(f"workload {str(path)!r}: unsupported type {suffix!r} (use .txt, .csv, .tsv, .jsonl, .parquet)")


def load_workload(
    path: Path,
    column: str | None = None,
    sort_by: str | None = None,
    tenant_column: str | None = None,
    limit: int | None = None,
) -> list[WorkItem]:
    """Prompts in replay order; sorted by `sort_by` (default: `timestamp` when the table has it)."""
    table = read_table(path)
    column = column or next((c for c in PROMPT_COLUMNS if c in table.columns), None)
    if column is None or column not in table.columns:
        raise WorkloadError(f"workload {str(path)!r} has no column {column!r}; columns: {list(table.columns)}")
    sort_by = sort_by or ("timestamp" if "timestamp" in table.columns else None)
    if sort_by:
        if sort_by not in table.columns:
            raise WorkloadError(f"sort column {sort_by!r} not in workload columns {list(table.columns)}")
        table = table.sort_values(sort_by, kind="stable")
    if tenant_column and tenant_column not in table.columns:
        raise WorkloadError(f"tenant column {tenant_column!r} not in workload columns {list(table.columns)}")
    items = [
        WorkItem(str(row[column]).strip(), str(row[tenant_column]) if tenant_column else "default")
        for _, row in table.iterrows()
        if str(row[column]).strip()
    ]
    return items[:limit] if limit else items
