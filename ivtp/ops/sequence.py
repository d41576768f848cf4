"""Shrinking the `<image>` placeholder runs of a padded batch when an image yields fewer tokens.

The LLaVA processor writes `full` placeholders per image (576 for LLaVA-1.5). After stage 1 each image yields
`kept` features, so every image's run keeps its first `kept` placeholders; the features fill them in order, as
the stock model scatters them. Rows shrink by different amounts (text-only rows not at all), so the batch is
re-padded on the side it was padded on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ivtp.errors import InputError


class PlaceholderError(InputError):
    """The `<image>` placeholders of a batch do not match its images."""


@dataclass
class ShrunkBatch:
    input_ids: torch.Tensor  # (B, L')
    attention_mask: torch.Tensor | None  # (B, L')
    labels: torch.Tensor | None  # (B, L')
    keep: torch.Tensor | None  # (B, L) bool: which original positions survived; None when nothing changed


def placeholder_counts(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Placeholders per row. input_ids: (B, L) -> (B,)."""
    return (input_ids == image_token_id).sum(dim=1)


def check_placeholders(counts: torch.Tensor, num_images: int, per_image: int) -> None:
    """Raise unless the rows hold whole runs of `per_image` placeholders, `num_images` runs in all."""
    total = int(counts.sum())
    if total == num_images * per_image and bool((counts % per_image == 0).all()):
        return
    raise PlaceholderError(
        f"the batch holds {total} <image> placeholder tokens (per row: {counts.tolist()}) but {num_images} "
        f"image(s) were given; expected {num_images} x {per_image} = {num_images * per_image}, with whole images "
        "per row. An image without an <image> in its prompt, or an <image> without an image, causes this."
    )


def shrink_placeholders(
    input_ids: torch.Tensor,
    image_token_id: int,
    full: int,
    kept: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str = "right",
) -> ShrunkBatch:
    """Keep the first `kept` of every `full` placeholders of each image, drop the rest and the padding, re-pad.

    input_ids, attention_mask, labels: (B, L). Rows must hold whole runs of `full` placeholders.
    """
    if kept == full:
        return ShrunkBatch(input_ids, attention_mask, labels, None)
    is_image = input_ids == image_token_id  # (B, L)
    ordinal = is_image.long().cumsum(dim=1) - 1  # (B, L): the placeholder's index within its row
    keep = ~is_image | (ordinal % full < kept)  # (B, L)
    if attention_mask is not None:
        # Padding is dropped and laid anew, so the batch is no wider than its longest shrunk row.
        keep &= attention_mask.bool()
    lengths = keep.sum(dim=1)  # (B,)
    new_len = int(lengths.max())
    batch = input_ids.shape[0]

    # Where each output slot reads from, for all rows at once (a loop over rows would wait on the device per row):
    # the kept positions of a row in order, placed at its start (right padding) or end (left padding).
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (B, L): kept positions first
    slot = torch.arange(new_len, device=input_ids.device)[None]  # (1, L')
    if padding_side == "left":
        slot = slot - (new_len - lengths[:, None])  # (B, L'): negative in the padding
    filled = (slot >= 0) & (slot < lengths[:, None])  # (B, L')
    source = torch.gather(order, 1, slot.clamp(0, keep.shape[1] - 1).expand(batch, -1))  # (B, L')

    def repack(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(filled, torch.gather(x, 1, source), fill)  # (B, L')

    if attention_mask is None and bool((lengths != new_len).any()):
        # Rows of unequal length need a mask; the original had no padding, so every original token is real.
        attention_mask = torch.ones_like(input_ids)
    return ShrunkBatch(
        input_ids=repack(input_ids, pad_token_id),
        attention_mask=None if attention_mask is None else repack(attention_mask, 0),
        labels=None if labels is None else repack(labels, -100),
        keep=keep,
    )


def infer_padding_side(attention_mask: torch.Tensor | None, default: str = "right") -> str:
    """'left' when some row starts with padding, 'right' when some row ends with it, else `default`."""
    if attention_mask is None or attention_mask.ndim != 2:
        return default
    if bool((attention_mask[:, 0] == 0).any()):
        return "left"
    if bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return default
