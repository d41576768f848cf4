"""Deterministic synthetic images of coloured shapes on a textured background (used by `ivtp demo`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")


@dataclass
class ShapeObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def draw_scene(seed: int = 0, size: int = 336, n_objects: int = 4) -> tuple[Image.Image, list[ShapeObject]]:
    """An RGB image with `n_objects` distinct colour-shape pairs that do not overlap, plus their boxes."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):  # low-contrast noise, so no patch is empty
        for x in range(size):
            v = 90 + rng.randint(-20, 20)
            px[x, y] = (v, v, v + 10)
    draw = ImageDraw.Draw(img)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n_objects)
    objects: list[ShapeObject] = []
    for colour, shape in pairs:
        for _ in range(100):
            side = rng.randint(size // 7, size // 4)
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] <= o.box[0] or o.box[2] <= box[0] or box[3] <= o.box[1] or o.box[3] <= box[1]
                   for o in objects):
                break
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        objects.append(ShapeObject(colour, shape, box))
    return img, objects
