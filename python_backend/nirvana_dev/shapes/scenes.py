"""Synthetic captioned shapes: a text-to-image task whose correctness a program can check.

Each image shows one shape on a plain background; a :class:`Scene` names its five attributes. Captions come from
many templates and synonyms, so one scene has true paraphrases ("a small red circle in the top left on a white
background" / "upper-left corner: a little crimson disc, pale backdrop"), and :func:`near_miss` changes exactly
one attribute ("... blue circle ..."). Everything is drawn from a ``numpy`` generator: same seed, same data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from string import Formatter

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "IMAGE_SIZE",
    "Scene",
    "ShapesDataset",
    "caption",
    "make_dataset",
    "near_miss",
    "render",
    "sample_scene",
    "vocabulary",
]

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # shapes are drawn at 4× and downsampled: smooth edges, like a real picture's

# Attribute values and the RGB / geometry each one means.
_COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 55, 175),
    "orange": (245, 135, 30),
}
_BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
_CENTRES = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "centre": (0.5, 0.5),
}
_RADII = {"small": 0.11, "large": 0.2}  # half-extent as a fraction of the image side
_SHAPES = ("circle", "square", "triangle")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(_COLOURS),
    "shape": _SHAPES,
    "size": tuple(_RADII),
    "position": tuple(_CENTRES),
    "background": tuple(_BACKGROUNDS),
}

# Words a caption may use for each value: the paraphrase space.
_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "green": ("green", "emerald", "grassy green"),
        "blue": ("blue", "azure", "cobalt"),
        "yellow": ("yellow", "lemon", "golden"),
        "purple": ("purple", "violet", "lilac"),
        "orange": ("orange", "amber", "tangerine"),
    },
    "shape": {
        "circle": ("circle", "disc", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "pyramid", "wedge"),
    },
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "position": {
        "top left": ("top left", "upper left", "top-left corner"),
        "top right": ("top right", "upper right", "top-right corner"),
        "bottom left": ("bottom left", "lower left", "bottom-left corner"),
        "bottom right": ("bottom right", "lower right", "bottom-right corner"),
        "centre": ("centre", "center", "middle"),
    },
    "background": {"white": ("white", "pale", "light"), "black": ("black", "dark", "night"), "gray": ("gray", "grey")},
}

_TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "{position}: a {size} {colour} {shape}, {background} backdrop",
    "{background} background with a {size} {colour} {shape} in the {position}",
    "picture of a {colour} {shape}, {size}, {position}, {background} background",
    "there is a {size} {shape} coloured {colour} in the {position} of a {background} canvas",
    "{size} {colour} {shape} placed in the {position}, {background} background",
    "on a {background} background, a {size} {colour} {shape} sits in the {position}",
    "an image of one {size} {colour} {shape} located in the {position} against {background}",
)


@dataclass(frozen=True)
class Scene:
    """One shape on a background: each field is a value of :data:`ATTRIBUTES`."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value not in ATTRIBUTES[name]:
                raise ValueError(f"scene {name}={value!r} is not one of {ATTRIBUTES[name]}")

    def attributes(self) -> dict[str, str]:
        return asdict(self)


ATTRIBUTE_NAMES = tuple(f.name for f in fields(Scene))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene."""
    return Scene(**{name: str(rng.choice(values)) for name, values in ATTRIBUTES.items()})


def caption(scene: Scene, rng: np.random.Generator, avoid: str | None = None) -> str:
    """A random template filled with random synonyms; ``avoid`` (an earlier caption) is never returned again."""
    for _ in range(100):
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        words = {name: str(rng.choice(_SYNONYMS[name][value])) for name, value in scene.attributes().items()}
        text = template.format(**words)
        if text != avoid:
            return text
    raise RuntimeError(f"no caption different from {avoid!r} after 100 draws")  # cannot happen: ≥ 8 templates


def near_miss(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """``scene`` with ``attribute`` changed to a different random value (everything else kept)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r} is not one of {tuple(ATTRIBUTES)}")
    current = getattr(scene, attribute)
    choices = [v for v in ATTRIBUTES[attribute] if v != current]
    return replace(scene, **{attribute: str(rng.choice(choices))})


def vocabulary() -> list[str]:
    """Every word a caption can contain (templates and synonyms), for building the tokenizer."""
    words: set[str] = set()
    for template in _TEMPLATES:
        literal = "".join(text for text, *_ in Formatter().parse(template))  # the words around the {slots}
        words.update(literal.replace(",", " ").replace(":", " ").split())
    for values in _SYNONYMS.values():
        for synonyms in values.values():
            for phrase in synonyms:
                words.update(phrase.replace("-", " ").split())
    return sorted(words)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, same height and base width as the square
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[size, size, 3]`` uint8 image of ``scene``; ``rng`` jitters position, size and tint a little."""
    jitter = (lambda scale: float(rng.uniform(-scale, scale))) if rng is not None else (lambda scale: 0.0)
    big = size * _SUPERSAMPLE
    background = tuple(int(np.clip(c + jitter(8), 0, 255)) for c in _BACKGROUNDS[scene.background])
    colour = tuple(int(np.clip(c + jitter(12), 0, 255)) for c in _COLOURS[scene.colour])
    fx, fy = _CENTRES[scene.position]
    cx, cy = (fx + jitter(0.04)) * big, (fy + jitter(0.04)) * big
    r = (_RADII[scene.size] + jitter(0.015)) * big
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    polygon = _polygon(scene.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(polygon, fill=colour)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


@dataclass
class ShapesDataset:
    """Images ``[n, H, W, 3]`` uint8 with their scenes and one caption each."""

    images: np.ndarray
    scenes: list[Scene]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.scenes)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``images.npy`` and ``captions.jsonl`` (caption + attributes per line) to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "images.npy", self.images)
        lines = (json.dumps({"caption": c, **s.attributes()}) for c, s in zip(self.captions, self.scenes, strict=True))
        (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> ShapesDataset:
        root = Path(path)
        for name in ("images.npy", "captions.jsonl"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"not a shapes dataset folder (no {name}): {root}")
        rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line]
        scenes = [Scene(**{k: row[k] for k in ATTRIBUTE_NAMES}) for row in rows]
        images = np.load(root / "images.npy")
        if len(images) != len(rows):
            raise ValueError(f"{root}: {len(images)} images but {len(rows)} captions")
        return cls(images=images, scenes=scenes, captions=[row["caption"] for row in rows])


def make_dataset(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> ShapesDataset:
    """``count`` random scenes, each rendered with jitter and captioned; deterministic in ``seed``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    images = np.stack([render(scene, rng, size) for scene in scenes])
    return ShapesDataset(images=images, scenes=scenes, captions=[caption(scene, rng) for scene in scenes])
