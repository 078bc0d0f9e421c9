"""The demo's contact sheet: one row per prompt — the prompt, the image computed in full (cache bypassed, same seed),
the image the server returned, and what the cache did (K of N skipped, similarity) — as one PNG a person can judge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 192  # images are shown at this side (nearest-neighbour: a 64-pixel model's pixels stay visible)
TEXT_WIDTH = 360
MARGIN = 8
HEADER = 28


@dataclass(frozen=True)
class SheetRow:
    prompt: str
    uncached: np.ndarray  # uint8 [H, W, 3]: the same request with the cache bypassed
    served: np.ndarray  # uint8 [H, W, 3]: what the server returned
    hit: bool
    skipped_steps: int
    steps: int
    similarity: float | None  # None (or NaN) when no search ran

    def similarity_text(self) -> str:
        return "-" if self.similarity is None or self.similarity != self.similarity else f"{self.similarity:.3f}"

    def outcome(self) -> str:
        if self.hit:
            return f"HIT: K = {self.skipped_steps} of {self.steps} steps skipped\nsimilarity {self.similarity_text()}"
        return f"miss: all {self.steps} steps run\nsimilarity {self.similarity_text()}"


def write_sheet(rows: list[SheetRow], path: Path) -> Path:
    """Draw ``rows`` into one PNG at ``path`` (columns: prompt and outcome, uncached, served)."""
    if not rows:
        raise ValueError("a sheet needs at least one row")
    font = ImageFont.load_default(size=15)
    width = TEXT_WIDTH + 2 * (CELL + MARGIN) + MARGIN
    height = HEADER + len(rows) * (CELL + MARGIN) + MARGIN
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for x, title in (
        (MARGIN, "prompt / what the cache did"),
        (TEXT_WIDTH, "uncached"),
        (TEXT_WIDTH + CELL + MARGIN, "served"),
    ):
        draw.text((x, 8), title, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        top = HEADER + i * (CELL + MARGIN)
        draw.multiline_text(
            (MARGIN, top + 4), _wrap(row.prompt, 40) + "\n\n" + row.outcome(), fill=(0, 0, 0), font=font
        )
        for column, image in enumerate((row.uncached, row.served)):
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((CELL, CELL), Image.Resampling.NEAREST)
            sheet.paste(tile, (TEXT_WIDTH + column * (CELL + MARGIN), top))
        if row.hit:  # a hit's served image framed, so the eye finds what to compare
            left = TEXT_WIDTH + CELL + MARGIN
            draw.rectangle((left - 3, top - 3, left + CELL + 2, top + CELL + 2), outline=(0, 150, 0), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
