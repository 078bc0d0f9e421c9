"""Several requests as one model run: concatenate along the batch axis, run once, split the outputs back.

A Triton python-backend model with dynamic batching receives N requests in one ``execute`` and must answer N
(Triton does not concatenate them for python models). :func:`run_merged` does what Triton's own backends do:
requests whose tensors agree in everything but the row count share one run; each gets its own rows back in order.
A request whose tensors do not fit gets an error of its own; the others are still answered.

Tensors are numpy arrays (onnxruntime) or torch tensors on any device (the torch models: a GPU tensor is
concatenated and split on the GPU, without a trip through host memory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["BatchInputError", "Feeds", "row_count", "run_merged"]

Feeds = Mapping[str, np.ndarray]
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class BatchInputError(ValueError):
    """One request's tensors disagree on the row count (axis 0), or the model's outputs cannot be split by rows."""


def row_count(feeds: Feeds) -> int:
    """The shared leading-axis size of ``feeds``; raises :class:`BatchInputError` naming the tensors otherwise."""
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}
    if not shapes or any(len(shape) == 0 for shape in shapes.values()):
        raise BatchInputError(f"every input needs a leading batch axis, got shapes {shapes}")
    rows = {shape[0] for shape in shapes.values()}
    if len(rows) != 1:
        raise BatchInputError(f"inputs disagree on the batch size (axis 0): {shapes}")
    return rows.pop()


def _dtype(value: Any) -> str:
    return value.dtype.str if isinstance(value, np.ndarray) else f"{value.dtype}@{value.device}"


def _signature(feeds: Feeds) -> tuple:
    """What must match for two requests to be concatenated: names, dtypes (and device) and every axis but the
    first."""
    return tuple(sorted((name, _dtype(v), tuple(v.shape[1:])) for name, v in feeds.items()))


def _concat(values: list[Any]) -> Any:
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values, axis=0)
    import torch

    return torch.cat(values, dim=0)


def _split_rows(value: Any, rows: Sequence[int]) -> list[Any]:
    if isinstance(value, np.ndarray):
        return np.split(value, np.cumsum(rows)[:-1])
    return list(value.split(list(rows)))  # torch: views of the merged output, on its device


def _split(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, value in outputs.items():
        if len(value.shape) == 0 or value.shape[0] != total:
            shape = tuple(value.shape)
            raise BatchInputError(f"output {name!r} has shape {shape}, not {total} rows: cannot split it")
    per_output = {name: _split_rows(value, rows) for name, value in outputs.items()}
    return [{name: parts[i] for name, parts in per_output.items()} for i in range(len(rows))]


def _run_group(run: Runner, group: list[tuple[int, Feeds, int]], answers: list) -> None:
    """Run one group of compatible requests (index, feeds, rows) as one call, writing into ``answers``."""
    if len(group) == 1:  # nothing to merge: no copies
        index, feeds, _ = group[0]
        try:
            answers[index] = run(dict(feeds))
        except Exception as exc:  # handed back as this request's error
            answers[index] = exc
        return
    names = list(group[0][1])
    merged = {name: _concat([feeds[name] for _, feeds, _ in group]) for name in names}
    try:
        parts = _split(run(merged), [rows for _, _, rows in group])
    except Exception:  # one request may be at fault: answer each alone, so only it fails
        for member in group:
            _run_group(run, [member], answers)
        return
    for (index, _, _), part in zip(group, parts, strict=True):
        answers[index] = part


def run_merged(run: Runner, requests: Sequence[Feeds]) -> list[dict[str, np.ndarray] | Exception]:
    """Answer ``requests`` (``{input name: array [rows_i, ...]}`` each) with as few calls of ``run`` as possible.

    Requests with the same input names, dtypes and non-batch axes are concatenated along axis 0 (in arrival
    order) into one call; the outputs (each ``[Σ rows_i, ...]``) are split back by rows. Returns, per request and
    in order, its outputs or the exception that answers it: :class:`BatchInputError` when its tensors disagree on
    the row count, or whatever ``run`` raised for it. When a merged call fails, its members are retried one by
    one, so a failure stays with the request that caused it.
    """
    answers: list[dict[str, np.ndarray] | Exception | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, Feeds, int]]] = {}
    for index, feeds in enumerate(requests):
        try:
            rows = row_count(feeds)
        except BatchInputError as exc:
            answers[index] = exc
            continue
        groups.setdefault(_signature(feeds), []).append((index, feeds, rows))
    for group in groups.values():
        _run_group(run, group, answers)
    return answers  # type: ignore[return-value]  # every slot is filled above
