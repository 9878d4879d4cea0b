"""Deterministic pictures of coloured shapes: the images of the bundled toy dataset and the examples."""

import math

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUND = (128, 128, 128)


def draw_shape(shape: str, colour: str, size: int = 32, center: tuple[float, float] = (0.5, 0.5), scale: float = 0.35) -> Image.Image:
    """One `shape` of `colour` on a grey square image; `center` and `scale` are fractions of `size`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {sorted(COLOURS)}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0] * size, center[1] * size, scale * size
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)], fill=fill)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image
