"""The mirror as the snapshot file holds it (format 2): every prompt record and the search's partitions, in arrays.

With it a restart fills the mirror without reading Milvus first: the records, their entries and LCBFU state come
from the arrays, and each partition's IVF from faiss's own serialization (lists, centroids and direct map: no
k-means, no assignment, no vector read from anywhere). Milvus stays the store of record: the open then catches up
with it (`reconcile`), as a replica's refresh does.

Records are stored column-wise (ids ascending, one UTF-8 blob of prompts with end offsets, a partition number per
row) and entries flattened (per row how many, per entry K, last access, bytes and how many per-replica counts, the
counts with a replica number), so that a million rows take a few arrays instead of a million pickled objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nirvana.cache.records import EntryMeta, PromptRecord
from nirvana.cache.search import PartitionKey, PartitionState

FORMAT = 2


@dataclass
class MirrorImage:
    records: list[PromptRecord]  # vectors None: the search holds them
    states: dict[PartitionKey, PartitionState]


def encode(records: list[PromptRecord], states: dict[PartitionKey, PartitionState]) -> dict[str, np.ndarray]:
    """The arrays of a format-2 snapshot of these records and search partitions."""
    records = sorted(records, key=lambda r: r.id)
    partitions = sorted({(r.cache_key, r.tenant) for r in records} | set(states))
    number = {key: i for i, key in enumerate(partitions)}
    prompts = [r.prompt.encode() for r in records]
    entries = [(k, e) for r in records for k, e in sorted(r.entries.items())]
    counts = [(replica, n) for _, e in entries for replica, n in e.replica_hits.items()]
    replicas = sorted({replica for replica, _ in counts})
    replica_number = {replica: i for i, replica in enumerate(replicas)}
    arrays = {
        "format": np.array(FORMAT),
        "ids": np.fromiter((r.id for r in records), np.int64, len(records)),
        "created": np.fromiter((r.created for r in records), np.float64, len(records)),
        "partition_of": np.fromiter((number[(r.cache_key, r.tenant)] for r in records), np.int32, len(records)),
        "prompt_bytes": np.frombuffer(b"".join(prompts), np.uint8),
        "prompt_ends": np.cumsum(np.fromiter(map(len, prompts), np.int64, len(prompts))),
        "entry_counts": np.fromiter((len(r.entries) for r in records), np.int32, len(records)),
        "entry_k": np.fromiter((k for k, _ in entries), np.int32, len(entries)),
        "entry_last_access": np.fromiter((e.last_access for _, e in entries), np.float64, len(entries)),
        "entry_nbytes": np.fromiter((e.nbytes for _, e in entries), np.int64, len(entries)),
        "entry_hit_counts": np.fromiter((len(e.replica_hits) for _, e in entries), np.int32, len(entries)),
        "hit_replica": np.fromiter((replica_number[r] for r, _ in counts), np.int32, len(counts)),
        "hit_n": np.fromiter((n for _, n in counts), np.int64, len(counts)),
        "names": np.array(json.dumps({"partitions": partitions, "replicas": replicas})),
    }
    searched = [[*key, int(state.trained_at), state.ivf is not None] for key, state in states.items()]
    arrays["search"] = np.array(json.dumps(searched))
    for i, state in enumerate(states.values()):
        arrays.update({f"tail_ids_{i}": state.tail_ids, f"tail_vectors_{i}": state.tail_vectors})
        arrays[f"ivf_ids_{i}"] = state.ivf_ids
        if state.ivf is not None:
            arrays[f"ivf_{i}"] = state.ivf
    return arrays


def decode(data: Mapping[str, np.ndarray], dim: int) -> MirrorImage:
    """The records and partitions of a format-2 snapshot; ValueError if they do not fit together."""
    if int(data["format"]) != FORMAT:
        raise ValueError(f"snapshot format {int(data['format'])}, expected {FORMAT}")
    names = json.loads(str(data["names"]))
    partitions = [tuple(key) for key in names["partitions"]]
    ids, partition_of = data["ids"], data["partition_of"]
    if ids.dtype != np.int64 or np.any(np.diff(ids) <= 0) or partition_of.shape != ids.shape:
        raise ValueError("record ids not ascending, or columns of other lengths")
    if len(partition_of) and not 0 <= int(partition_of.min()) <= int(partition_of.max()) < len(partitions):
        raise ValueError("record partition out of range")
    states = _states(data, dim)
    if not set(states) <= set(partitions):
        raise ValueError("search partitions without records")
    for i, key in enumerate(partitions):
        state = states.get(key)
        held = np.sort(np.concatenate([state.tail_ids, state.ivf_ids])) if state else np.zeros(0, np.int64)
        if not np.array_equal(held, ids[partition_of == i]):
            raise ValueError(f"search partition {key} does not hold exactly its records")
    return MirrorImage(_records(data, partitions, names["replicas"]), states)


def _states(data: Mapping[str, np.ndarray], dim: int) -> dict[PartitionKey, PartitionState]:
    states = {}
    for i, (cache_key, tenant, trained_at, has_ivf) in enumerate(json.loads(str(data["search"]))):
        tail_ids, tail_vectors = data[f"tail_ids_{i}"], data[f"tail_vectors_{i}"]
        if tail_vectors.shape != (len(tail_ids), dim):
            raise ValueError(f"partition {i}: tail vectors {tail_vectors.shape}, expected ({len(tail_ids)}, {dim})")
        ivf = data[f"ivf_{i}"] if has_ivf else None
        states[(cache_key, tenant)] = PartitionState(tail_ids, tail_vectors, ivf, data[f"ivf_ids_{i}"], int(trained_at))
    return states


def _records(data: Mapping[str, np.ndarray], partitions: list[tuple], replicas: list[str]) -> list[PromptRecord]:
    """The records, rebuilt row by row (plain lists: a million rows take seconds, not minutes)."""
    ids, created, partition_of = data["ids"].tolist(), data["created"].tolist(), data["partition_of"].tolist()
    blob, ends = data["prompt_bytes"].tobytes(), data["prompt_ends"].tolist()
    entry_counts, ks = data["entry_counts"].tolist(), data["entry_k"].tolist()
    last_access, nbytes = data["entry_last_access"].tolist(), data["entry_nbytes"].tolist()
    hit_counts, hit_replica, hit_n = (data[n].tolist() for n in ("entry_hit_counts", "hit_replica", "hit_n"))
    if not len(ends) == len(ids) == len(entry_counts) or sum(entry_counts) != len(ks) or sum(hit_counts) != len(hit_n):
        raise ValueError("record, entry or hit columns of inconsistent lengths")
    if ends and (ends[-1] != len(blob) or np.any(np.diff(data["prompt_ends"]) < 0) or ends[0] < 0):
        raise ValueError("prompt offsets do not cover the prompt bytes")
    records, entry, hit, start = [], 0, 0, 0
    for row_id, made, part, end, count in zip(ids, created, partition_of, ends, entry_counts, strict=True):
        entries = {}
        for _ in range(count):
            n_hits = hit_counts[entry]
            counts = {replicas[hit_replica[h]]: hit_n[h] for h in range(hit, hit + n_hits)}
            entries[ks[entry]] = EntryMeta(last_access=last_access[entry], nbytes=nbytes[entry], replica_hits=counts)
            entry, hit = entry + 1, hit + n_hits
        cache_key, tenant = partitions[part]
        records.append(PromptRecord(row_id, blob[start:end].decode(), cache_key, tenant, None, made, entries))
        start = end
    return records
