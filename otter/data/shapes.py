"""Deterministic pictures of coloured shapes: the images of the bundled toy dataset and the examples."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class Shape:
    """One shape of a picture; `center` and `scale` (half the shape's extent) are fractions of the image size."""

    shape: str
    colour: str
    center: tuple[float, float] = (0.5, 0.5)
    scale: float = 0.35

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")


def draw_shapes(shapes: Sequence[Shape], size: int = 32) -> Image.Image:
    """The `shapes`, painted in order, on a grey square image of `size` pixels."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in shapes:
        _paint(draw, item, size)
    return image


def draw_shape(
    shape: str, colour: str, size: int = 32, center: tuple[float, float] = (0.5, 0.5), scale: float = 0.35
) -> Image.Image:
    """One `shape` of `colour` on a grey square image; `center` and `scale` are fractions of `size`."""
    return draw_shapes([Shape(shape, colour, center, scale)], size)


def _paint(draw: ImageDraw.ImageDraw, item: Shape, size: int) -> None:
    cx, cy, r = item.center[0] * size, item.center[1] * size, item.scale * size
    fill = COLOURS[item.colour]
    if item.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "triangle":
        draw.polygon(
            [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)],
            fill=fill,
        )
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
