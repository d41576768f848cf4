"""Deterministic synthetic images of coloured shapes, and the visual-QA testbed built on them.

Two generators live here:

- `draw_scene(seed, size, n_objects)`: one image for `ivtp demo`, the benchmark and the fixtures (unchanged).
- The testbed for a CPU-trainable miniature of LLaVA-1.5: `sample_scene` / `render` make images holding 3-6
  coloured shapes over a low-contrast textured background; `caption`, `short_caption` and the `ask_*`
  functions make text about them; the `write_*` functions and `generate_testbed` write LLaVA JSON for the
  pretrain and finetune stages, a CLIP caption TSV, and evaluation splits laid out as LLaVA-1.5's GQA and POPE
  folders.

Scenes
    Six colours x three shapes give 18 colour-shape pairs; an image holds each pair at most once, so "the red
    circle" always names one object. Boxes are square, half-open pixel ranges [x0, x1) x [y0, y1) holding the
    whole shape, and never overlap (a gap of `GAP` pixels between them). Sides run from 0.09 to 0.2 of the image
    (10-22 px at 112 px), so with 14 px patches an object's box overlaps 1 to 9 of the 8x8 patches (2: 13%,
    4: 62%, 6: 19%, 9: 4%, 1: 2%; 4.2 on average). Pairs are drawn with a mild fixed skew (`PAIR_WEIGHTS`,
    0.5 to 1.5) so that some pairs are more frequent than others, which is what POPE's "popular" setting needs.
    Backgrounds (`BACKGROUNDS`): noise, stripes, checker, gradient, each low-contrast grey with a slight tint and
    a fine grain, so no patch is empty; each object's colour is jittered by up to 10 per channel, and 30% of
    the background's texture shows through it.

Questions
    Each question is a dict {"question", "answer", "qtype", "target", "targets"}; answers are one lower-case word
    or a digit. "targets" lists the indices of the objects the answer depends on (the pruning oracle keeps their
    patches, see `patches_of` and `target_patches`); "target" is the single one, or None. Existence and POPE
    questions also carry "pair" ([colour, shape] asked about), POPE ones "category" (the setting).

    colour     "What colour is the circle?" -> a colour. Asked only of a shape that is unique in the image.
    shape      "What shape is the red object?" -> circle / square / triangle. Only of a unique colour.
    position   Two-way choices, never a bare "where": "Is the blue triangle on the left or the right?" ->
               left / right, "Is the blue triangle at the top or the bottom?" -> top / bottom. Asked only when
               the box centre is at least `size / 8` from that midline, so the answer is never borderline.
    count      "How many red objects are there?", "How many circles are there?", "How many objects are
               there?" -> a digit (0 when the colour or shape is absent; targets are the counted objects).
    existence  "Is there a green square in the image?" -> yes / no. For "no", targets are the present objects
               that share the colour or the shape (the confusable ones), which is the evidence for "no".
    pope       POPE's "Is there a/an <colour> <shape> in the image?", in POPE's three negative settings: random
               (absent pairs drawn uniformly), popular (the absent pairs most frequent in the split), adversarial
               (absent pairs sharing a colour or a shape with a present object, those sharing with the most
               objects first). Per image and setting, min(3, n objects) "yes" and as many "no", alternating.

All randomness comes from seeds derived by hashing (seed, split, image index, purpose), so the same seed gives
byte-identical JSON and identical pixels, whatever is generated before or after.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import random
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ivtp.data.jsonio import dump_json, dump_jsonl

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


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------

PATCH = 14
PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
# A fixed, mild skew over the 18 pairs (0.5 .. 1.5, in a scrambled order: 7 is coprime with 18).
PAIR_WEIGHTS = {pair: 0.5 + ((7 * k) % len(PAIRS)) / (len(PAIRS) - 1) for k, pair in enumerate(PAIRS)}
BACKGROUNDS = ("noise", "stripes", "checker", "gradient")
BACKGROUND_WORDS = {"noise": "noisy", "stripes": "striped", "checker": "checkered", "gradient": "shaded"}
MIN_SIDE, MAX_SIDE = 0.09, 0.2  # object side as a fraction of the image side
GAP = 2  # pixels kept free between two boxes
QTYPES = ("colour", "shape", "position", "count", "existence")
POPE_SETTINGS = ("adversarial", "popular", "random")
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")


@dataclass
class Scene:
    size: int
    objects: list[ShapeObject]
    background: str  # one of BACKGROUNDS
    texture_seed: int = 0  # the background's parameters and the per-object colour jitter

    def find(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        """Indices of the objects with this colour and/or shape."""
        return [i for i, o in enumerate(self.objects)
                if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}


def _as_rng(rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _weighted_sample(rng: random.Random, items: list, weights: list[float], k: int) -> list:
    """k distinct items, each draw proportional to the remaining weights."""
    items, weights, out = list(items), list(weights), []
    for _ in range(k):
        r = rng.random() * sum(weights)
        j = 0
        while j < len(items) - 1 and r >= weights[j]:
            r -= weights[j]
            j += 1
        out.append(items.pop(j))
        weights.pop(j)
    return out


def _disjoint(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng, size: int = 112, min_objects: int = 3, max_objects: int = 6) -> Scene:
    """A random scene: min..max objects, distinct colour-shape pairs, varied sizes, non-overlapping boxes.

    rng: a `random.Random` (or an int seed for one).
    """
    rng = _as_rng(rng)
    if not 1 <= min_objects <= max_objects <= len(PAIRS):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(PAIRS)}")
    lo, hi = max(3, round(size * MIN_SIDE)), max(4, round(size * MAX_SIDE))
    n = rng.randint(min_objects, max_objects)
    pairs = _weighted_sample(rng, list(PAIRS), [PAIR_WEIGHTS[p] for p in PAIRS], n)
    objects: list[ShapeObject] = []
    for colour, shape in pairs:
        side = rng.randint(lo, hi)
        for attempt in range(400):
            if attempt and attempt % 100 == 0:  # crowded: try smaller
                side = max(lo // 2, side - 2)
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_disjoint(box, o.box) for o in objects):
                objects.append(ShapeObject(colour, shape, box))
                break
        else:  # pragma: no cover - does not happen at the default sizes
            raise RuntimeError(f"could not place {n} objects on a {size} px image")
    return Scene(size, objects, rng.choice(BACKGROUNDS), rng.getrandbits(63))


def _uniform(g: np.random.Generator, lo: float, hi: float, shape) -> np.ndarray:
    return g.random(shape, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)


def _texture(kind: str, size: int, g: np.random.Generator) -> np.ndarray:
    """A (size, size) zero-mean, low-contrast field of the given kind (from 1-D coordinates: fast)."""
    c = np.arange(size, dtype=np.float32) + np.float32(0.5)  # pixel centres
    y, x = c[:, None], c[None, :]
    if kind == "noise":  # blotches of a random cell size, plus grain
        cell = int(g.integers(4, 9))
        coarse = _uniform(g, -1, 1, (size // cell + 1, size // cell + 1)) * np.float32(g.uniform(6, 12))
        idx = np.arange(size) // cell
        return coarse[idx[:, None], idx[None, :]] + _uniform(g, -1, 1, (size, size)) * np.float32(g.uniform(6, 12))
    if kind == "stripes":
        theta, period = g.uniform(0, math.pi), g.uniform(6, 16)
        phase, amp = g.uniform(0, 2 * math.pi), g.uniform(8, 14)
        k = 2 * math.pi / period
        return np.sin(x * np.float32(k * math.cos(theta)) + y * np.float32(k * math.sin(theta)) + np.float32(phase)
                      ) * np.float32(amp)
    if kind == "checker":
        cell = int(g.integers(5, 13))
        ox, oy = (int(v) for v in g.integers(0, cell, 2))
        amp = np.float32(g.uniform(7, 12))
        cols = ((np.arange(size) + ox) // cell) % 2
        rows = ((np.arange(size) + oy) // cell) % 2
        return np.where(rows[:, None] ^ cols[None, :], amp, -amp).astype(np.float32)
    if kind == "gradient":
        theta = g.uniform(0, 2 * math.pi)
        scale = g.uniform(20, 35) / size
        return (x - np.float32(size / 2)) * np.float32(scale * math.cos(theta)) + \
            (y - np.float32(size / 2)) * np.float32(scale * math.sin(theta))
    raise ValueError(f"unknown background {kind!r}; kinds: {', '.join(BACKGROUNDS)}")


@lru_cache(maxsize=256)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling a square box: a disc, the full square, or an upright
    triangle with its apex at the top middle and its base on the bottom edge. Cached: do not modify it."""
    c = np.arange(side, dtype=np.float32) + 0.5
    y, x = c[:, None], c[None, :]
    h = side / 2
    if shape == "circle":
        return (x - h) ** 2 + (y - h) ** 2 <= h * h
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "triangle":
        return np.abs(x - h) <= y / 2 + 0.5
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image (numpy throughout; about 0.15 ms at 112 px)."""
    size = scene.size
    g = np.random.default_rng(scene.texture_seed)
    base = np.float32(g.uniform(85, 135)) + _uniform(g, -8, 8, 3)  # grey with a slight tint
    field_ = _texture(scene.background, size, g) + _uniform(g, -4, 4, (size, size))  # plus grain everywhere
    img = base[None, None, :] + field_[:, :, None]
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        side = min(x1 - x0, y1 - y0)
        mask = shape_mask(o.shape, side)
        fill = np.asarray(COLOURS[o.colour], np.float32) + _uniform(g, -10, 10, 3)
        region = img[y0:y0 + side, x0:x0 + side]
        region[mask] = fill + field_[y0:y0 + side, x0:x0 + side][mask][:, None] * np.float32(0.3)
    return Image.fromarray(np.clip(img + np.float32(0.5), 0, 255).astype(np.uint8), "RGB")


def patches_of(obj: ShapeObject, size: int, patch: int = PATCH) -> list[int]:
    """Row-major indices of the patches that the object's box [x0, x1) x [y0, y1) overlaps."""
    x0, y0, x1, y1 = obj.box
    n = size // patch
    c0, c1 = max(0, x0 // patch), min(n - 1, (x1 - 1) // patch)
    r0, r1 = max(0, y0 // patch), min(n - 1, (y1 - 1) // patch)
    return [r * n + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def target_patches(scene: Scene, question: dict, patch: int = PATCH) -> list[int]:
    """The oracle kept set of a question: the sorted union of its target objects' patches."""
    out: set[int] = set()
    for i in question["targets"]:
        out.update(patches_of(scene.objects[i], scene.size, patch))
    return sorted(out)


def _centre(obj: ShapeObject) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def coarse_position(obj: ShapeObject, size: int) -> str:
    """One of POSITIONS, from the box centre on a 3x3 grid."""
    cx, cy = _centre(obj)
    row = ("top", "", "bottom")[min(2, int(3 * cy / size))]
    col = ("left", "", "right")[min(2, int(3 * cx / size))]
    return f"{row} {col}".strip() or "middle"


def side_of(obj: ShapeObject, size: int, axis: str, margin: float | None = None) -> str | None:
    """"left"/"right" (axis "x") or "top"/"bottom" (axis "y") when the box centre is at least `margin`
    (default size / 8) from that midline, else None."""
    margin = size / 8 if margin is None else margin
    cx, cy = _centre(obj)
    v = cx if axis == "x" else cy
    if abs(v - size / 2) < margin:
        return None
    return (("left", "right") if axis == "x" else ("top", "bottom"))[v > size / 2]


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------

_AT = {"top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
       "middle": "in the middle", "right": "on the right", "bottom left": "at the bottom left",
       "bottom": "at the bottom", "bottom right": "at the bottom right"}
_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_CAPTION_TEMPLATES = ("{list}", "{list} on a {bg} background", "a picture of {list}", "an image with {list}",
                      "{n} shapes: {list}", "{list} on a {bg} background", "a {bg} background with {list}")
PRETRAIN_PROMPTS = ("Describe the image briefly.", "Give a short caption for the image.",
                    "What is in the image?", "Summarise the picture in a few words.", "Write a short caption.")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng, p_position: float = 0.6) -> str:
    """A short English caption naming every object by colour and shape, most with a coarse position, e.g.
    "a red circle at the top left and a blue square on a striped background"."""
    rng = _as_rng(rng)
    order = list(range(len(scene.objects)))
    if rng.random() < 0.5:
        rng.shuffle(order)
    else:  # reading order
        order.sort(key=lambda i: (_centre(scene.objects[i])[1] // (scene.size / 3), _centre(scene.objects[i])[0]))
    parts = []
    for i in order:
        o = scene.objects[i]
        part = _a(f"{o.colour} {o.shape}")
        if rng.random() < p_position:
            part += " " + _AT[coarse_position(o, scene.size)]
        parts.append(part)
    template = rng.choice(_CAPTION_TEMPLATES)
    return template.format(list=_join(parts), bg=BACKGROUND_WORDS[scene.background],
                           n=_NUMBER.get(len(parts), str(len(parts))))


def short_caption(scene: Scene, rng, p_background: float = 0.25) -> str:
    """A caption for CLIP training: every object's colour and shape in a random order, no positions, sometimes
    the background, e.g. "a red circle, a blue square and a green triangle". At most 28 CLIP BPE tokens (30 with
    the start and end tokens, within a text context of 32)."""
    rng = _as_rng(rng)
    parts = [_a(f"{o.colour} {o.shape}") for o in scene.objects]
    rng.shuffle(parts)
    text = _join(parts)
    if rng.random() < p_background:
        text += f" on a {BACKGROUND_WORDS[scene.background]} background"
    return text


Item = tuple  # (colour or None, shape or None): "some object of this colour / shape / both is in the image"


@dataclass
class Description:
    """A caption with what each of its content words claims: `claims[k]` = (end of the word in `text`, the items
    the text up to that word asserts), the last claim being the whole caption's. `true_of` checks a claim."""

    text: str
    claims: list[tuple[int, tuple[Item, ...]]]

    @staticmethod
    def true_of(items: tuple[Item, ...], scene: Scene) -> bool:
        return all(scene.find(colour, shape) for colour, shape in items)


# Every item a claim can hold, for vectorised truth: a scene is the set of items present in it (`scene_items`).
ITEMS: tuple[Item, ...] = (*[(c, s) for c in COLOURS for s in SHAPES], *[(c, None) for c in COLOURS],
                           *[(None, s) for s in SHAPES])
ITEM_INDEX = {item: k for k, item in enumerate(ITEMS)}


def scene_items(scene: Scene) -> list[bool]:
    """Which of ITEMS are present in the scene (a claim is true when all its items are)."""
    return [bool(scene.find(colour, shape)) for colour, shape in ITEMS]


def _described(parts: list[tuple[str, Item]], framing: str = "", tail: str = "") -> Description:
    """A Description from phrases joined as a list ("a, b and c"), each with the item it asserts, between words
    that assert nothing (`framing` before, `tail` after: "this is ...", "... on the left")."""
    text = " ".join(x for x in (framing, _join([p for p, _ in parts]), tail) if x)
    claims, items, pos = [], [], len(framing)
    for phrase, (colour, shape) in parts:
        start = text.index(phrase, pos)
        pos = start + len(phrase)
        # Within "a red circle", "red" already claims a red object, "circle" the red circle.
        if colour is not None and shape is not None and f"{colour} {shape}" in phrase:
            claims.append((start + phrase.index(colour) + len(colour), (*items, (colour, None))))
        items.append((colour, shape))
        claims.append((pos, tuple(items)))
    return Description(text, claims)


_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_OBJECT_WORDS = ("object", "shape", "one", "thing")
# Words around the claims that assert nothing one can see: web text is full of them, and an aligner that never
# reads them rates them at random (the testbed's questions start with them).
_FRAMINGS = ("this is", "here is", "what is in the picture:", "the image shows", "is there", "which one is",
             "what colour is it:", "what color is the", "what shape is the", "the colour of the", "the shape of",
             "is it", "a photo of", "what is the")
_TAILS = ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "or the", "in the image",
          "of the image", "side of the image", "half of the image")


def web_caption(scene: Scene, rng) -> Description:
    """A caption of the kinds web alt-text has: the whole scene (as `short_caption`), one object, a bare colour
    or a bare shape, each about something in `scene` ("a red circle", "something green", "circles", "a square
    and a blue shape"), sometimes framed by words that assert nothing ("this is", "on the left"). The testbed
    aligner learns words from these, as CLIP learns them from the web: with `short_caption` alone, shape words
    never stand alone and rate at chance, and no question word is ever read (docs/testbed.md)."""
    rng = _as_rng(rng)
    objs = list(scene.objects)
    kind = rng.random()
    if kind < 0.25:  # the whole scene, as short_caption
        rng.shuffle(objs)
        return _described([(_a(f"{o.colour} {o.shape}"), (o.colour, o.shape)) for o in objs])
    picked = rng.sample(objs, k=min(len(objs), rng.choice((1, 1, 2))))
    parts: list[tuple[str, Item]] = []
    framing = rng.choice(_FRAMINGS) if rng.random() < 0.5 else ""
    for o in picked:
        form = rng.random()
        if form < 0.35:
            parts.append((rng.choice((_a(f"{o.colour} {o.shape}"), f"the {o.colour} {o.shape}",
                                      f"{o.colour} {o.shape}")), (o.colour, o.shape)))
        elif form < 0.65:
            parts.append((rng.choice((o.colour, f"something {o.colour}", _a(f"{o.colour} {rng.choice(_OBJECT_WORDS)}"),
                                      f"the {o.colour} {rng.choice(_OBJECT_WORDS)}")), (o.colour, None)))
        else:
            parts.append((rng.choice((_a(o.shape), f"the {o.shape}", o.shape, _PLURAL[o.shape])), (None, o.shape)))
    tail = rng.choice(_TAILS) if len(picked) == 1 and rng.random() < 0.3 else ""
    return _described(parts, framing, tail)


def web_caption_words() -> list[str]:
    """Every word `web_caption` can write (the aligner's exported vocabulary must hold them)."""
    return [*COLOURS, *SHAPES, *_PLURAL.values(), *_OBJECT_WORDS, "something", "the", "a", "an", "and",
            *_FRAMINGS, *_TAILS]


# ---------------------------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------------------------

def _q(question: str, answer: str, qtype: str, targets: list[int], target: int | None = None, **extra) -> dict:
    return {"question": question, "answer": answer, "qtype": qtype, "target": target, "targets": sorted(targets),
            **extra}


def _ask_named_by_unique(scene: Scene, rng, known: str, asked: str, templates: tuple[str, ...]) -> dict | None:
    """A question that names an object by its `known` attribute (only when no other object shares it) and asks
    for its `asked` attribute; None when no object's `known` attribute is unique."""
    rng = _as_rng(rng)
    unique = [i for i, o in enumerate(scene.objects) if len(scene.find(**{known: getattr(o, known)})) == 1]
    if not unique:
        return None
    i = rng.choice(unique)
    text = rng.choice(templates).format(getattr(scene.objects[i], known))
    return _q(text, getattr(scene.objects[i], asked), asked, [i], i)


def ask_colour(scene: Scene, rng) -> dict | None:
    """What colour is the <shape>? Only of a shape that is unique in the image; None when there is none."""
    return _ask_named_by_unique(scene, rng, "shape", "colour", (
        "What colour is the {}?", "What is the colour of the {}?", "Which colour is the {}?", "What color is the {}?"))


def ask_shape(scene: Scene, rng) -> dict | None:
    """What shape is the <colour> object? Only of a colour that is unique in the image; None when none is."""
    return _ask_named_by_unique(scene, rng, "colour", "shape", (
        "What shape is the {} object?", "What is the shape of the {} object?", "Which shape is {}?",
        "What shape is the {} one?"))


def ask_position(scene: Scene, rng) -> dict | None:
    """Is the <colour> <shape> on the left or the right / at the top or the bottom? Only when the answer is
    clear (the centre at least size / 8 from the midline); None when no object qualifies."""
    rng = _as_rng(rng)
    options = [(i, axis, side) for i, o in enumerate(scene.objects) for axis in "xy"
               if (side := side_of(o, scene.size, axis)) is not None]
    if not options:
        return None
    i, axis, side = rng.choice(options)
    o = scene.objects[i]
    a, b = ("left", "right") if axis == "x" else ("top", "bottom")
    if rng.random() < 0.5:
        a, b = b, a
    if axis == "x":
        text = rng.choice(("Is the {o} on the {a} or the {b}?", "Is the {o} on the {a} or {b} side of the image?"))
    else:
        text = rng.choice(("Is the {o} at the {a} or the {b}?", "Is the {o} in the {a} or {b} half of the image?"))
    return _q(text.format(o=f"{o.colour} {o.shape}", a=a, b=b), side, "position", [i], i)


def ask_count(scene: Scene, rng, p_absent: float = 0.1, p_all: float = 0.1) -> dict:
    """How many <colour> objects / <shape>s / objects are there? -> a digit; targets are the counted objects."""
    rng = _as_rng(rng)
    r = rng.random()
    if r < p_all:
        targets = list(range(len(scene.objects)))
        text = rng.choice(("How many objects are there?", "How many shapes are in the image?"))
        return _q(text, str(len(targets)), "count", targets, targets[0] if len(targets) == 1 else None)
    by_colour = rng.random() < 0.5
    values = list(COLOURS) if by_colour else list(SHAPES)
    present = sorted({o.colour if by_colour else o.shape for o in scene.objects}, key=values.index)
    absent = [v for v in values if v not in present]
    value = rng.choice(absent) if absent and rng.random() < p_absent else rng.choice(present)
    targets = scene.find(colour=value) if by_colour else scene.find(shape=value)
    if by_colour:
        text = rng.choice(("How many {v} objects are there?", "How many {v} shapes are in the image?")).format(v=value)
    else:
        text = rng.choice(("How many {v}s are there?", "How many {v}s are in the image?")).format(v=value)
    return _q(text, str(len(targets)), "count", targets, targets[0] if len(targets) == 1 else None)


def confusable(scene: Scene, pair: tuple[str, str]) -> list[int]:
    """Indices of the objects that share the colour or the shape of `pair` (but are not it)."""
    return [i for i, o in enumerate(scene.objects) if (o.colour == pair[0]) != (o.shape == pair[1])]


def absent_pairs(scene: Scene, setting: str, rng, k: int, frequency: Counter | None = None) -> list[tuple[str, str]]:
    """k colour-shape pairs not in the scene, by POPE's negative sampling settings.

    random: uniform. popular: the most frequent in `frequency` (pair -> count over the split), ties in PAIRS
    order. adversarial: pairs sharing a colour or a shape with a present object, those sharing with more
    objects first, ties at random.
    """
    rng = _as_rng(rng)
    present = scene.pairs()
    absent = [p for p in PAIRS if p not in present]
    if setting == "random":
        return rng.sample(absent, k)
    if setting == "popular":
        frequency = frequency or Counter()
        return sorted(absent, key=lambda p: -frequency[p])[:k]
    if setting == "adversarial":
        scored = [(len(confusable(scene, p)), rng.random(), p) for p in absent]
        scored = [s for s in scored if s[0] > 0]
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [p for _, _, p in scored[:k]]
    raise ValueError(f"unknown POPE setting {setting!r}; settings: {', '.join(POPE_SETTINGS)}")


def ask_existence(scene: Scene, rng, answer: str | None = None, setting: str | None = None) -> dict:
    """Is there a <colour> <shape> in the image? -> yes / no (answer=None: either, with equal odds).

    A "no" draws its absent pair by `setting` (random or adversarial; None: either, with equal odds).
    """
    rng = _as_rng(rng)
    answer = answer or rng.choice(("yes", "no"))
    if answer == "yes":
        i = rng.randrange(len(scene.objects))
        pair, targets, target = (scene.objects[i].colour, scene.objects[i].shape), [i], i
    else:
        setting = setting or rng.choice(("random", "adversarial"))
        pair = absent_pairs(scene, setting, rng, 1)[0]
        targets, target = confusable(scene, pair), None
    text = rng.choice(("Is there {p} in the image?", "Is there {p}?", "Does the image contain {p}?",
                       "Is there {p} in the picture?")).format(p=_a(f"{pair[0]} {pair[1]}"))
    return _q(text, answer, "existence", targets, target, pair=list(pair))


def pope_questions(scene: Scene, setting: str, rng, frequency: Counter | None = None, k: int = 3) -> list[dict]:
    """POPE's questions for one image and setting: min(k, n objects) "yes" and as many "no", alternating."""
    rng = _as_rng(rng)
    k = min(k, len(scene.objects))
    yes = rng.sample(range(len(scene.objects)), k)
    no = absent_pairs(scene, setting, rng, k, frequency)
    out = []
    for i, pair in zip(yes, no):
        o = scene.objects[i]
        out.append(_q(f"Is there {_a(o.colour)} {o.shape} in the image?", "yes", "pope", [i], i,
                      pair=[o.colour, o.shape], category=setting))
        out.append(_q(f"Is there {_a(pair[0])} {pair[1]} in the image?", "no", "pope", confusable(scene, pair),
                      pair=list(pair), category=setting))
    return out


_ASK = {"colour": ask_colour, "shape": ask_shape, "position": ask_position, "count": ask_count,
        "existence": ask_existence}


def questions(scene: Scene, rng, counts: dict[str, int] | None = None) -> list[dict]:
    """Up to counts[qtype] distinct questions of each type (default one each), skipping types the scene cannot
    ask unambiguously, in a random order."""
    rng = _as_rng(rng)
    counts = counts or {t: 1 for t in QTYPES}
    out, seen = [], set()
    for qtype, n in counts.items():
        got = 0
        for _ in range(4 * n):
            if got == n:
                break
            q = _ASK[qtype](scene, rng)
            if q is None:
                break
            if q["question"] in seen:
                continue
            seen.add(q["question"])
            out.append(q)
            got += 1
    rng.shuffle(out)
    return out


def full_answer(scene: Scene, q: dict) -> str:
    """A sentence for GQA's "fullAnswer"."""
    a = q["answer"]
    if q["qtype"] == "colour":
        return f"The {scene.objects[q['target']].shape} is {a}."
    if q["qtype"] == "shape":
        return f"The {scene.objects[q['target']].colour} object is {_a(a)}."
    if q["qtype"] == "position":
        o = scene.objects[q["target"]]
        return f"The {o.colour} {o.shape} is {'on the' if a in ('left', 'right') else 'at the'} {a}."
    if q["qtype"] == "count":
        return f"There {'is' if a == '1' else 'are'} {a}."
    thing = " ".join(q["pair"])
    return f"Yes, there is {_a(thing)}." if a == "yes" else f"No, there is no {thing}."


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_FINETUNE_COUNTS = {"colour": 1, "shape": 1, "position": 1, "count": 1, "existence": 2}


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs, platforms and Python versions."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def scene_for(seed: int, split: str, index: int, size: int = 112) -> Scene:
    """The scene of image `index` of a split: independent of every other image."""
    return sample_scene(random.Random(derive_seed(seed, split, index, "scene")), size)


def image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def _progress(iterable, total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not progress, leave=False)


def png_bytes(pixels: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit RGB array as a PNG file: no row filter, zlib at `level`. For these images about 2x faster than
    PIL's encoder (which tries every row filter) and no larger, as the grain defeats the filters anyway."""
    h, w, _ = pixels.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(pixels, np.uint8).reshape(h, w * 3)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + chunk(b"IEND", b""))


def _render_one(args) -> None:
    scene, path = args
    with open(path, "wb") as f:
        f.write(png_bytes(np.asarray(render(scene))))


def write_images(scenes: list[Scene], names: list[str], image_dir: str, workers: int = 1, progress: bool = False,
                 desc: str = "images") -> None:
    """Render and save scenes as PNGs (workers > 1: a process pool; the pixels do not depend on it)."""
    os.makedirs(image_dir, exist_ok=True)
    jobs = [(s, os.path.join(image_dir, n)) for s, n in zip(scenes, names)]
    if workers > 1 and len(jobs) > 256:
        from multiprocessing import get_context

        with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
            for _ in _progress(pool.imap(_render_one, jobs, chunksize=64), len(jobs), desc, progress):
                pass
    else:
        for job in _progress(jobs, len(jobs), desc, progress):
            _render_one(job)


def pretrain_records(scenes: list[Scene], seed: int, split: str = "train", image_prefix: str = "images/") -> list[dict]:
    """LLaVA-558K style caption records (the plain template supervises only the caption)."""
    out = []
    for i, scene in enumerate(scenes):
        rng = random.Random(derive_seed(seed, split, i, "pretrain"))
        prompt = rng.choice(PRETRAIN_PROMPTS)
        out.append({"id": f"{split}_{i:06d}", "image": image_prefix + image_name(split, i), "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption(scene, rng)}]})
    return out


def finetune_records(scenes: list[Scene], seed: int, split: str = "train", image_prefix: str = "images/",
                     counts: dict[str, int] | None = None, qtype_counter: Counter | None = None) -> list[dict]:
    """LLaVA-665K style multi-turn short-answer records: the image in the first turn, ANSWER_SUFFIX on each."""
    out = []
    for i, scene in enumerate(scenes):
        rng = random.Random(derive_seed(seed, split, i, "finetune"))
        conv = []
        for j, q in enumerate(questions(scene, rng, counts or DEFAULT_FINETUNE_COUNTS)):
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q["question"] + ANSWER_SUFFIX})
            conv.append({"from": "gpt", "value": q["answer"]})
            if qtype_counter is not None:
                qtype_counter[q["qtype"]] += 1
        out.append({"id": f"{split}_{i:06d}", "image": image_prefix + image_name(split, i), "conversations": conv})
    return out


def write_llava_split(out_dir: str, n_images: int, seed: int, kind: str, size: int = 112, split: str = "train",
                      write_image_files: bool = True, counts: dict[str, int] | None = None, workers: int = 1,
                      progress: bool = False) -> str:
    """Write `out_dir/<kind>.json` (kind "pretrain" or "finetune") and its images under `out_dir/images/`.

    Image paths in the JSON are relative to out_dir (use it as the image folder). Returns the JSON path.
    """
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"kind must be 'pretrain' or 'finetune', not {kind!r}")
    scenes = [scene_for(seed, split, i, size) for i in range(n_images)]
    if write_image_files:
        write_images(scenes, [image_name(split, i) for i in range(n_images)], os.path.join(out_dir, "images"),
                     workers, progress, f"{split} images")
    records = pretrain_records(scenes, seed, split) if kind == "pretrain" else finetune_records(scenes, seed, split,
                                                                                               counts=counts)
    path = os.path.join(out_dir, f"{kind}.json")
    dump_json(records, path)
    return path


def clip_rows(scenes: list[Scene], seed: int, image_dir: str, split: str = "train",
              captions_per_image: int = 1) -> list[tuple[str, str]]:
    rows = []
    for i, scene in enumerate(scenes):
        rng = random.Random(derive_seed(seed, split, i, "clip"))
        path = os.path.join(image_dir, image_name(split, i))
        rows.extend((path, short_caption(scene, rng)) for _ in range(captions_per_image))
    return rows


REGION_LABELS = {"shape": lambda o, size: SHAPES.index(o.shape),
                 "colour": lambda o, size: list(COLOURS).index(o.colour),
                 "position": lambda o, size: POSITIONS.index(coarse_position(o, size))}


def check_region_labels(labels) -> None:
    """A clear error for a name that is not one of REGION_LABELS."""
    unknown = [name for name in labels if name not in REGION_LABELS]
    if unknown:
        raise ValueError(f"region labels {list(labels)}: {unknown} unknown; choose from {', '.join(REGION_LABELS)}")


def object_regions(seed: int, n_images: int, size: int = 112, split: str = "train",
                   labels: tuple[str, ...] = ("shape",)) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """Per image of a split (the rows of clip_rows with one caption each): its objects as (one class index per
    name in `labels`, of REGION_LABELS: shape in SHAPES, colour in COLOURS, coarse position in POSITIONS; the
    patches their boxes overlap), the labels of train_clip's auxiliary region loss."""
    check_region_labels(labels)
    if not labels:
        raise ValueError(f"object_regions needs at least one label; choose from {', '.join(REGION_LABELS)}")
    return [[(tuple(REGION_LABELS[name](o, size) for name in labels), patches_of(o, size))
             for o in scene_for(seed, split, i, size).objects] for i in range(n_images)]


def write_clip_captions(out_csv: str, n_images: int, seed: int, image_dir: str, size: int = 112,
                        split: str = "train", captions_per_image: int = 1, write_image_files: bool = False,
                        workers: int = 1, progress: bool = False) -> str:
    """A tab-separated file with columns `filepath` and `title` (open_clip's `--csv-separator "\\t"
    --csv-img-key filepath --csv-caption-key title`), one row per image and caption.

    open_clip opens `filepath` as written, so `image_dir` should be absolute (or relative to where training
    runs). The images are those of `write_llava_split` for the same seed and split; write_image_files renders
    them into image_dir too.
    """
    scenes = [scene_for(seed, split, i, size) for i in range(n_images)]
    if write_image_files:
        write_images(scenes, [image_name(split, i) for i in range(n_images)], image_dir, workers, progress,
                     f"{split} images")
    _write_tsv(out_csv, clip_rows(scenes, seed, image_dir, split, captions_per_image))
    return out_csv


def _write_tsv(path: str, rows: list[tuple[str, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(("filepath", "title"))
        w.writerows(rows)


_SEMANTIC = {"colour": "attr", "shape": "attr", "position": "rel", "count": "obj", "existence": "obj"}


def gqa_items(scenes: list[Scene], seed: int, split: str = "gqa") -> list[tuple[int, dict]]:
    """(image index, question) pairs for the GQA-layout split: one question of each type per image where the
    scene allows it; existence answers alternate yes / no over the split, so they are balanced."""
    out, n_exist = [], 0
    for i, scene in enumerate(scenes):
        rng = random.Random(derive_seed(seed, split, i, "questions"))
        for qtype in QTYPES:
            if qtype == "existence":
                q = ask_existence(scene, rng, answer=("yes", "no")[n_exist % 2])
                n_exist += 1
            else:
                q = _ASK[qtype](scene, rng)
            if q is not None:
                out.append((i, q))
    return out


def write_gqa_eval(out_dir: str, n_images: int, seed: int, size: int = 112, split: str = "gqa", workers: int = 1,
                   progress: bool = False) -> dict:
    """The GQA layout of LLaVA-1.5's eval folder, under out_dir/gqa: llava_gqa_testdev_balanced.jsonl,
    testdev_balanced_questions.json (GQA's official dict plus "target_patches" and "targets") and images/.
    Returns counts per qtype."""
    root = os.path.join(out_dir, "gqa")
    scenes = [scene_for(seed, split, i, size) for i in range(n_images)]
    write_images(scenes, [image_name(split, i) for i in range(n_images)], os.path.join(root, "images"), workers,
                 progress, "gqa images")
    rows, official, counts = [], {}, Counter()
    for n, (i, q) in enumerate(gqa_items(scenes, seed, split)):
        qid, name = str(n), image_name(split, i)
        rows.append({"question_id": qid, "image": name, "text": q["question"] + ANSWER_SUFFIX, "category": "default"})
        official[qid] = {
            "imageId": name[:-len(".png")], "question": q["question"], "answer": q["answer"],
            "fullAnswer": full_answer(scenes[i], q),
            "types": {"structural": "verify" if q["answer"] in ("yes", "no") else "query",
                      "semantic": _SEMANTIC[q["qtype"]], "detailed": q["qtype"]},
            "isBalanced": True, "target_patches": target_patches(scenes[i], q), "targets": q["targets"],
        }
        counts[q["qtype"]] += 1
    dump_jsonl(rows, os.path.join(root, "llava_gqa_testdev_balanced.jsonl"))
    dump_json(official, os.path.join(root, "testdev_balanced_questions.json"))
    return dict(sorted(counts.items()))


def pair_frequency(scenes: list[Scene]) -> Counter:
    return Counter(p for s in scenes for p in s.pairs())


def write_pope_eval(out_dir: str, n_images: int, seed: int, size: int = 112, split: str = "pope", workers: int = 1,
                    progress: bool = False) -> dict:
    """The POPE layout of LLaVA-1.5's eval folder, under out_dir/pope: llava_pope_test.jsonl (integer
    question_id, unique over the three settings), coco/coco_pope_<setting>.json (JSON lines with the same
    question_id, image, text and label, in the same order) and val2014/. "popular" ranks absent pairs by their
    frequency over this split's images, as POPE does over its dataset. Returns {setting: {"yes": n, "no": n}}."""
    root = os.path.join(out_dir, "pope")
    scenes = [scene_for(seed, split, i, size) for i in range(n_images)]
    write_images(scenes, [image_name(split, i) for i in range(n_images)], os.path.join(root, "val2014"), workers,
                 progress, "pope images")
    frequency = pair_frequency(scenes)
    rows, counts, qid = [], {}, 0
    for setting in POPE_SETTINGS:
        labels, counts[setting] = [], Counter()
        for i, scene in enumerate(scenes):
            rng = random.Random(derive_seed(seed, split, i, "pope", setting))
            for q in pope_questions(scene, setting, rng, frequency):
                qid += 1
                name = image_name(split, i)
                rows.append({"question_id": qid, "image": name, "text": q["question"] + ANSWER_SUFFIX,
                             "category": setting})
                labels.append({"question_id": qid, "image": name, "text": q["question"], "label": q["answer"],
                               "target_patches": target_patches(scene, q)})
                counts[setting][q["answer"]] += 1
        dump_jsonl(labels, os.path.join(root, "coco", f"coco_pope_{setting}.json"))
        counts[setting] = dict(sorted(counts[setting].items()))
    dump_jsonl(rows, os.path.join(root, "llava_pope_test.jsonl"))
    return counts


def generate_testbed(out_dir: str, n_train: int, n_eval: int, seed: int, image_size: int = 112,
                     workers: int | None = None, progress: bool = True,
                     finetune_counts: dict[str, int] | None = None) -> dict:
    """Write the whole testbed and return its manifest:

        out_dir/images/train_NNNNNN.png     n_train training images
        out_dir/pretrain.json               LLaVA caption records (image paths relative to out_dir)
        out_dir/finetune.json               LLaVA multi-turn short-answer records
        out_dir/clip_train.tsv              filepath<TAB>title, absolute paths, for open_clip
        out_dir/eval/gqa/...                GQA layout, n_eval images (see write_gqa_eval)
        out_dir/eval/pope/...               POPE layout, n_eval other images (see write_pope_eval)
        out_dir/manifest.json               seed, sizes, counts per qtype and answer

    Train, GQA and POPE images come from different splits, so they are disjoint. workers: processes for
    rendering (default: the CPU count, at most 4).
    """
    workers = workers or min(4, os.cpu_count() or 1)
    counts = finetune_counts or DEFAULT_FINETUNE_COUNTS
    scenes = [scene_for(seed, "train", i, image_size) for i in range(n_train)]
    write_images(scenes, [image_name("train", i) for i in range(n_train)], os.path.join(out_dir, "images"),
                 workers, progress, "train images")
    pre = pretrain_records(scenes, seed)
    dump_json(pre, os.path.join(out_dir, "pretrain.json"))
    ft_counts: Counter = Counter()
    ft = finetune_records(scenes, seed, counts=counts, qtype_counter=ft_counts)
    dump_json(ft, os.path.join(out_dir, "finetune.json"))
    _write_tsv(os.path.join(out_dir, "clip_train.tsv"),
               clip_rows(scenes, seed, os.path.abspath(os.path.join(out_dir, "images"))))
    eval_dir = os.path.join(out_dir, "eval")
    gqa = write_gqa_eval(eval_dir, n_eval, seed, image_size, workers=workers, progress=progress)
    pope = write_pope_eval(eval_dir, n_eval, seed, image_size, workers=workers, progress=progress)
    n_objects = Counter(len(s.objects) for s in scenes)
    manifest = {
        "generator": "ivtp.data.shapes", "version": 1, "seed": seed, "image_size": image_size, "patch": PATCH,
        "n_train": n_train, "n_eval": n_eval,
        "files": {"images": "images", "pretrain": "pretrain.json", "finetune": "finetune.json",
                  "clip": "clip_train.tsv", "gqa": "eval/gqa", "pope": "eval/pope"},
        "counts": {
            "pretrain": len(pre), "finetune_records": len(ft), "finetune_questions": dict(sorted(ft_counts.items())),
            "gqa": gqa, "pope": pope,
        },
        "objects_per_image": {str(k): v for k, v in sorted(n_objects.items())},
        "backgrounds": dict(sorted(Counter(s.background for s in scenes).items())),
        "finetune_counts": counts,
    }
    dump_json(manifest, os.path.join(out_dir, "manifest.json"), indent=1)
    return manifest
