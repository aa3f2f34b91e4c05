"""What a ShapesWorld image holds (:class:`Scene`: its objects and drawn word) and the words that name them,
shared by the generator (:mod:`lit_mllm.data.shapesworld`) and its extra formats
(:mod:`lit_mllm.data.shapesworld_formats`), so neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str  # "small" | "large"
    cell: int  # index into cell_names(grid)
    # x0, y0, x1, y1 as handed to PIL, which draws x1/y1 too (ShapesWorld.pixel_box gives the drawn box)
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Label:
    """A word drawn in a cell of its own."""

    word: str
    cell: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the pasted glyph block, x1/y1 exclusive


@dataclass(frozen=True)
class Scene:
    things: list[Thing]
    label: Label | None = None


CELLS = ("top left", "top right", "bottom left", "bottom right")  # the cells of the 2 x 2 grid


def cell_names(grid: int) -> tuple[str, ...]:
    """Names of the cells of a ``grid`` x ``grid`` layout, row by row ("top left", ..., "center", ...)."""
    if grid == 2:
        return CELLS
    rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
    return tuple("center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in rows for c in cols)
