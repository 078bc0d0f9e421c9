"""The pairs a workload makes, as the cache would make them: each prompt and its nearest earlier prompt.

Replaying a workload in order, prompt i can only hit a prompt served before it; under the serving embedder its
best candidate is the earlier prompt of highest cosine similarity. Those pairs are spread over similarity bands and
sampled evenly across them (round-robin from the top band down), so the rare high-similarity pairs, where the large
Ks are decided, are not crowded out by the many unrelated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nirvana.embed import Embedder

__all__ = ["BAND_EDGES", "WorkloadPair", "band_edges", "band_of", "nearest_earlier", "sample_pairs"]

# Cosine-similarity band edges per embedder (the last band is closed, so 1.0 lands in it): the research harness's
# bins (``nirvana_quality.evaluate.SIMILARITY_BINS``). CLIP text embeddings crowd near 1, so its bands are finer there.
BAND_EDGES = {
    "minilm": (-1.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0),
    "clip": (-1.0, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0),
}


def band_edges(embedder_name: str) -> tuple[float, ...]:
    """Band edges for an embedder (``clip`` for any CLIP-like name, else ``minilm``'s)."""
    return BAND_EDGES["clip" if embedder_name.startswith("clip") else "minilm"]


def band_of(similarity: float, edges: Sequence[float]) -> int:
    """Index of the band ``[edges[i], edges[i+1])`` holding ``similarity`` (the top band includes 1.0)."""
    return min(max(int(np.searchsorted(edges, similarity, side="right")) - 1, 0), len(edges) - 2)


@dataclass(frozen=True)
class WorkloadPair:
    """Cached prompt A (``cached_index`` in the workload) and new prompt B (``index``), B's seed, their cosine."""

    index: int
    cached_index: int
    cached_prompt: str
    new_prompt: str
    seed: int
    similarity: float
    band: int

    def to_dict(self) -> dict:
        return asdict(self)


def nearest_earlier(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit vectors ``[n, d]``: the index of each row's most similar earlier row, and that cosine (``[n-1]``
    each, for rows 1..n-1)."""
    cosine = vectors @ vectors.T
    cosine[np.triu_indices(len(vectors))] = -np.inf  # only earlier prompts (j < i) are candidates
    nearest = cosine[1:].argmax(axis=1)
    return nearest, cosine[np.arange(1, len(vectors)), nearest]


def sample_pairs(
    prompts: Sequence[str], seeds: Sequence[int], embedder: Embedder, max_pairs: int, seed: int = 0
) -> list[WorkloadPair]:
    """Up to ``max_pairs`` nearest-earlier pairs of ``prompts`` (in replay order), balanced over similarity bands:
    each round takes one more random pair from every band that has one left, from the top band down."""
    if len(prompts) < 2:
        raise ValueError(f"a workload needs at least 2 prompts to make a pair, got {len(prompts)}")
    edges = band_edges(embedder.name)
    nearest, similarity = nearest_earlier(embedder.embed(list(prompts)))
    by_band: dict[int, list[int]] = {}
    for i, s in enumerate(similarity, start=1):
        by_band.setdefault(band_of(float(s), edges), []).append(i)
    rng = np.random.default_rng(seed)
    queues = {b: [int(i) for i in rng.permutation(members)] for b, members in by_band.items()}
    chosen: list[int] = []
    while len(chosen) < max_pairs and any(queues.values()):
        for band in sorted(queues, reverse=True):
            if queues[band] and len(chosen) < max_pairs:
                chosen.append(queues[band].pop())
    return [
        WorkloadPair(
            index=i,
            cached_index=int(nearest[i - 1]),
            cached_prompt=prompts[int(nearest[i - 1])],
            new_prompt=prompts[i],
            seed=int(seeds[i]),
            similarity=float(similarity[i - 1]),
            band=band_of(float(similarity[i - 1]), edges),
        )
        for i in sorted(chosen)
    ]
