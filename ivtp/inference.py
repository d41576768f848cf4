"""Batched generation with a pruned LLaVA, with the per-step visual-token counts of every sample."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm import tqdm

from ivtp.anyres import crop_count, is_anyres, stock_places, stock_tokens
from ivtp.data.llava import prepare_image
from ivtp.data.templates import vicuna_v1_prompt
from ivtp.errors import InputError
from ivtp.patch.llava import num_patches
from ivtp.projectors import image_tokens

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    prompt: str  # the bare question; the template adds the <image> placeholder
    image: "str | Image.Image | None" = None  # a path, an image, or None for a text-only sample


@dataclass
class Result:
    prompt: str
    image: str | None
    answer: str
    visual_tokens: list[int]  # tokens per image after the input and after each pruning step ([] if text-only)
    kept_patches: list[int] = field(default_factory=list)  # original patch indices left after every step
    stage1_patches: list[int] = field(default_factory=list)  # those that reached the LLM (before its pruning)
    pixel_values: torch.Tensor | None = field(default=None, repr=False)  # what the tower saw, for overlays
    # LLaVA-NeXT: the image's (height, width), which sets its crops; pixel_values is then (crops, 3, S, S) and the
    # patch indices are crop-major (ivtp.anyres.stock_places)
    image_size: tuple[int, int] | None = None
    guidance: dict = field(default_factory=dict)  # stage 2: pseudo_cls_source, selected and rated tokens

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "image": self.image, "answer": self.answer,
                "visual_tokens": self.visual_tokens, "kept_patches": self.kept_patches,
                "stage1_patches": self.stage1_patches, **self.guidance}


def load_image(image: "str | Image.Image", pad_fill: tuple[int, int, int] | None = None) -> Image.Image:
    """An image path or image, ready for the processor (`prepare_image`: RGB, bounded, padded with pad_fill)."""
    if isinstance(image, Image.Image):
        return prepare_image(image, pad_fill)
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image not found: {image}")
    try:
        with Image.open(image) as im:
            return prepare_image(im, pad_fill)
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files
        raise UnreadableImageError(_cannot_read(image, e)) from None


def image_problem(path: str) -> str | None:
    """Why `path` cannot be an image, from its header alone (no pixels are decoded); None if it looks like one."""
    try:
        with Image.open(path):
            return None
    except OSError as e:
        return _cannot_read(path, e)


def _cannot_read(path: str, error: OSError) -> str:
    return f"cannot read image {path}: {str(error).splitlines()[0]}"


class UnreadableImageError(InputError):
    """An image file that PIL cannot decode."""


def generate(model, processor, samples: list[Sample], max_new_tokens: int = 32, batch_size: int = 8,
             use_cache: bool = True, progress: bool = False) -> list[Result]:
    """Greedy answers for `samples`, in batches. Images are all opened before any compute, so a bad path fails
    at once and names the file."""
    images = [None if s.image is None else load_image(s.image) for s in samples]
    check_prompts(model, processor, [(s.prompt, s.image is not None) for s in samples], max_new_tokens,
                  image_sizes=[None if im is None else im.size[::-1] for im in images])
    state = getattr(model, "ivtp_state", None)
    results: list[Result] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        batch = samples[start : start + batch_size]
        batch_images = images[start : start + batch_size]
        results.extend(_generate_batch(model, processor, batch, batch_images, max_new_tokens, use_cache, state))
    return results


class PromptTooLongError(InputError):
    """A prompt longer than the model's positions."""


def image_positions(model, image_size=None) -> int:
    """The LLM positions one image takes: its placeholders (one per patch, or a compressor's count), or for a
    pruned model the tokens it hands the LLM. On LLaVA-NeXT the image's (height, width) sets them; without one,
    the most any image can take (at one of the grids' own sizes, where nothing is cut)."""
    config, state = model.config, getattr(model, "ivtp_state", None)
    if not is_anyres(config):
        return int(state.layout.counts(1)[1]) if state is not None else image_tokens(config)
    sizes = [image_size] if image_size is not None else config.image_grid_pinpoints
    if state is not None:
        return max(int(state.layout.counts(1, [size])[1]) for size in sizes)
    return max(stock_tokens(size, config) for size in sizes)


