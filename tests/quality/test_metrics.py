import math

import numpy as np
import pytest

from nirvana_dev.shapes.scenes import Scene, render
from nirvana_quality.metrics import attribute_accuracy, psnr, ssim

SCENE = Scene(colour="red", shape="circle", size="large", position="centre", background="white")


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return render(SCENE)


def test_identical_images_are_perfectly_similar(picture: np.ndarray) -> None:
    assert ssim(picture, picture.copy()) == pytest.approx(1.0)
    assert psnr(picture, picture.copy()) == math.inf


def test_psnr_of_a_uniform_offset_matches_the_formula(picture: np.ndarray) -> None:
    darker = picture.astype(np.int16) - 10
    assert darker.min() >= 0  # the scene has no channel below 10, so the offset is exact everywhere
    assert psnr(picture, darker.astype(np.uint8)) == pytest.approx(10 * math.log10(255**2 / 10**2))


def test_similarity_orders_shifted_below_identical_and_inverted_below_shifted(picture: np.ndarray) -> None:
    shifted = np.roll(picture, shift=(3, 3), axis=(0, 1))
    inverted = 255 - picture
    assert 1.0 > ssim(picture, shifted) > 0.5 > ssim(picture, inverted)
    assert math.inf > psnr(picture, shifted) > psnr(picture, inverted)
    assert psnr(picture, inverted) < 10  # nearly every pixel is off by most of the range


def test_more_noise_means_lower_ssim_and_psnr(picture: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=picture.shape)
    mild, strong = ((picture + sigma * noise).clip(0, 255).astype(np.uint8) for sigma in (4, 40))
    assert ssim(picture, mild) > ssim(picture, strong)
    assert psnr(picture, mild) > psnr(picture, strong)
    assert ssim(picture, mild) == pytest.approx(ssim(mild, picture))


def test_metrics_reject_mismatched_or_non_uint8_images(picture: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(picture, picture[:32])
    with pytest.raises(ValueError, match="uint8"):
        psnr(picture, picture.astype(np.float32))


def test_attribute_accuracy_counts_each_attribute_and_exact_matches() -> None:
    other = Scene(colour="blue", shape="square", size="small", position="top left", background="black")
    predictions = [SCENE.attributes(), {**other.attributes(), "colour": "purple"}]
    accuracy = attribute_accuracy(predictions, [SCENE, other])
    assert accuracy["colour"] == 0.5
    assert all(accuracy[name] == 1.0 for name in ("shape", "size", "position", "background"))
    assert accuracy["mean"] == pytest.approx(0.9)
    assert accuracy["exact"] == 0.5


def test_attribute_accuracy_rejects_mismatched_or_incomplete_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 scenes"):
        attribute_accuracy([SCENE.attributes()] * 2, [SCENE])
    with pytest.raises(ValueError, match="lacks attributes"):
        attribute_accuracy([{"colour": "red"}], [SCENE])
