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


def kept_mask(kept: list[int], num_patches: int) -> torch.Tensor:
    """(grid, grid) bool mask of the kept patches, row-major as CLIP orders them."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[torch.as_tensor(kept, dtype=torch.long)] = True
    return mask.view(grid, grid)


def overlay(image: Image.Image, kept: list[int], num_patches: int, dim: float = 0.75) -> Image.Image:
    """Dim every pruned patch by `dim` (0: untouched, 1: black) and outline the kept ones."""
    mask = kept_mask(kept, num_patches)
    grid = mask.shape[0]
    out = image.convert("RGB").copy()
    w, h = out.size
    shade = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    for r in range(grid):
        for c in range(grid):
            box = (c * w // grid, r * h // grid, (c + 1) * w // grid - 1, (r + 1) * h // grid - 1)
            if mask[r, c]:
                draw.rectangle(box, outline=(255, 255, 255, 110))
            else:
                draw.rectangle(box, fill=(0, 0, 0, int(255 * dim)))
    return Image.alpha_composite(out.convert("RGBA"), shade).convert("RGB")


def overlay_panel(image: Image.Image, kept: list[int], num_patches: int, caption: str,
                  instruction: list[dict] | None = None) -> Image.Image:
    """Original and overlay side by side, with caption lines underneath. Small images are upscaled 2x.

    `instruction`: the rated instruction tokens of stage 2 ({"token", "relevance"} and "selected"); they are
    drawn as a line of words, the ones that formed the pseudo-CLS highlighted with their relevance (paper Fig. 5).
    """
    over = overlay(image, kept, num_patches)
    scale = 1 if min(image.size) >= 224 else 2
    w, h = image.size[0] * scale, image.size[1] * scale
    left = image.convert("RGB").resize((w, h), Image.NEAREST)
    right = over.resize((w, h), Image.NEAREST)
    lines = caption.split("\n")
    token_rows = _layout_tokens(instruction or [], 2 * w + 10)
    panel = Image.new("RGB", (2 * w + 10, h + 16 * (len(lines) + len(token_rows)) + 14), "white")
    panel.paste(left, (0, 0))
    panel.paste(right, (w + 10, 0))
    draw = ImageDraw.Draw(panel)
    y = h + 4
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
