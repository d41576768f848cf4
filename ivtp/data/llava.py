"""LLaVA JSON data for training: lazy images, templates, a collator for mixed batches, a modality sampler.

A record is {"id", "image" (optional, relative to the image folder), "conversations": [{"from", "value"}]}, as in
LLaVA's 558K and 665K files. Records load through HF Datasets (memory-mapped Arrow), images only when a sample
is drawn.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ivtp.anyres import is_anyres
from ivtp.data.templates import (IGNORE_INDEX, IMAGE_PLACEHOLDER, ConversationError, place_image, placeholder_problem,
                                 render, tokenize)
from ivtp.errors import InputError

logger = logging.getLogger(__name__)


class MissingImageError(FileNotFoundError):
    pass


def load_records(path: str):
    """LLaVA JSON (a list of records) as a HF Dataset, checked (`check_placeholders`) so that a sample the model
    cannot take fails now, naming it, and not at its batch hours into training."""
    import datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        records = datasets.load_dataset("json", data_files=path, split="train")
    except datasets.exceptions.DatasetGenerationError as e:
        raise ConversationError(f"{path} cannot be read as LLaVA JSON ({e.__cause__ or e}); `ivtp data check` "
                                "says where") from None
    check_placeholders(records)
    return records


def check_placeholders(records) -> None:
    """Raise on samples whose <image> placeholders do not fit their image (`placeholder_problem`), naming the
    first three by index and id. Reads three columns, not the images."""
    convs, images, ids = (_column(records, k) for k in ("conversations", "image", "id"))
    bad = [(i, sid, problem[1]) for i, (c, image, sid) in enumerate(zip(convs, images, ids))
           if (problem := placeholder_problem(c or [], bool(image))) is not None]
    if bad:
        shown = "; ".join(f"record {i} (id {sid}): {detail}" for i, sid, detail in bad[:3])
        raise ConversationError(f"{len(bad)} sample(s) cannot train: {shown}. `ivtp data check` lists them all")


# Bounds on an image before the processor, which otherwise holds it in float32 at full size: a 10000x1 image
# padded is a 10000x10000 canvas (1.4 GB), and unpadded, CLIP's shortest-edge resize makes it 3,360,000x336
# (8 GB). Ordinary photos are within both bounds and pass unchanged.
MAX_IMAGE_SIDE = 4096  # a longer side is scaled down to it first (aspect kept)
MAX_CROP_ASPECT = 16  # unpadded: the long side is cut (centred) to 16x the short one; the centre crop is inside


def prepare_image(image: Image.Image, pad_fill: tuple[int, int, int] | None = None) -> Image.Image:
    """An image as LLaVA-1.5 hands it to the processor: RGB, and with `pad_fill` padded to a square of that colour
    ('pad'); without, left to the processor's resize and centre crop. Memory is bounded (MAX_IMAGE_SIDE,
    MAX_CROP_ASPECT); an image past a bound is logged."""
    image = image.convert("RGB")
    w, h = image.size
    if pad_fill is None and max(w, h) > MAX_CROP_ASPECT * min(w, h):
        # The processor keeps only the central min(w, h) square; cut what it would resize and throw away.
        cw, ch = min(w, MAX_CROP_ASPECT * h), min(h, MAX_CROP_ASPECT * w)
        image = image.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
        logger.warning("image of %dx%d cut to its central %dx%d (the processor crops the centre)", w, h, cw, ch)
    if max(image.size) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(image.size)
        size = tuple(max(1, round(x * scale)) for x in image.size)
        logger.warning("image of %dx%d scaled down to %dx%d before the processor", *image.size, *size)
        image = image.resize(size, Image.BICUBIC)
    return image if pad_fill is None else expand_to_square(image, pad_fill)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's image_aspect_ratio 'pad': centre the image on a square of the image processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _column(records, key: str) -> list:
    """One field of every record, from a HF Dataset (a column read) or a list of dicts; None where absent."""
    if hasattr(records, "column_names"):
        return records[key] if key in records.column_names else [None] * len(records)
    return [r.get(key) for r in records]


def placeholders_per_image(config) -> "int | Callable[[torch.Tensor], int]":
    """LlavaDataset's `image_tokens` for a model config. LLaVA-1.5: one count for every image (one per patch, or a
    compressor's). LLaVA-NeXT: a function of the image's (height, width), since its stock placeholder count (base
    view, unpadded tiles, newlines: anyres.stock_tokens) follows the tile grid the image's size picks. A pruned
    NeXT shrinks each run in its forward, as a pruned 1.5 does."""
    if getattr(config, "model_type", None) == "llava_next":
        from ivtp.anyres import stock_tokens

        return functools.partial(stock_tokens, config=config)
    from ivtp.projectors import image_tokens

    return image_tokens(config)


ASPECT_RATIOS = ("pad", "crop", "anyres")


def resolve_aspect_ratio(image_aspect_ratio: str | None, image_processor) -> str:
    """The image handling for the processor (or the model config): None picks its own ('anyres' for LLaVA-NeXT,
    else LLaVA-1.5's 'pad').
    A choice the processor cannot honour is a one-line InputError: 'pad' would square every NeXT image (so every
    image would get the same grid), and a 1.5 processor has no tiles for 'anyres'."""
    anyres = is_anyres(image_processor)
    if image_aspect_ratio is None:
        return "anyres" if anyres else "pad"
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise InputError(f"image_aspect_ratio {image_aspect_ratio!r}: choose one of {', '.join(ASPECT_RATIOS)}")
    if anyres and image_aspect_ratio != "anyres":
        raise InputError(f"image_aspect_ratio {image_aspect_ratio!r}: LLaVA-NeXT tiles each image at its own aspect; "
                         "pass anyres or leave it out")
    if not anyres and image_aspect_ratio == "anyres":
        raise InputError("image_aspect_ratio 'anyres' needs a LLaVA-NeXT model; LLaVA-1.5 takes pad or crop")
    return image_aspect_ratio


class LlavaDataset(Dataset):
    """Tokenised samples with lazily loaded images.

    image_tokens: placeholders per image: an int (576 for LLaVA-1.5: one per patch), or a function of the image's
    (height, width) for LLaVA-NeXT (`placeholders_per_image`). Stage 1 shrinks the runs in the model.
    image_aspect_ratio: 'pad' or 'crop' (LLaVA-1.5), 'anyres' (LLaVA-NeXT); None: the image processor's own.
    skip_missing: a sample whose image is missing is replaced by another (and counted) instead of raising.
    """

    def __init__(self, records, tokenizer, image_processor, template: str, image_folder: str | None,
                 image_tokens: "int | Callable[[torch.Tensor], int]", model_max_length: int,
                 image_aspect_ratio: str | None = None, skip_missing: bool = False):
        self.records = records
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.image_folder = image_folder
        self.image_tokens = image_tokens
        self.model_max_length = model_max_length
        self.image_aspect_ratio = resolve_aspect_ratio(image_aspect_ratio, image_processor)
        self.skip_missing = skip_missing
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Approximate token lengths, negative for text-only samples (for the modality sampler)."""
        out = []
        image = self._typical_image_tokens()
        for rec in self.records:
            words = sum(len(t["value"].split()) for t in rec["conversations"] or [])
            out.append(words + image if rec.get("image") else -words)
        return out

    def _typical_image_tokens(self) -> int:
        """A fixed count, or for NeXT a square image's at the crop size: the sampler only sorts roughly, and the
        true count needs every image opened."""
        if not callable(self.image_tokens):
            return self.image_tokens
        side = self.image_processor.crop_size["height"]
        return self.image_tokens(torch.tensor([side, side]))

    def __getitem__(self, i: int) -> dict:
        try:
            return self._item(i)
        except MissingImageError:
            if not self.skip_missing:
                raise
            self.skipped.add(str(self.records[i].get("id")))
            return self[(i + 1) % len(self)]

    def _item(self, i: int) -> dict:
        rec = self.records[i]
        sample_id = str(rec.get("id", i))
        convs = rec["conversations"] or []
        has_image = bool(rec.get("image"))
        convs = place_image(convs, has_image)
        problem = placeholder_problem(convs, has_image)  # records not from load_records are checked here
        if problem is not None:
            raise ConversationError(f"sample {sample_id} (record {i}): {problem[1]}")
        rendered = render(self.template, convs, self.tokenizer.eos_token, sample_id)
        image = self._image(rec["image"], sample_id) if has_image else {}
        ids, labels = tokenize(rendered, self.tokenizer, self._placeholders(image))
        ids, labels = self._truncate(ids, labels, sample_id)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": sample_id, **image}

    def _placeholders(self, image: dict) -> int:
        """<image> placeholders for this sample's image: fixed, or (NeXT) the count its size sets. A text-only
        sample has no run to expand; the count is then unused."""
        if not callable(self.image_tokens):
            return self.image_tokens
        return self.image_tokens(image["image_sizes"]) if image else 0

    def _truncate(self, ids, labels, sample_id):
        if len(ids) <= self.model_max_length:
            return ids, labels
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        last_image = max((j for j, t in enumerate(ids) if t == image_id), default=-1)
        if last_image >= self.model_max_length:
            raise ConversationError(f"sample {sample_id}: {len(ids)} tokens, and model_max_length "
                                    f"{self.model_max_length} would cut through its image")
        warnings.warn(f"sample {sample_id}: {len(ids)} tokens truncated to model_max_length "
                      f"{self.model_max_length}")
        return ids[: self.model_max_length], labels[: self.model_max_length]

    def _image(self, name: str, sample_id: str) -> dict[str, torch.Tensor]:
        """pixel_values: (3, S, S), or for NeXT (crops, 3, S, S) with image_sizes (2,): (height, width)."""
        path = os.path.join(self.image_folder or "", name)
        if not os.path.isfile(path):
            raise MissingImageError(f"sample {sample_id}: image not found: {path}")
        fill = (tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
                if self.image_aspect_ratio == "pad" else None)
        try:
            with Image.open(path) as im:
                image = prepare_image(im, fill)
        except OSError as e:
            raise ConversationError(f"sample {sample_id}: cannot read image {path} ({e})") from None
        out = self.image_processor(images=image, return_tensors="pt")
        return {k: out[k][0] for k in ("pixel_values", "image_sizes") if k in out}


@dataclass
class Collator:
    """Right-pads a batch; stacks the images of the samples that have one, in order (text-only rows have none).
    LLaVA-NeXT images (crops, 3, S, S) are zero-padded to the batch's most crops, as transformers' processor pads
    them (the model reads each image's own count from image_sizes), and their image_sizes stacked (B_images, 2)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
            mask[b, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = [it for it in items if "pixel_values" in it]
        if images:
            batch["pixel_values"] = stack_pixels([it["pixel_values"] for it in images])
        if any("image_sizes" in it for it in images):
            batch["image_sizes"] = torch.stack([it["image_sizes"] for it in images])  # (B_images, 2)
        return batch


def stack_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """(B_images, 3, S, S) from LLaVA-1.5's (3, S, S) each; (B_images, max crops, 3, S, S) from NeXT's
    (crops, 3, S, S) each, the missing crops zeros (transformers' LlavaNextImageProcessor._pad_for_batching)."""
    if pixels[0].dim() == 3:
        return torch.stack(pixels)
    most = max(p.shape[0] for p in pixels)
    return torch.stack([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[0])) for p in pixels])


class ModalityLengthGroupedSampler(Sampler):
    """LLaVA's group_by_modality_length: batches hold either image samples or text-only samples, each group
    shuffled and roughly sorted by length within mega-batches, so padding is small and no batch mixes kinds
    (except the one leftover batch). lengths: positive for image samples, negative for text-only."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, seed: int = 0):
        self.lengths = lengths
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        mega = self.batch_size * self.world_size * 50
        groups = []
        leftovers = []
        for with_image in (True, False):
            idx = [i for i, n in enumerate(self.lengths) if (n > 0) == with_image]
            rng.shuffle(idx)
            for start in range(0, len(idx), mega):
                chunk = sorted(idx[start : start + mega], key=lambda i: -abs(self.lengths[i]))
                step = self.batch_size * self.world_size
                batches = [chunk[j : j + step] for j in range(0, len(chunk), step)]
                if batches and len(batches[-1]) < step:
                    leftovers.extend(batches.pop())
                groups.extend(batches)
        rng.shuffle(groups)
        if leftovers:
            groups.append(leftovers)
        return iter([i for batch in groups for i in batch])
