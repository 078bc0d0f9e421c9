"""Pair workload: deterministic, stratified, and each relation means what it says."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nirvana_dev.shapes.scenes import ATTRIBUTE_NAMES, ShapesDataset
from nirvana_quality.cli import app as quality_app
from nirvana_quality.workload import RELATIONS, SPLITS, Pair, make_pairs


def test_same_seed_same_pairs_and_another_seed_differs() -> None:
    assert make_pairs(40, seed=3) == make_pairs(40, seed=3)
    assert [p.new_prompt for p in make_pairs(40, seed=3)] != [p.new_prompt for p in make_pairs(40, seed=4)]


def test_proportions_and_splits_cover_every_relation_and_near_miss_attribute() -> None:
    pairs = make_pairs(200, seed=0)
    assert [p.index for p in pairs] == list(range(200))
    assert Counter(p.relation for p in pairs) == {"paraphrase": 90, "near_miss": 90, "unrelated": 20}
    for split in SPLITS:
        chosen = [p for p in pairs if p.split == split]
        assert len(chosen) == 100
        assert {p.relation for p in chosen} == set(RELATIONS)
        attributes = Counter(p.attribute for p in chosen if p.relation == "near_miss")
        assert set(attributes) == set(ATTRIBUTE_NAMES)
        assert max(attributes.values()) - min(attributes.values()) <= 1
        assert Counter(p.minimal_edit for p in chosen if p.relation == "near_miss")[True] >= 20
    assert len({p.seed for p in pairs}) == 200


def test_each_relation_changes_exactly_what_it_names() -> None:
    for pair in make_pairs(120, seed=1):
        a, b = pair.cached_scene.attributes(), pair.new_scene.attributes()
        changed = [name for name in a if a[name] != b[name]]
        if pair.relation == "paraphrase":
            assert changed == [] and pair.new_prompt != pair.cached_prompt
        elif pair.relation == "near_miss":
            assert changed == [pair.attribute]
            assert (pair.cached_value, pair.new_value) == (a[pair.attribute], b[pair.attribute])
        else:
            assert changed and pair.attribute is None


def test_minimal_edit_near_misses_keep_the_caption_but_the_changed_words() -> None:
    minimal = [p for p in make_pairs(200, seed=2) if p.minimal_edit]
    assert minimal
    for pair in minimal:
        a, b = pair.cached_prompt.split(), pair.new_prompt.split()
        assert len(a) - len(set(a) & set(b)) <= 3, (pair.cached_prompt, pair.new_prompt)
        assert pair.cached_prompt != pair.new_prompt


def test_round_trip_through_dict() -> None:
    pairs = make_pairs(10, seed=5)
    assert [Pair.from_dict(p.to_dict()) for p in pairs] == pairs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count must be >= 1"),
        ({"count": 5, "proportions": {"duplicate": 1.0}}, "unknown relations"),
        ({"count": 5, "proportions": {"paraphrase": 0.0}}, "positive sum"),
        ({"count": 5, "heldout_fraction": 1.5}, "heldout_fraction"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_pairs(**kwargs)


def test_cli_dataset_writes_images_captions_and_a_preview(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    result = CliRunner().invoke(quality_app, ["dataset", "--out", str(out), "--count", "8", "--preview", "4"])
    assert result.exit_code == 0, result.output
    data = ShapesDataset.load(out)
    assert len(data) == 8 and data.images.shape == (8, 64, 64, 3)
    assert (out / "preview.png").read_bytes()[:4] == b"\x89PNG"
