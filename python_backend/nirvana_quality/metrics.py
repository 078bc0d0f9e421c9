"""Image-similarity metrics (SSIM, PSNR) between a cached and an uncached generation, and the judge's accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nirvana_dev.shapes.judge import attribute_correct
from nirvana_dev.shapes.scenes import ATTRIBUTES, Scene

__all__ = ["attribute_accuracy", "psnr", "ssim"]


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    for name, image in (("a", a), ("b", b)):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = (getattr(image, "dtype", type(image).__name__), getattr(image, "shape", None))
            raise ValueError(f"{name} must be a uint8 [H, W, 3] image, got {got[0]} {got[1]}")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 ``[H, W, 3]`` images (mean over channels, 7×7 window): 1.0 when equal."""
    _check_pair(a, b)
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 ``[H, W, 3]`` images (peak 255).

    Identical images have zero error and return ``float('inf')``; callers averaging PSNR over pairs must decide
    how to count those (e.g. report them separately or cap them).
    """
    _check_pair(a, b)
    if np.array_equal(a, b):
        return float("inf")  # skimage would divide by zero (with a RuntimeWarning) to get the same answer
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def attribute_accuracy(predictions: Sequence[dict[str, str]], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction right per attribute, their ``"mean"``, and ``"exact"``: the fraction with every attribute right."""
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} predictions but {len(scenes)} scenes")
    if not scenes:
        raise ValueError("attribute accuracy of no images is undefined")
    correct = [attribute_correct(p, s) for p, s in zip(predictions, scenes, strict=True)]
    accuracy = {name: float(np.mean([row[name] for row in correct])) for name in ATTRIBUTES}
    accuracy["mean"] = float(np.mean(list(accuracy.values())))
    accuracy["exact"] = float(np.mean([all(row.values()) for row in correct]))
    return accuracy
