import json
from pathlib import Path

import numpy as np
import pytest

from nirvana_dev.shapes.judge import Judge, JudgeFormatError, attribute_correct, train_judge
from nirvana_dev.shapes.scenes import ATTRIBUTES, Scene, make_dataset
from nirvana_quality.metrics import attribute_accuracy

CHANCE = {name: 1 / len(values) for name, values in ATTRIBUTES.items()}


@pytest.fixture(scope="module")
def toy() -> tuple[Judge, dict]:
    """A judge trained for seconds: far from the full run's accuracy, clearly above chance."""
    return train_judge(seed=0, steps=80, batch_size=32, progress=False, held_out=200)


@pytest.fixture(scope="module")
def unseen() -> tuple[np.ndarray, list[Scene]]:
    data = make_dataset(300, seed=12345)  # a seed the trainer's streams never use
    return data.images, data.scenes


def test_toy_judge_is_clearly_better_than_chance_on_unseen_renders(toy, unseen) -> None:
    judge, _ = toy
    images, scenes = unseen
    accuracy = attribute_accuracy(judge.predict(images), scenes)
    assert accuracy["mean"] >= 0.6, accuracy
    for name in ("size", "position", "background"):  # the easy ones, learned in the first few dozen steps
        assert accuracy[name] >= CHANCE[name] + 0.3, (name, accuracy)


def test_report_has_held_out_accuracy_clean_and_degraded(toy) -> None:
    _, report = toy
    assert report["steps"] == 80 and report["stopped_by"] == "steps"
    for key in ("clean_accuracy", "degraded_accuracy"):
        assert set(report[key]) == set(ATTRIBUTES)
        assert all(0.0 <= value <= 1.0 for value in report[key].values())
    assert report["clean_mean"] > sum(CHANCE.values()) / len(CHANCE) + 0.2
    assert report["train_seconds"] > 0


def test_predict_names_a_valid_value_per_attribute_and_matches_probabilities(toy, unseen) -> None:
    judge, _ = toy
    images, _ = unseen
    predictions = judge.predict(images[:5])
    probabilities = judge.probabilities(images[:5])
    assert len(predictions) == 5
    for name, values in ATTRIBUTES.items():
        assert probabilities[name].shape == (5, len(values))
        np.testing.assert_allclose(probabilities[name].sum(axis=1), 1.0, rtol=1e-5)
        assert [p[name] for p in predictions] == [values[i] for i in probabilities[name].argmax(axis=1)]


def test_prediction_of_an_image_does_not_depend_on_its_batch(toy, unseen) -> None:
    judge, _ = toy
    images, _ = unseen  # 300 images: more than one internal batch
    whole = judge.probabilities(images)
    parts = [judge.probabilities(images[i : i + 7]) for i in range(0, len(images), 7)]
    for name in ATTRIBUTES:
        np.testing.assert_allclose(np.concatenate([p[name] for p in parts]), whole[name], atol=1e-5)
    assert judge.predict(images[:0]) == []


def test_predict_rejects_images_that_are_not_uint8_64x64_rgb(toy, unseen) -> None:
    judge, _ = toy
    images, _ = unseen
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(images[:2].astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(images[0])


def test_save_load_round_trip_gives_identical_predictions(toy, unseen, tmp_path: Path) -> None:
    judge, _ = toy
    images, _ = unseen
    loaded = Judge.load(judge.save(tmp_path / "judge"))
    before, after = judge.probabilities(images), loaded.probabilities(images)
    for name in ATTRIBUTES:
        np.testing.assert_array_equal(before[name], after[name])


def test_load_of_a_missing_or_empty_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        Judge.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        Judge.load(tmp_path / "empty")


def test_load_of_an_incompatible_folder_names_the_path(toy, tmp_path: Path) -> None:
    judge, _ = toy
    folder = judge.save(tmp_path / "judge")
    config = json.loads((folder / "judge.json").read_text())

    (folder / "judge.json").write_text(json.dumps({**config, "width": config["width"] * 2}))
    with pytest.raises(JudgeFormatError, match=str(folder)):
        Judge.load(folder)  # weights of one width, config of another

    (folder / "judge.json").write_text(json.dumps({**config, "version": 999}))
    with pytest.raises(JudgeFormatError, match=str(folder)):
        Judge.load(folder)

    (folder / "judge.json").write_text(json.dumps({**config, "attributes": {"colour": ["red", "blue"]}}))
    with pytest.raises(JudgeFormatError, match=str(folder)):
        Judge.load(folder)

    (folder / "judge.json").write_text(json.dumps(config))
    (folder / "judge.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(JudgeFormatError, match=str(folder)):
        Judge.load(folder)


def test_training_is_reproducible_from_its_seed(unseen) -> None:
    images, _ = unseen
    first, second = (train_judge(seed=3, steps=3, batch_size=8, progress=False, held_out=8)[0] for _ in range(2))
    a, b = first.probabilities(images[:20]), second.probabilities(images[:20])
    for name in ATTRIBUTES:
        np.testing.assert_array_equal(a[name], b[name])


def test_max_seconds_stops_training_before_the_step_budget() -> None:
    _, report = train_judge(steps=100_000, batch_size=8, progress=False, max_seconds=1.0, held_out=8)
    assert report["stopped_by"] == "max_seconds"
    assert 0 < report["steps"] < 100_000


def test_attribute_correct_compares_each_attribute() -> None:
    scene = Scene(colour="red", shape="circle", size="small", position="top left", background="white")
    predicted = {**scene.attributes(), "colour": "orange", "size": "large"}
    assert attribute_correct(predicted, scene) == {
        "colour": False,
        "shape": True,
        "size": False,
        "position": True,
        "background": True,
    }
    with pytest.raises(ValueError, match="lacks attributes"):
        attribute_correct({"colour": "red"}, scene)
