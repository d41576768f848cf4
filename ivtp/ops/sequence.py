"""Shrinking the `<image>` placeholder runs of a padded batch when an image yields fewer tokens.

The LLaVA processor writes `full` placeholders per image (576 for LLaVA-1.5; for LLaVA-NeXT a count per image,
which its crops and aspect ratio set). After stage 1 each image yields `kept` features, so every image's run keeps
its first `kept` placeholders; the features fill them in order, as the stock model scatters them. Rows shrink by
different amounts (text-only rows not at all), so the batch is re-padded on the side it was padded on.

`full` and `kept` are an int (every image alike) or a (num_images,) tensor of per-image counts, images in the order
the stock model fills them (row by row, left to right).
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


def check_placeholders(counts: torch.Tensor, num_images: int, per_image: "int | torch.Tensor") -> None:
    """Raise unless the rows hold whole runs of `per_image` placeholders, `num_images` runs in all. per_image: an int,
    or a (num_images,) tensor of each image's run."""
    if isinstance(per_image, int):
        total = int(counts.sum())
        if total == num_images * per_image and bool((counts % per_image == 0).all()):
            return
        expected = f"{num_images} x {per_image} = {num_images * per_image}"
    else:
        ends = per_image.cumsum(0).tolist()  # where each image's run ends, counted over the whole batch
        whole = {0, *ends}
        if len(ends) == num_images and int(counts.sum()) == (ends[-1] if ends else 0) and all(
                end in whole for end in counts.cumsum(0).tolist()):  # every row ends where an image's run does
            return
        expected = f"{'+'.join(map(str, per_image.tolist())) or 0} = {ends[-1] if ends else 0}"
    raise PlaceholderError(
        f"the batch holds {int(counts.sum())} <image> placeholder tokens (per row: {counts.tolist()}) but "
        f"{num_images} image(s) were given; expected {expected}, with whole images per row. An image without an "
        "<image> in its prompt, or an <image> without an image, causes this."
    )


def shrink_placeholders(
    input_ids: torch.Tensor,
    image_token_id: int,
    full: "int | torch.Tensor",
    kept: "int | torch.Tensor",
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str = "right",
) -> ShrunkBatch:
    """Keep the first `kept` of every `full` placeholders of each image, drop the rest and the padding, re-pad.

    input_ids, attention_mask, labels: (B, L). Rows must hold whole runs of `full` placeholders. full, kept: ints,
    or (num_images,) tensors of per-image counts.
    """
    is_image = input_ids == image_token_id  # (B, L)
    if isinstance(full, int) and isinstance(kept, int):
        if kept == full:
            return ShrunkBatch(input_ids, attention_mask, labels, None)
        ordinal = is_image.long().cumsum(dim=1) - 1  # (B, L): the placeholder's index within its row
        keep = ~is_image | (ordinal % full < kept)  # (B, L)
    else:
        per_image = full if isinstance(full, torch.Tensor) else kept  # (num_images,)
        full, kept = (torch.full_like(per_image, x) if isinstance(x, int) else x for x in (full, kept))
        full, kept = full.to(input_ids.device), kept.to(input_ids.device)
        if bool((kept == full).all()):
            return ShrunkBatch(input_ids, attention_mask, labels, None)
        # The stock model fills the placeholders image after image, row by row: index them over the whole batch.
        ordinal = (is_image.flatten().long().cumsum(0) - 1).view_as(is_image)  # (B, L)
        ends = full.cumsum(0)  # (num_images,)
        image = torch.searchsorted(ends, ordinal, right=True).clamp_max(len(ends) - 1)  # (B, L) whose run it is in
        within = ordinal - (ends - full)[image]  # (B, L): the placeholder's index within its image's run
        keep = ~is_image | (within < kept[image])  # (B, L)
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
