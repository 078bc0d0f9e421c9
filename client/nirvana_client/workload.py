"""Prompt workloads for replay and perf_analyzer data: text, CSV/TSV, JSONL and parquet files.

A workload is a list of `WorkItem`s in replay order. When the file has a timestamp column (the DiffusionDB
trace has `timestamp`) the items are sorted by it, so a trace replays in the order users sent it.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PROMPT_COLUMNS = ("prompt", "Prompt", "text", "caption")  # tried in order when --column is not given
SEED_COLUMNS = ("seed",)
TIMESTAMP_COLUMNS = ("timestamp",)
INT64_MAX = 2**63 - 1
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


class WorkloadError(ValueError):
    """The workload file cannot be read as asked; the message names the file, column or row."""


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload.

    `index` is the position in replay order; `seed` comes from the workload's seed column or is `index`, so
    the cached and the bypass request of one item generate from the same noise; `timestamp_s` is the arrival
    time in seconds since the epoch (None when the workload has no timestamps).
    """

    index: int
    prompt: str
    seed: int
    timestamp_s: float | None = None
    tenant: str | None = None


def read_rows(path: Path) -> list[dict[str, object]]:
    """All rows of a workload file as dicts; a .txt file gives one row {"prompt": line} per non-blank line."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WorkloadError(f"workload {str(path)!r}: unsupported type {suffix!r} (use one of {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise WorkloadError(f"workload {str(path)!r}: no such file")
    if suffix == ".txt":
        return [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise WorkloadError(f"workload {str(path)!r}: reading parquet needs a working pyarrow ({err})") from err
        return pq.read_table(path).to_pylist()
    return _read_jsonl(path)  # .jsonl, .ndjson


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise WorkloadError(f"workload {str(path)!r} line {number}: not JSON ({err})") from None
        rows.append(value if isinstance(value, dict) else {"prompt": value})  # a bare string is a prompt
    return rows


def _pick_column(columns: Iterable[str], asked: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    columns = list(columns)
    if asked is not None:
        if asked not in columns:
            raise WorkloadError(f"workload {str(path)!r} has no {what} column {asked!r}; columns: {columns}")
        return asked
    found = next((c for c in candidates if c in columns), None)
    if found is None and what == "prompt":
        raise WorkloadError(f"workload {str(path)!r}: no prompt column (tried {list(candidates)}); use --column")
    return found or ""


def parse_timestamp(value: object) -> float:
    """Seconds since the epoch from a number or an ISO 8601 string (naive times are taken as UTC)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        moment = value
    else:
        text = str(value).strip()
        try:
            return float(text)
        except ValueError:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_seed(value: object, row: int, path: Path) -> int:
    try:
        seed = int(str(value).strip())  # exact for large seeds, where a float would round
    except ValueError:
        try:
            number = float(value)  # "3838963998.0" as pandas writes integer columns with blanks
        except (TypeError, ValueError):
            number = float("nan")
        if not number.is_integer():
            raise WorkloadError(f"workload {str(path)!r} row {row}: seed {value!r} is not an integer") from None
        seed = int(number)
    if not 0 <= seed <= INT64_MAX:
        raise WorkloadError(f"workload {str(path)!r} row {row}: seed {seed} is outside 0..2**63-1 (SEED is INT64)")
    return seed


def load_workload(
    path: Path,
    column: str | None = None,
    *,
    seed_column: str | None = None,
    timestamp_column: str | None = None,
    tenant_column: str | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    shuffle_seed: int = 0,
) -> list[WorkItem]:
    """Read `path` into work items in replay order.

    Columns default to the first of PROMPT_COLUMNS, "seed" and "timestamp" that the file has. Order: sorted by
    timestamp when there is one (stable, so ties keep file order), shuffled with `shuffle_seed` if `shuffle`,
    then cut to `limit`. Seeds are the seed column's values, else the item's index.
    """
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise WorkloadError(f"workload {str(path)!r} has no rows")
    columns = rows[0].keys()
    prompt_col = _pick_column(columns, column, PROMPT_COLUMNS, "prompt", path)
    seed_col = _pick_column(columns, seed_column, SEED_COLUMNS, "seed", path)
    time_col = _pick_column(columns, timestamp_column, TIMESTAMP_COLUMNS, "timestamp", path)
    tenant_col = _pick_column(columns, tenant_column, (), "tenant", path) if tenant_column else ""

    kept = []  # (row number, prompt, seed or None, timestamp or None, tenant or None)
    for number, row in enumerate(rows, start=1):
        prompt = str(row.get(prompt_col) or "").strip()
        if not prompt:
            continue  # blank prompts are not requests; the server would reject them
        seed = _parse_seed(row[seed_col], number, path) if seed_col else None
        try:
            stamp = parse_timestamp(row[time_col]) if time_col else None
        except ValueError:
            raise WorkloadError(f"workload {str(path)!r} row {number}: bad timestamp {row[time_col]!r}") from None
        tenant = str(row[tenant_col]) if tenant_col else None
        kept.append((prompt, seed, stamp, tenant))
    if time_col:
        kept.sort(key=lambda item: item[2])
    if shuffle:
        random.Random(shuffle_seed).shuffle(kept)
    if limit is not None:
        kept = kept[:limit]
    return [
        WorkItem(i, prompt, i if seed is None else seed, stamp, tenant)
        for i, (prompt, seed, stamp, tenant) in enumerate(kept)
    ]
