"""A growable matrix of vectors searched exactly: a small partition's rows, or a large one's recent "tail"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    id: int
    similarity: float


class ExactRows:
    """Growable matrix of rows with O(1) delete (swap with last)."""

    def __init__(self, dim: int) -> None:
        self.vectors = np.zeros((64, dim), np.float32)
        self.ids = np.zeros(64, np.int64)
        self.pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.pos)

    def add(self, row_id: int, vector: np.ndarray) -> None:
        n = len(self.pos)
        if n == len(self.ids):
            self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
            self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])
        self.vectors[n] = vector
        self.ids[n] = row_id
        self.pos[row_id] = n

    def remove(self, row_id: int) -> bool:
        at = self.pos.pop(row_id, None)
        if at is None:
            return False
        last = len(self.pos)
        if at != last:
            self.vectors[at] = self.vectors[last]
            self.ids[at] = self.ids[last]
            self.pos[int(self.ids[at])] = at
        return True

    def top(self, query: np.ndarray, k: int) -> list[Match]:
        n = len(self.pos)
        if n == 0:
            return []
        scores = self.vectors[:n] @ query
        at = [int(np.argmax(scores))] if k == 1 else np.argpartition(-scores, min(k, n) - 1)[:k]
        return [Match(int(self.ids[i]), float(scores[i])) for i in at]

    def take_all(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.pos)
        return self.ids[:n].copy(), self.vectors[:n].copy()

    def add_many(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Rows new to this matrix, in bulk (a restored snapshot)."""
        for row_id, vector in zip(ids.tolist(), vectors, strict=True):
            self.add(row_id, vector)

    def vector(self, row_id: int) -> np.ndarray | None:
        at = self.pos.get(row_id)
        return None if at is None else self.vectors[at].copy()
