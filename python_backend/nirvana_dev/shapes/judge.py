"""The judge: a small CNN that reads a shapes image back into its attributes (one classification head each).

It scores images a small latent diffusion model generates, which are blurrier, noisier and colour-shifted compared
with :func:`~nirvana_dev.shapes.scenes.render`. So it is trained on fresh renders passed through :func:`degrade`
(Gaussian blur, down-up scaling, additive and blotchy noise, brightness / colour jitter) — strong enough to
survive generation artefacts, mild enough that near-miss values (red vs orange, small vs large) stay apart.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from nirvana_dev.shapes.scenes import ATTRIBUTES, IMAGE_SIZE, Scene, render, sample_scene

__all__ = ["Judge", "JudgeFormatError", "attribute_correct", "degrade", "train_judge"]

FORMAT = "nirvana-judge"
FORMAT_VERSION = 1
_WEIGHTS = "judge.safetensors"
_CONFIG = "judge.json"
_PREDICT_BATCH = 256


class JudgeFormatError(ValueError):
    """A judge folder exists but its files do not describe a judge this code can load."""


class _Net(nn.Module):
    """``[B, 3, 64, 64]`` float in ``[0, 1]`` → one logit vector ``[B, n_values]`` per attribute."""

    def __init__(self, attributes: dict[str, tuple[str, ...]], width: int) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int, kernel: int = 3) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(3, w, 2, kernel=5),  # 32×32
            *block(w, w, 1),
            *block(w, 2 * w, 2),  # 16×16
            *block(2 * w, 2 * w, 1),
            *block(2 * w, 4 * w, 2),  # 8×8
            *block(4 * w, 4 * w, 2),  # 4×4: flattened below, so position stays readable
            nn.Flatten(),
            nn.Linear(4 * w * 16, 4 * w),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(values)) for name, values in attributes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x - 0.5)
        return {name: head(h) for name, head in self.heads.items()}


class Judge:
    """Attribute classifier for ``[B, 64, 64, 3]`` uint8 images; see :func:`train_judge` and :meth:`load`."""

    def __init__(self, net: _Net, attributes: dict[str, tuple[str, ...]], width: int) -> None:
        self._net = net.eval()
        self.attributes = {name: tuple(values) for name, values in attributes.items()}
        self.width = width

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per attribute, ``[B, n_values]`` float32 probabilities (columns in the order of :attr:`attributes`)."""
        batch = _check_images(images)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.attributes}
        with torch.inference_mode():
            for start in range(0, len(batch), _PREDICT_BATCH):
                logits = self._net(_to_tensor(batch[start : start + _PREDICT_BATCH]))
                for name, value in logits.items():
                    chunks[name].append(value.softmax(dim=1).numpy())
        return {
            name: np.concatenate(parts) if parts else np.zeros((0, len(self.attributes[name])), np.float32)
            for name, parts in chunks.items()
        }

    def predict(self, images: np.ndarray) -> list[dict[str, str]]:
        """The most probable value of every attribute, one ``{attribute: value}`` per image."""
        indices = {name: p.argmax(axis=1) for name, p in self.probabilities(images).items()}
        return [{name: self.attributes[name][idx[i]] for name, idx in indices.items()} for i in range(len(images))]

    def save(self, path: Path) -> Path:
        """Write ``judge.safetensors`` and ``judge.json`` (format, version, width, attribute values) to ``path``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self._net.state_dict().items()}, str(out / _WEIGHTS))
        config = {"format": FORMAT, "version": FORMAT_VERSION, "width": self.width, "attributes": self.attributes}
        (out / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: Path) -> Judge:
        """A judge saved by :meth:`save`; ``FileNotFoundError`` / :class:`JudgeFormatError` name ``path``."""
        root = Path(path)
        for name in (_CONFIG, _WEIGHTS):
            if not (root / name).is_file():
                raise FileNotFoundError(f"not a judge folder (no {name}): {root}")
        try:
            config = json.loads((root / _CONFIG).read_text())
        except json.JSONDecodeError as error:
            raise JudgeFormatError(f"{root / _CONFIG} is not valid JSON: {error}") from error
        if not isinstance(config, dict) or (config.get("format"), config.get("version")) != (FORMAT, FORMAT_VERSION):
            raise JudgeFormatError(f"{root / _CONFIG}: expected format {FORMAT!r} version {FORMAT_VERSION}")
        attributes = {name: tuple(values) for name, values in config.get("attributes", {}).items()}
        if attributes != ATTRIBUTES:
            raise JudgeFormatError(f"{root}: judge attributes {attributes} differ from the dataset's {ATTRIBUTES}")
        net = _Net(attributes, int(config["width"]))
        try:
            net.load_state_dict(load_file(str(root / _WEIGHTS)))
        except Exception as error:  # safetensors header errors and state-dict mismatches alike
            raise JudgeFormatError(f"{root / _WEIGHTS}: weights do not fit the judge network: {error}") from error
        return cls(net, attributes, int(config["width"]))


def attribute_correct(predicted: dict[str, str], scene: Scene) -> dict[str, bool]:
    """``{attribute: predicted value == scene's value}`` for every attribute of ``scene``."""
    truth = scene.attributes()
    missing = sorted(set(truth) - set(predicted))
    if missing:
        raise ValueError(f"prediction {predicted} lacks attributes {missing}")
    return {name: predicted[name] == value for name, value in truth.items()}


def _check_images(images: np.ndarray) -> np.ndarray:
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        got = (getattr(images, "dtype", type(images).__name__), getattr(images, "shape", None))
        raise ValueError(f"images must be uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {got[0]} {got[1]}")
    return images


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → float ``[B, 3, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[B, C, H, W]`` with one ``sigma`` (pixels) per image."""
    b, c, h, w = x.shape
    taps = torch.arange(-5, 6, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, 11]
    y = F.pad(x.reshape(1, b * c, h, w), (5, 5, 5, 5), mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, generator: torch.Generator, clean_fraction: float = 0.0) -> torch.Tensor:
    """Random generation-like artefacts on ``x`` ``[B, 3, H, W]`` float in ``[0, 1]``; a ``clean_fraction`` stays.

    Per image: brightness ×[0.85, 1.15], channel gains ×[0.92, 1.08] and offsets ±0.05, saturation ×[0.75, 1.1];
    half are scaled down by 2–4× and back up (the VAE's 4× latent); blur σ ∈ [0, 1.8] px; additive noise
    σ ∈ [0, 0.06] plus blotchy 4×4-cell colour noise σ ∈ [0, 0.04].
    """
    b, _, h, w = x.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    keep = torch.rand(b, generator=generator) < clean_fraction
    y = x * uniform(0.85, 1.15, 1, 1, 1) * uniform(0.92, 1.08, 3, 1, 1) + uniform(-0.05, 0.05, 3, 1, 1)
    grey = y.mean(dim=1, keepdim=True)
    y = grey + (y - grey) * uniform(0.75, 1.1, 1, 1, 1)
    factors = torch.randint(1, 5, (b,), generator=generator)
    factors[torch.rand(b, generator=generator) < 0.5] = 1
    for factor in factors.unique().tolist():
        if factor > 1:
            rows = factors == factor
            small = F.interpolate(y[rows], size=(h // factor, w // factor), mode="bilinear", antialias=True)
            y[rows] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    y = _blur(y, uniform(0.0, 1.8))
    y = y + torch.randn(y.shape, generator=generator) * uniform(0.0, 0.06, 1, 1, 1)
    blotches = torch.randn(b, 3, 4, 4, generator=generator) * uniform(0.0, 0.04, 1, 1, 1)
    y = y + F.interpolate(blotches, size=(h, w), mode="bicubic", align_corners=False)
    return torch.where(keep[:, None, None, None], x, y.clamp(0.0, 1.0))


def _render_batch(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` fresh jittered renders, uint8 ``[count, 64, 64, 3]``, and label indices ``[count, n_attributes]``."""
    scenes = [sample_scene(rng) for _ in range(count)]
    images = np.stack([render(scene, rng) for scene in scenes])
    labels = np.array([[values.index(getattr(s, name)) for name, values in ATTRIBUTES.items()] for s in scenes])
    return images, labels


class _RenderPool:
    """Renders are slow next to a training step (1.5 ms each), so each step adds ``fresh`` new ones to a growing
    pool and samples its batch from the pool; augmentation makes every reuse a different picture."""

    def __init__(self, rng: np.random.Generator, initial: int, capacity: int) -> None:
        self._rng, self._capacity = rng, capacity
        self._images, self._labels = _render_batch(initial, rng)

    def batch(self, size: int, fresh: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        images, labels = _render_batch(fresh, self._rng)
        self._images = np.concatenate([self._images, images])[-self._capacity :]
        self._labels = np.concatenate([self._labels, labels])[-self._capacity :]
        rows = self._rng.integers(len(self._images), size=size)
        return self._images[rows], _label_tensors(self._labels[rows])


def _label_tensors(labels: np.ndarray) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(labels[:, i]) for i, name in enumerate(ATTRIBUTES)}


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _accuracy(judge: Judge, images: np.ndarray, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    probabilities = judge.probabilities(images)
    return {name: float((probabilities[name].argmax(axis=1) == labels[name].numpy()).mean()) for name in labels}


def _held_out_accuracy(
    judge: Judge, count: int, rng: np.random.Generator, generator: torch.Generator
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-attribute accuracy on ``count`` unseen renders as they are, and through :func:`degrade` (as uint8)."""
    images, label_array = _render_batch(count, rng)
    labels = _label_tensors(label_array)
    degraded = (degrade(_to_tensor(images), generator) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return _accuracy(judge, images, labels), _accuracy(judge, degraded, labels)


def train_judge(
    *,
    seed: int = 0,
    steps: int = 500,
    batch_size: int = 64,
    progress: bool = True,
    max_seconds: float | None = None,
    width: int = 24,
    held_out: int = 1000,
    device: str = "cpu",
) -> tuple[Judge, dict]:
    """Train a judge on fresh renders (80% degraded) for ``steps`` or ``max_seconds``, whichever ends first.

    The learning rate follows a cosine over the larger of the step and time fractions, so a run cut short by
    ``max_seconds`` still anneals. Renders and artefacts are made on the CPU, the net trains on ``device`` and is
    returned on the CPU. The report holds per-attribute accuracy on ``held_out`` unseen renders, clean
    (``clean_accuracy``) and through :func:`degrade` (``degraded_accuracy``), plus their means and timings.
    """
    if steps < 1 or batch_size < 1 or held_out < 1:
        raise ValueError(f"steps, batch_size and held_out must be >= 1, got {steps}, {batch_size}, {held_out}")
    train_rng, held_out_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]), _torch_threads(min(4, os.cpu_count() or 1)):
        torch.manual_seed(seed)
        net = _Net(ATTRIBUTES, width).to(device)
        optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        net.train()
        pool = _RenderPool(train_rng, initial=min(1024, 16 * batch_size), capacity=16384)
        bar = tqdm(total=steps, desc="judge", unit="step", disable=not progress)
        step, loss_value, fraction = 0, float("nan"), 0.0
        while fraction < 1.0:
            warmup = min(1.0, (step + 1) / 50)
            for group in optimiser.param_groups:
                group["lr"] = 3e-3 * warmup * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
            images, labels = pool.batch(batch_size, fresh=max(1, batch_size // 4))
            logits = net(degrade(_to_tensor(images), generator, clean_fraction=0.2).to(device))
            loss = sum(F.cross_entropy(logits[name], labels[name].to(device), label_smoothing=0.05) for name in labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step, loss_value = step + 1, loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            fraction = max(step / steps, (time.monotonic() - started) / max_seconds if max_seconds else 0.0)
        bar.close()
        train_seconds = time.monotonic() - started
        judge = Judge(net.cpu(), ATTRIBUTES, width)
        clean, degraded = _held_out_accuracy(judge, held_out, held_out_rng, torch.Generator().manual_seed(seed + 1))
    report = {
        "seed": seed,
        "steps": step,
        "batch_size": batch_size,
        "width": width,
        "stopped_by": "steps" if step >= steps else "max_seconds",
        "train_seconds": round(train_seconds, 2),
        "final_loss": loss_value,
        "held_out_images": held_out,
        "clean_accuracy": clean,
        "degraded_accuracy": degraded,
        "clean_mean": float(np.mean(list(clean.values()))),
        "degraded_mean": float(np.mean(list(degraded.values()))),
    }
    return judge, report
