"""LLaVA-NeXT (transformers' `LlavaNextForConditionalGeneration`): the image features of a pruned model.

`apply_pruning` swaps `LlavaNextModel`'s class for one that overrides `get_image_features` alone; the top-level
forward and generate are LLaVA-1.5's (ivtp/patch/llava.py), which shrink each image's placeholder run to what
`PruningState.layout` (ivtp/anyres.py) says the image hands on.

Every crop of every image (the base view and each tile) goes through the method's runner as one batch, so each
crop is pruned on its own, with its own [CLS], to the same count. An image then hands the LLM its crops' survivors,
base view first and the tiles' in raster order over the whole tile grid, without the padding cut and the
image_newline tokens of the stock layout (docs/paper.md, "LLaVA-NeXT", says why). When nothing prunes, neither
before the LLM nor in it, the stock layout stands: transformers' own `pack_image_features` packs the features.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ivtp import anyres
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
        crops = anyres.crop_counts(image_sizes, self.config)
        out = state.vision.run(self.vision_tower, anyres.flatten_crops(pixel_values, crops),
                               want_final_cls=state.aligner is not None)
        state.last_vision = out
        state.last_image_crops = crops
        features = self.multi_modal_projector(out.features).split(crops)  # per image: (crops, K, D)
        layout = state.layout
        if layout.every_patch:  # transformers' own packing
            packed, _ = self.pack_image_features(list(features), image_sizes, "default", self.image_newline)
            state.last_image_places = [anyres.stock_places(size, self.config) for size in image_sizes]
            return BaseModelOutputWithPooling(last_hidden_state=out.features, pooler_output=packed)
        places = out.trace.places(out.features.shape[1]).split(crops)  # per image (crops, K), -1: no patch
        packed, state.last_image_places = [], []
        for f, p, size in zip(features, places, image_sizes):
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
