"""Workload files in every supported format, column choice, trace order and seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nirvana_client.workload import WorkloadError, load_workload, parse_timestamp

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PROMPTS = ["a red fox in the snow", "a bowl of ramen", "a koi pond, watercolor"]


def write(path: Path, fmt: str) -> Path:
    """The same three prompts (with seeds and out-of-order timestamps where the format has columns)."""
    rows = [
        {"caption": PROMPTS[0], "seed": 30, "timestamp": "2022-08-14 00:47:00+00:00"},
        {"caption": PROMPTS[1], "seed": 10, "timestamp": "2022-08-14 00:45:00+00:00"},
        {"caption": PROMPTS[2], "seed": 20, "timestamp": "2022-08-14 00:46:00+00:00"},
    ]
    if fmt == "txt":
        path.write_text("\n".join(PROMPTS) + "\n\n")
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(rows[0])] + [
            sep.join(f'"{v}"' if "," in str(v) else str(v) for v in r.values()) for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_tables_sort_by_timestamp_and_take_seeds(tmp_path, fmt) -> None:
    items = load_workload(write(tmp_path / f"w.{fmt}", fmt))
    assert [i.prompt for i in items] == [PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    assert [i.seed for i in items] == [10, 20, 30]
    assert [i.index for i in items] == [0, 1, 2]
    assert items[1].timestamp_s - items[0].timestamp_s == 60


def test_text_file_one_prompt_per_line_seeds_are_indices(tmp_path) -> None:
    items = load_workload(write(tmp_path / "w.txt", "txt"))
    assert [i.prompt for i in items] == PROMPTS
    assert [i.seed for i in items] == [0, 1, 2] and all(i.timestamp_s is None for i in items)


def test_jsonl_of_bare_strings(tmp_path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    assert [i.prompt for i in load_workload(path)] == PROMPTS


def test_named_columns_and_errors(tmp_path) -> None:
    path = write(tmp_path / "w.csv", "csv")
    assert load_workload(path, "caption", seed_column="seed")[0].seed == 10
    with pytest.raises(WorkloadError, match="no prompt column 'Prompt'"):
        load_workload(path, "Prompt")
    with pytest.raises(WorkloadError, match="no seed column 'rng'"):
        load_workload(path, seed_column="rng")
    with pytest.raises(WorkloadError, match=r"unsupported type '\.xlsx'"):
        load_workload(tmp_path / "w.xlsx")


def test_bad_seed_and_timestamp_name_the_row(tmp_path) -> None:
    path = tmp_path / "w.csv"
    path.write_text("prompt,seed\na cat,1\na dog,x\n")
    with pytest.raises(WorkloadError, match="row 2: seed 'x'"):
        load_workload(path)
    path.write_text("prompt,timestamp\na cat,yesterday\n")
    with pytest.raises(WorkloadError, match="row 1: bad timestamp 'yesterday'"):
        load_workload(path)


def test_limit_and_shuffle_are_deterministic(tmp_path) -> None:
    path = tmp_path / "w.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(50)))
    first = load_workload(path, shuffle=True, shuffle_seed=3, limit=10)
    assert first == load_workload(path, shuffle=True, shuffle_seed=3, limit=10)
    assert len(first) == 10 and [i.index for i in first] == list(range(10))
    assert [i.prompt for i in first] != [f"prompt {i}" for i in range(10)]
    assert [i.seed for i in first] == list(range(10))  # distinct seeds, index-based without a seed column


def test_parse_timestamp_forms() -> None:
    assert parse_timestamp("1970-01-01 00:01:00+00:00") == 60.0
    assert parse_timestamp("1970-01-01T00:01:00Z") == 60.0
    assert parse_timestamp("1970-01-01 00:01:00") == 60.0  # naive = UTC
    assert parse_timestamp("12.5") == 12.5 and parse_timestamp(7) == 7.0


@pytest.mark.skipif(not (DATA / "diffusiondb_1k.csv").exists(), reason="shared data not present")
def test_diffusiondb_trace_replays_in_timestamp_order_with_its_seeds() -> None:
    items = load_workload(DATA / "diffusiondb_1k.csv", limit=500)
    stamps = [i.timestamp_s for i in items]
    assert len(items) == 500 and stamps == sorted(stamps)
    assert (stamps[-1] - stamps[0]) / 60 == 207  # the first 500 requests span 3 h 27 min
    assert len({i.seed for i in items}) > 450 and max(i.seed for i in items) > 2**31  # INT64, not INT32


@pytest.mark.skipif(not (DATA / "PartiPrompts.tsv").exists(), reason="shared data not present")
def test_parti_prompts_column() -> None:
    items = load_workload(DATA / "PartiPrompts.tsv", "Prompt")
    assert len(items) == 1632 and items[0].prompt == "bond"
