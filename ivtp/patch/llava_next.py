"""LLaVA-NeXT (transformers' `LlavaNextForConditionalGeneration`): the image features of a pruned model.

`apply_pruning` swaps `LlavaNextModel`'s class for one that overrides `get_image_features` alone; the top-level
forward and generate are LLaVA-1.5's (ivtp/patch/llava.py), which shrink each image's placeholder run to what
`PruningState.layout` (ivtp/anyres.py) says the image hands on.

Every crop of every image (the base view and each tile) goes through the method's runner as one batch, so each
crop is pruned on its own, with its own [CLS], to the same count (with `anyres.budget: per_image`, to its share of
the image's count: one batch per count). An image then hands the LLM its crops' survivors,
base view first and the tiles' in raster order over the whole tile grid, without the padding cut and the
image_newline tokens of the stock layout (docs/paper.md, "LLaVA-NeXT", says why). When nothing prunes, neither
before the LLM nor in it, the stock layout stands: transformers' own `pack_image_features` packs the features.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ivtp import anyres
from ivtp.methods.base import VisionRunner
from ivtp.patch.clip import VisionOutput, VisionTrace
from ivtp.patch.llava import PruningState, _check_feature_args


class PrunedLlavaNextModel:
    """Mixin for LlavaNextModel: stage-1 pruned image features, per crop."""

    ivtp_state: PruningState

    def get_image_features(self, pixel_values, image_sizes, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs):
        """pixel_values: (B, max crops, 3, S, S) as the processor pads them, or (sum of crops, 3, S, S);
        image_sizes: (B, 2) (height, width). pooler_output: per image, (tokens it hands on, D)."""
        _check_feature_args(self.config, vision_feature_layer, vision_feature_select_strategy)
        state = self.ivtp_state
        layout = state.layout
        crops = anyres.crop_counts(image_sizes, self.config)
        budgets = [b for n in crops for b in layout.crop_budgets(n)]  # per crop, images after each other
        out, places, counts = run_crops(state.vision, self.vision_tower, anyres.flatten_crops(pixel_values, crops),
                                        budgets, want_final_cls=state.aligner is not None)
        state.last_image_units = [1] * len(crops) if layout.units_are_images else crops
        state.last_image_counts = [[sum(c) for c in zip(*part)] for part in _split(counts, crops)]
        if layout.units_are_images:  # stage 2 counts images: its visual [CLS] is the mean of the image's crops'
            out = dataclasses.replace(out, cls_feature=_mean_per_image(out.cls_feature, crops),
                                      cls_final=_mean_per_image(out.cls_final, crops))
        state.last_vision = out
        features = self.multi_modal_projector(out.features).split(crops)  # per image: (crops, K, D)
        if layout.every_patch:  # transformers' own packing
            packed, _ = self.pack_image_features(list(features), image_sizes, "default", self.image_newline)
            state.last_image_places = [anyres.stock_places(size, self.config) for size in image_sizes]
            return BaseModelOutputWithPooling(last_hidden_state=out.features, pooler_output=packed)
        packed, state.last_image_places = [], []
        for f, p, size in zip(features, places.split(crops), image_sizes):
            flat = f.flatten(0, 1)  # (crops K, D)
            if layout.variable:  # VisPruner's: the stock layout's order and newlines, the kept patches only
                order = anyres.stock_order(p, size, self.config)  # (T,), -1: a newline
                newline = self.image_newline.to(flat.dtype)[None].expand(len(order), -1)
                packed.append(torch.where((order >= 0)[:, None], flat[order.clamp_min(0)], newline))
            else:  # the survivors, base view first, the tiles' in the map's raster order
                order = anyres.raster_order(p, anyres.tile_grid(size, self.config), anyres.side(self.config))
                packed.append(flat[order])
            state.last_image_places.append(anyres.places_of(p, order, self.config).cpu())
        return BaseModelOutputWithPooling(last_hidden_state=out.features, pooler_output=packed)


def run_crops(runner: VisionRunner, tower, pixels: torch.Tensor, budgets: list[int], want_final_cls: bool
              ) -> tuple[VisionOutput, torch.Tensor, list[list[int]]]:
    """Stage 1 on every crop, `budgets[c]` tokens kept from crop c: one batch per count. pixels: (C, 3, S, S).
    Returns the output with features (C, K, D), K the most any crop kept, a crop's features past its own count
    zeros; each feature's patch index (C, K), -1 for one that stands for no single patch, anyres.ABSENT for
    padding; per crop, its counts after the input and each step (VisionTrace.counts). With one count (every crop
    alike), the runner's own output, its trace intact; else a trace of the places, its counts per crop given
    apart."""
    counts = sorted(set(budgets))
    if len(counts) == 1:
        out = runner.at(counts[0]).run(tower, pixels, want_final_cls)
        return out, out.trace.places(out.features.shape[1]), [out.trace.counts] * len(budgets)
    want = torch.tensor(budgets, device=pixels.device)
    parts = [(torch.nonzero(want == k).flatten(), runner.at(k).run(tower, pixels[want == k], want_final_cls))
             for k in counts]
    most = max(o.features.shape[1] for _, o in parts)
    first = parts[0][1]
    features = first.features.new_zeros(len(budgets), most, first.features.shape[-1])  # (C, K, D)
    places = torch.full((len(budgets), most), anyres.ABSENT, dtype=torch.long, device=pixels.device)
    cls_feature = first.cls_feature.new_empty(len(budgets), first.cls_feature.shape[-1])
    cls_final = None if first.cls_final is None else first.cls_final.new_empty(len(budgets), first.cls_final.shape[-1])
    per_crop: list = [None] * len(budgets)
    for idx, o in parts:
        k = o.features.shape[1]
        features[idx, :k] = o.features
        places[idx, :k] = o.trace.places(k)
        cls_feature[idx] = o.cls_feature
        if cls_final is not None:
            cls_final[idx] = o.cls_final
        for c in idx.tolist():
            per_crop[c] = o.trace.counts
    trace = VisionTrace(counts=[], kept=places)  # counts differ crop to crop: per_crop holds them
    return VisionOutput(features, cls_feature, cls_final, trace), places, per_crop


def _split(items: list, sizes: list[int]) -> list[list]:
    """items cut into consecutive runs of the given sizes."""
    bounds = [0, *itertools.accumulate(sizes)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _mean_per_image(x: torch.Tensor | None, crops: list[int]) -> torch.Tensor | None:
    """(sum crops, D) -> (images, D), the mean of each image's crops."""
    return None if x is None else torch.stack([part.mean(0) for part in x.split(crops)])
