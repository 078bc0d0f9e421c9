"""Prompt pairs for measuring the approximate cache: a cached prompt A, a new prompt B, and how they relate.

Relations (what a cache hit of B on A's latent risks):

* ``paraphrase`` — the same scene, a different caption: a hit should change nothing the judge can see;
* ``near_miss`` — one attribute changed (``attribute``, A's value ``cached_value``, B's ``new_value``): a hit at
  too large a K shows A's value instead of B's (a *leak*). Half of them (``minimal_edit``) caption B with A's
  template and synonyms, swapping only the changed words — the most similar, and most dangerous, near misses;
  the rest caption B freely;
* ``unrelated`` — an independent random scene: it should never hit.

Each pair carries one seed, used for A and B alike (the cache stores A's latent from A's seed; comparing B cached
with B uncached at the same seed isolates what the cache changes). Pairs are split into ``calibration`` (to fit the
thresholds) and ``heldout`` (to check them), stratified so that both splits hold every relation and every
near-miss attribute. Same arguments, same pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nirvana_dev.shapes.scenes import ATTRIBUTE_NAMES, Scene, caption, near_miss, sample_scene

__all__ = ["DEFAULT_PROPORTIONS", "RELATIONS", "SPLITS", "Pair", "make_pairs"]

RELATIONS = ("paraphrase", "near_miss", "unrelated")
SPLITS = ("calibration", "heldout")
# Mostly pairs a cache can get wrong in an interesting way; a few unrelated ones anchor the low-similarity end.
DEFAULT_PROPORTIONS: Mapping[str, float] = {"paraphrase": 0.45, "near_miss": 0.45, "unrelated": 0.10}
_SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class Pair:
    """Cached prompt A, new prompt B, their scenes and relation; near misses name the changed attribute."""

    index: int
    relation: str
    split: str
    seed: int
    cached_prompt: str
    new_prompt: str
    cached_scene: Scene
    new_scene: Scene
    attribute: str | None = None  # near_miss only: the attribute B changes
    cached_value: str | None = None  # A's value of it
    new_value: str | None = None  # B's value of it
    minimal_edit: bool = False  # near_miss only: B's caption is A's with just the changed words swapped

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation={self.relation!r} is not one of {RELATIONS}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not one of {SPLITS}")
        if (self.relation == "near_miss") != (self.attribute is not None):
            raise ValueError(f"pair {self.index}: attribute={self.attribute!r} must be set exactly for near misses")

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "relation": self.relation,
            "split": self.split,
            "seed": self.seed,
            "cached_prompt": self.cached_prompt,
            "new_prompt": self.new_prompt,
            "cached_scene": self.cached_scene.attributes(),
            "new_scene": self.new_scene.attributes(),
            "attribute": self.attribute,
            "cached_value": self.cached_value,
            "new_value": self.new_value,
            "minimal_edit": self.minimal_edit,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Pair:
        fields = dict(data)
        fields["cached_scene"] = Scene(**fields["cached_scene"])
        fields["new_scene"] = Scene(**fields["new_scene"])
        return cls(**{k: fields[k] for k in cls.__dataclass_fields__ if k in fields})


def _counts(count: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Split ``count`` by ``proportions`` by largest remainders."""
    unknown = sorted(set(proportions) - set(RELATIONS))
    if unknown:
        raise ValueError(f"proportions name unknown relations {unknown}; use {RELATIONS}")
    if any(v < 0 for v in proportions.values()) or sum(proportions.values()) <= 0:
        raise ValueError(f"proportions must be >= 0 with a positive sum, got {dict(proportions)}")
    total = sum(proportions.values())
    exact = {r: count * proportions.get(r, 0.0) / total for r in RELATIONS}
    counts = {r: int(v) for r, v in exact.items()}
    for r in sorted(RELATIONS, key=lambda r: counts[r] - exact[r])[: count - sum(counts.values())]:
        counts[r] += 1
    return counts


def _twin(state: dict) -> np.random.Generator:
    """A generator in ``state``: captioning B from A's caption state reuses A's template and synonym draws."""
    twin = np.random.default_rng()
    twin.bit_generator.state = state
    return twin


def _is_heldout(position: int, heldout_fraction: float) -> bool:
    # Spreads heldout positions evenly (Bresenham) through the pairs, generated relation by relation, so every
    # relation and, as 5 attributes cycle against 2 splits, every near-miss attribute lands in both splits.
    return int((position + 1) * heldout_fraction) > int(position * heldout_fraction)


def make_pairs(
    count: int,
    seed: int = 0,
    proportions: Mapping[str, float] = DEFAULT_PROPORTIONS,
    heldout_fraction: float = 0.5,
) -> list[Pair]:
    """``count`` pairs in a shuffled order; near misses cycle through all five attributes.

    Deterministic in all arguments. The ``index`` of a pair is its position in the returned list.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    attribute_offset = int(rng.integers(len(ATTRIBUTE_NAMES)))
    drafts: list[dict] = []
    for relation, n in _counts(count, proportions).items():
        for position in range(n):
            scene = sample_scene(rng)
            caption_state = rng.bit_generator.state
            a_prompt = caption(scene, rng)
            draft: dict = {"relation": relation, "cached_prompt": a_prompt, "cached_scene": scene}
            if relation == "paraphrase":
                draft.update(new_scene=scene, new_prompt=caption(scene, rng, avoid=a_prompt))
            elif relation == "near_miss":
                attribute = ATTRIBUTE_NAMES[(position + attribute_offset) % len(ATTRIBUTE_NAMES)]
                other = near_miss(scene, attribute, rng)
                minimal = (position // 10) % 2 == 0
                draft.update(
                    new_scene=other,
                    new_prompt=caption(other, _twin(caption_state) if minimal else rng),
                    minimal_edit=minimal,
                    attribute=attribute,
                    cached_value=getattr(scene, attribute),
                    new_value=getattr(other, attribute),
                )
            else:
                other = sample_scene(rng)
                while other == scene:
                    other = sample_scene(rng)
                draft.update(new_scene=other, new_prompt=caption(other, rng))
            draft["split"] = "heldout" if _is_heldout(len(drafts), heldout_fraction) else "calibration"
            draft["seed"] = int(rng.integers(_SEED_MAX))
            drafts.append(draft)
    order = rng.permutation(len(drafts))
    return [Pair(index=i, **drafts[j]) for i, j in enumerate(order)]
