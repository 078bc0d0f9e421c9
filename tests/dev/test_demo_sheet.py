"""The demo's contact sheet: each row shows the prompt's uncached image beside the served one, a hit framed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nirvana_dev.demo_sheet import CELL, HEADER, MARGIN, TEXT_WIDTH, SheetRow, write_sheet


def _solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (64, 64, 3)).copy()


def test_each_row_shows_the_uncached_and_the_served_image_and_frames_a_hit(tmp_path: Path) -> None:
    rows = [
        SheetRow("a small red circle", _solid((200, 0, 0)), _solid((0, 0, 200)), False, 0, 20, float("nan")),
        SheetRow(
            "top-left corner: a little crimson disc", _solid((10, 200, 10)), _solid((90, 90, 90)), True, 8, 20, 0.97
        ),
    ]
    sheet = np.asarray(Image.open(write_sheet(rows, tmp_path / "sheet.png")).convert("RGB"))
    assert sheet.shape == (HEADER + 2 * (CELL + MARGIN) + MARGIN, TEXT_WIDTH + 2 * (CELL + MARGIN) + MARGIN, 3)
    served_x = TEXT_WIDTH + CELL + MARGIN
    for i, row in enumerate(rows):
        top = HEADER + i * (CELL + MARGIN)
        assert (sheet[top + 10 : top + CELL - 10, TEXT_WIDTH + 10 : TEXT_WIDTH + CELL - 10] == row.uncached[0, 0]).all()
        assert (sheet[top + 10 : top + CELL - 10, served_x + 10 : served_x + CELL - 10] == row.served[0, 0]).all()
    frame = (0, 150, 0)
    assert tuple(sheet[HEADER + (CELL + MARGIN) - 2, served_x + CELL // 2]) == frame  # above the hit's image
    assert tuple(sheet[HEADER - 2, served_x + CELL // 2]) != frame  # the miss above it has none
    text = sheet[HEADER : HEADER + CELL, MARGIN : TEXT_WIDTH - MARGIN]
    assert (text < 128).any(), "the prompt and outcome are written in the first column"


def test_outcome_names_k_of_n_and_the_similarity() -> None:
    hit = SheetRow("p", _solid((0, 0, 0)), _solid((0, 0, 0)), True, 8, 20, 0.9712)
    miss = SheetRow("p", _solid((0, 0, 0)), _solid((0, 0, 0)), False, 0, 20, None)
    assert hit.outcome() == "HIT: K = 8 of 20 steps skipped\nsimilarity 0.971"
    assert miss.outcome() == "miss: all 20 steps run\nsimilarity -"


def test_an_empty_sheet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one row"):
        write_sheet([], tmp_path / "sheet.png")
