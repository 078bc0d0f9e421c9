"""How close a cached generation is to the uncached one, by a scorer chosen by name (higher is closer).

``ssim`` and ``psnr`` compare the cached image of B with the uncached image of B from the same seed (scikit-image,
installed by the ``quality`` extra and imported only when a scorer is made). Other packages add scorers through the
``nirvana.scorers`` entry point group (a factory taking the checkpoint folder), or :func:`register_scorer` in
process: the research package declares ``judge`` (the shapes model's attribute judge) that way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

__all__ = ["SCORERS", "Scorer", "ScorerError", "make_scorer", "register_scorer"]

PSNR_CAP_DB = 60.0  # identical images have infinite PSNR; this is far above anything a person could tell apart


class ScorerError(ValueError):
    """A scorer cannot be made (unknown name, missing extra, or a checkpoint it does not fit); says what to do."""


class Scorer(ABC):
    """Scores a batch of cached images against the uncached ones (uint8 ``[B, H, W, 3]`` each): ``[B]`` floats."""

    name: str
    unit: str = ""
    default_min: float  # the fidelity a cached image should keep on average, unless the user sets another

    @abstractmethod
    def score(self, cached: np.ndarray, uncached: np.ndarray) -> list[float]: ...


def _skimage_metrics() -> object:
    try:
        from skimage import metrics
    except ImportError:
        raise ScorerError(
            "the ssim and psnr scorers need scikit-image: pip install 'nirvana-triton[quality]'"
        ) from None
    return metrics


class SsimScorer(Scorer):
    """Structural similarity (mean over channels, 7×7 window): 1.0 when identical."""

    name, unit, default_min = "ssim", "", 0.9

    def __init__(self) -> None:
        self._metrics = _skimage_metrics()

    def score(self, cached: np.ndarray, uncached: np.ndarray) -> list[float]:
        ssim = self._metrics.structural_similarity  # type: ignore[attr-defined]
        return [float(ssim(a, b, channel_axis=-1, data_range=255)) for a, b in zip(cached, uncached, strict=True)]


class PsnrScorer(Scorer):
    """Peak signal-to-noise ratio in dB (peak 255), capped at :data:`PSNR_CAP_DB` for identical images."""

    name, unit, default_min = "psnr", " dB", 25.0

    def __init__(self) -> None:
        self._metrics = _skimage_metrics()

    def score(self, cached: np.ndarray, uncached: np.ndarray) -> list[float]:
        psnr = self._metrics.peak_signal_noise_ratio  # type: ignore[attr-defined]
        out = []
        for a, b in zip(cached, uncached, strict=True):
            value = PSNR_CAP_DB if np.array_equal(a, b) else float(psnr(b, a, data_range=255))
            out.append(min(PSNR_CAP_DB, value) if math.isfinite(value) else PSNR_CAP_DB)
        return out


# name -> factory(checkpoint folder) -> Scorer
SCORERS: dict[str, Callable[[Path], Scorer]] = {"ssim": lambda _: SsimScorer(), "psnr": lambda _: PsnrScorer()}
ENTRY_POINTS = "nirvana.scorers"


def register_scorer(name: str, factory: Callable[[Path], Scorer]) -> None:
    """Make ``factory`` available as ``--scorer name``."""
    SCORERS[name] = factory


def make_scorer(name: str, checkpoint_dir: str | Path) -> Scorer:
    """The scorer registered as ``name`` (here or as an entry point) for the checkpoint in ``checkpoint_dir``;
    ScorerError names the choices, or the extra a plugin's imports need."""
    plugins = {point.name: point for point in entry_points(group=ENTRY_POINTS)}
    if name in SCORERS:
        return SCORERS[name](Path(checkpoint_dir))
    if name not in plugins:
        raise ScorerError(f"scorer {name!r} is not available; choose one of {sorted({*SCORERS, *plugins})}")
    try:
        factory = plugins[name].load()
    except ImportError as err:
        raise ScorerError(f"scorer {name!r} cannot be loaded ({err}): pip install 'nirvana-triton[quality]'") from None
    return factory(Path(checkpoint_dir))