def check_prompts(model, processor, prompts: list[tuple[str, bool]], max_new_tokens: int = 0,
                  ids: list[str] | None = None, image_sizes: list | None = None) -> None:
    """Refuse, before any compute, a (question, has_image) the model cannot read: a question holding <image>, or
    one longer than the LLM's positions with its image (image_positions; image_sizes: each prompt's image
    (height, width) where known, which LLaVA-NeXT's count depends on). Llama's rotary positions run past
    max_position_embeddings without an error, into positions it never trained on, so without this check such a
    prompt is answered without a word. A prompt that fits but leaves less than `max_new_tokens` is logged. `ids`
    name the prompts in errors (default: their index)."""
    if not prompts:  # a resumed run with nothing left to answer
        return
    limit = model.config.text_config.max_position_embeddings
    longest = (-1, 0)
    for i, (question, has_image) in enumerate(prompts):
        text = vicuna_v1_prompt(question, has_image)  # a question holding <image> fails here
        positions = image_positions(model, image_sizes[i] if image_sizes else None) if has_image else 1
        n = len(processor.tokenizer(text).input_ids) + positions - 1
        longest = max(longest, (n, i))
    n, i = longest
    name = ids[i] if ids is not None else f"prompt {i + 1}"
    if n > limit:
        raise PromptTooLongError(f"{name} is {n} tokens long{' with its image' if prompts[i][1] else ''}, "
                                 f"more than the model's {limit} positions (max_position_embeddings); shorten it")
    if n + max_new_tokens > limit:
        logger.warning("%s: %d prompt tokens leave %d of the %d new tokens asked for within the model's %d "
                       "positions", name, n, limit - n, max_new_tokens, limit)


@torch.no_grad()
def _generate_batch(model, processor, batch, batch_images, max_new_tokens, use_cache, state) -> list[Result]:
    prompts = [vicuna_v1_prompt(s.prompt, has_image=img is not None) for s, img in zip(batch, batch_images)]
    present = [img for img in batch_images if img is not None]
    processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    inputs = processor(images=present or None, text=prompts, padding=True, return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    sizes = inputs.get("image_sizes")  # LLaVA-NeXT's (images, 2)
    if state is not None and present:
        # Shrink the <image> runs here rather than inside generate, so the prompt length is known.
        shrunk = model.ivtp_shrink(input_ids, inputs["pixel_values"], attention_mask, None, padding_side="left",
                                   image_sizes=sizes)
        input_ids, attention_mask = shrunk.input_ids, shrunk.attention_mask
    extra = {"pixel_values": inputs["pixel_values"]} if present else {}
    if sizes is not None:
        extra["image_sizes"] = sizes
    if state is not None:
        extra["ivtp_shrunk"] = True
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=use_cache, pad_token_id=processor.tokenizer.pad_token_id,
                         **extra)
    answers = processor.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    results, image_idx = [], 0
    for row, (sample, img, answer) in enumerate(zip(batch, batch_images, answers)):
        image_name = sample.image if isinstance(sample.image, str) else (None if img is None else "<image>")
        if img is None:
            results.append(Result(sample.prompt, image_name, answer.strip(), []))
            continue
        if state is not None:
            report = state.row_report(row, image_idx, 1)
            counts, kept = report.pop("visual_tokens"), report.pop("kept_patches")[0]
            stage1 = report.pop("stage1_patches")[0]
        else:  # an unpruned model: every patch reaches the LLM (through a compressor's tokens, if it has one)
            counts, kept, stage1, report = _unpruned_row(model.config, None if sizes is None else sizes[image_idx])
        pixels = inputs["pixel_values"][image_idx]
        size = None
        if sizes is not None:  # the image's own crops, not the batch's padding to its most
            size = tuple(sizes[image_idx].tolist())
            pixels = pixels[:crop_count(size, model.config)]
        results.append(Result(sample.prompt, image_name, answer.strip(), counts, kept, stage1,
                              pixels.float().cpu(), image_size=size, guidance=report))
        image_idx += 1
    return results


def _unpruned_row(config, image_size) -> tuple[list, list, list, dict]:
    """(counts, kept, stage-1 patches, guidance) of an image in an unpruned model: every patch reaches the LLM."""
    if image_size is None:
        n = num_patches(config)
        return [image_tokens(config)], list(range(n)), list(range(n)), {}
    places = stock_places(image_size, config)
    patches = sorted(places[places >= 0].tolist())
    return [len(places)], patches, patches, {}
