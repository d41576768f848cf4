"""Kept-token overlays: the image the tower saw, with pruned patches dimmed and kept ones left bright."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw

from ivtp.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def denormalize(pixel_values: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> Image.Image:
    """(3, S, S) normalised pixels -> the RGB image the vision tower saw."""
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    rgb = (pixel_values.float().cpu() * std_t + mean_t).clamp(0, 1)  # (3, S, S)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def kept_mask(kept: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) bool mask of the kept patches of a rows x cols patch grid, row-major as CLIP orders them."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[torch.as_tensor(kept, dtype=torch.long)] = True
    return mask.view(shape)


def square_grid(num_patches: int) -> tuple[int, int]:
    """(side, side) of a square crop's patches."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return side, side


def overlay(image: Image.Image, kept: list[int], shape: tuple[int, int], dim: float = 0.75) -> Image.Image:
    """Dim every pruned patch of the image's (rows, cols) patch grid by `dim` (0: untouched, 1: black) and outline
    the kept ones."""
    mask = kept_mask(kept, shape)
    rows, cols = shape
    out = image.convert("RGB").copy()
    w, h = out.size
    shade = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    for r in range(rows):
        for c in range(cols):
            box = (c * w // cols, r * h // rows, (c + 1) * w // cols - 1, (r + 1) * h // rows - 1)
            if mask[r, c]:
                draw.rectangle(box, outline=(255, 255, 255, 110))
            else:
                draw.rectangle(box, fill=(0, 0, 0, int(255 * dim)))
    return Image.alpha_composite(out.convert("RGBA"), shade).convert("RGB")


def anyres_views(pixel_values: torch.Tensor, kept: list[int], image_size, config) -> list[tuple]:
    """A LLaVA-NeXT image as two views for overlay_panel: the base view, and the full-resolution image its tiles
    cover (the grid assembled, letterbox included). pixel_values: (crops, 3, S, S); kept: crop-major patch indices
    (ivtp.anyres.stock_places). Returns [(image, kept, (rows, cols) patches), ...]."""
    from ivtp.anyres import side, tile_grid

    n, (rows, cols) = side(config), tile_grid(image_size, config)
    kept = torch.as_tensor(kept, dtype=torch.long)
    base = kept[kept < n * n]
    crop, patch = (kept[kept >= n * n] // (n * n)) - 1, kept[kept >= n * n] % (n * n)  # tile, patch within it
    on_map = ((crop // cols) * n + patch // n) * (cols * n) + (crop % cols) * n + patch % n  # raster over the map
    tiles = pixel_values[1:].unflatten(0, (rows, cols))  # (rows, cols, 3, S, S)
    whole = tiles.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)  # (3, rows S, cols S)
    return [(denormalize(pixel_values[0]), base.tolist(), (n, n)),
            (denormalize(whole), on_map.tolist(), (rows * n, cols * n))]


def overlay_panel(views: list[tuple], caption: str, instruction: list[dict] | None = None) -> Image.Image:
    """Each view (image, kept patches, (rows, cols) patch grid) as original and overlay side by side, one view
    under the other (LLaVA-NeXT: the base view, then the tiles), with caption lines underneath. Small images are
    upscaled 2x.

    `instruction`: the rated instruction tokens of stage 2 ({"token", "relevance"} and "selected"); they are
    drawn as a line of words, the ones that formed the pseudo-CLS highlighted with their relevance (paper Fig. 5).
    """
    pairs = []
    for image, kept, shape in views:
        scale = 1 if min(image.size) >= 224 else 2
        w, h = image.size[0] * scale, image.size[1] * scale
        pairs.append((image.convert("RGB").resize((w, h), Image.NEAREST),
                      overlay(image, kept, shape).resize((w, h), Image.NEAREST)))
    width = max(2 * left.size[0] + 10 for left, _ in pairs)
    height = sum(left.size[1] + 6 for left, _ in pairs)
    lines = caption.split("\n")
    token_rows = _layout_tokens(instruction or [], width)
    panel = Image.new("RGB", (width, height + 16 * (len(lines) + len(token_rows)) + 8), "white")
    y = 0
    for left, right in pairs:
        panel.paste(left, (0, y))
        panel.paste(right, (left.size[0] + 10, y))
        y += left.size[1] + 6
    draw = ImageDraw.Draw(panel)
    y -= 2
    for line in lines:
        draw.text((4, y), line, fill=(0, 0, 0))
        y += 16
    for row in token_rows:
        for x, label, selected in row:
            if selected:
                box = draw.textbbox((x, y), label)
                draw.rectangle((box[0] - 1, box[1] - 2, box[2] + 1, box[3] + 2), fill=(255, 214, 64))
            draw.text((x, y), label, fill=(0, 0, 0) if selected else (120, 120, 120))
        y += 16
    return panel


def _layout_tokens(tokens: list[dict], width: int) -> list[list[tuple[int, str, bool]]]:
    """Wrap 'token (relevance)' labels into lines of at most `width` pixels (about 6 px a character)."""
    rows: list[list[tuple[int, str, bool]]] = [[]]
    x = 4
    for t in tokens:
        text = t["token"].replace("\n", " ").strip()
        if not text:
            continue
        label = f"{text} {t['relevance']:.2f}" if t.get("selected") and t.get("relevance") is not None else text
        advance = 6 * len(label) + 8
        if x + advance > width and rows[-1]:
            rows.append([])
            x = 4
        rows[-1].append((x, label, bool(t.get("selected"))))
        x += advance
    return rows if rows[-1] else rows[:-1]
