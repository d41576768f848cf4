"""The peer methods that prune before the LLM, as runners over the same CLIP tower (DESIGN.md section 9).

All read LLaVA's feature layer (-2); their tensor algorithms are in ivtp/ops/peers.py and ivtp/ops/merge.py.
- random:    a seeded uniform subset of the patches (the same one for every image).
- topk:      the patches most cosine-similar to [CLS] at the feature layer (IVTP Table 1).
- spatial:   2-D average pooling of the patch grid to the most square grid of `keep` cells (64 = 8 x 8,
             128 = 8 x 16).
- evit:      inside the feature layer, between attention and MLP: top-(keep - 1) by [CLS] attention, the rest
             fused into one token (their attention-weighted sum, as EViT; `fuse: mean` divides by the weights).
- tome:      bipartite soft matching on keys between attention and MLP of every feature layer, size-weighted
             merges, proportional attention, ToMe's token order (as its authors' ToMeBlock).
- fastervlm: top-keep by [CLS] attention at the feature layer.
- vispruner: important tokens by [CLS] attention plus diverse tokens by iterative duplicate removal.
(VisionDrop, FastV and SparseVLM, which prune inside the LLM, have modules of their own.)
"""

from __future__ import annotations

import math

import torch

from ivtp.config import ConfigError, resolve_budget
from ivtp.methods import register
from ivtp.methods.base import VisionRunner, attention_half, encode, mlp_half, output
from ivtp.ops import gather_tokens
from ivtp.patch.clip import layers_used, tower_patches
from ivtp.patch.probe import Probe
from ivtp.ops.merge import bipartite_soft_matching, merge_weighted, tome_schedule
from ivtp.ops.peers import (
    cls_attention_keep,
    evit_keep_and_fuse,
    pooling_grid,
    random_keep,
    spatial_pool,
    topk_cosine_to_cls,
    vispruner_select,
)


class PeerRunner(VisionRunner):
    """Shared set-up: the tower's geometry and the method's budget."""

    name = "peer"

    keep_key = "keep"  # the section's budget knob

    def __init__(self, section, tower_config, feature_layer: int):
        self.section = section
        self.num_patches = tower_patches(tower_config)
        self.layers_used = layers_used(tower_config.num_hidden_layers, feature_layer)
        self.tokens_per_image = self.budget()
        if self.layers_used == 0:
            raise ConfigError(f"{self.name}: the features come from the embeddings; no layer to score in")

    def budget(self) -> int:
        """Visual tokens per image this method hands the LLM."""
        return resolve_budget(getattr(self.section, self.keep_key), self.num_patches,
                              f"{self.name}.{self.keep_key}")

    def step_names(self) -> list[str]:
        return [self.name]

    def _select(self, tower, pixel_values, want_final_cls, pick):
        """Run the feature layers, let `pick(hidden, probe) -> kept (B, K)` choose patches, gather them."""
        hidden, probe = encode(tower, pixel_values, self.layers_used)
        kept = pick(hidden, probe)  # (B, K) among the patches, ascending
        selected = torch.cat([hidden[:, :1], gather_tokens(hidden[:, 1:], kept)], dim=1)
        return output(tower, selected, kept, [self.num_patches, kept.shape[1]], want_final_cls, self.layers_used)


class RandomRunner(PeerRunner):
    name = "random"

    def run(self, tower, pixel_values, want_final_cls):
        def pick(hidden, probe):
            gen = torch.Generator(device="cpu").manual_seed(self.section.seed)
            kept = random_keep(self.num_patches, self.tokens_per_image, gen).to(hidden.device)  # (K,)
            return kept.expand(hidden.shape[0], -1)

        return self._select(tower, pixel_values, want_final_cls, pick)


class TopKRunner(PeerRunner):
    name = "topk"

    def run(self, tower, pixel_values, want_final_cls):
        return self._select(tower, pixel_values, want_final_cls,
                            lambda h, p: topk_cosine_to_cls(h[:, 0], h[:, 1:], self.tokens_per_image))


class FasterVLMRunner(PeerRunner):
    name = "fastervlm"

    def run(self, tower, pixel_values, want_final_cls):
        return self._select(tower, pixel_values, want_final_cls,
                            lambda h, p: cls_attention_keep(p["row"][:, 1:], self.tokens_per_image))


class VisPrunerRunner(PeerRunner):
    name = "vispruner"
    keep_key = "visual_token_num"

    def run(self, tower, pixel_values, want_final_cls):
        return self._select(tower, pixel_values, want_final_cls, lambda h, p: vispruner_select(
            p["row"][:, 1:], h[:, 1:], self.tokens_per_image, self.section.important_ratio))


class SpatialRunner(PeerRunner):
    name = "spatial"

    def __init__(self, section, tower_config, feature_layer):
        super().__init__(section, tower_config, feature_layer)
        self.grid = math.isqrt(self.num_patches)
        self.out_grid = pooling_grid(self.tokens_per_image)
        if max(self.out_grid) > self.grid:
            raise ConfigError(f"spatial.keep: {self.tokens_per_image} tokens make a {self.out_grid[0]} x "
                              f"{self.out_grid[1]} grid, wider than the {self.grid} x {self.grid} patches")

    def run(self, tower, pixel_values, want_final_cls):
        hidden, _ = encode(tower, pixel_values, self.layers_used, probe_last=False)
        pooled = spatial_pool(hidden[:, 1:], self.grid, self.out_grid)  # (B, K, D)
        out = torch.cat([hidden[:, :1], pooled], dim=1)
        return output(tower, out, None, [self.num_patches, self.tokens_per_image], want_final_cls, self.layers_used)


class EViTRunner(PeerRunner):
    name = "evit"

    def __init__(self, section, tower_config, feature_layer):
        super().__init__(section, tower_config, feature_layer)
        if self.tokens_per_image < 2:
            raise ConfigError("evit.keep: at least 2 (one kept patch and the fused token)")

    def run(self, tower, pixel_values, want_final_cls):
        # EViT prunes inside the feature layer, as its Block does: after the attention's residual add, scored by
        # that attention's [CLS] row; the MLP then runs on [CLS], the kept patches and the fused token.
        hidden, _ = encode(tower, pixel_values, self.layers_used - 1, probe_last=False)  # (B, 1 + N, D)
        last = tower.encoder.layers[self.layers_used - 1]
        probe = Probe(mode="row")
        hidden = attention_half(last, hidden, probe=probe)
        tokens, kept = evit_keep_and_fuse(hidden[:, 1:], probe["row"][:, 1:], self.tokens_per_image - 1,
                                          normalize=self.section.fuse == "mean")  # (B, K, D), (B, K - 1)
        out = mlp_half(last, torch.cat([hidden[:, :1], tokens], dim=1))  # (B, 1 + K, D)
        return output(tower, out, kept, [self.num_patches, self.tokens_per_image], want_final_cls, self.layers_used)


class ToMeRunner(PeerRunner):
    """ToMe inside the tower, placed as in the authors' ToMeBlock: in every feature layer, after the attention's
    residual add and before the MLP, merge r tokens by bipartite soft matching on that attention's head-mean keys,
    [CLS] protected; sizes weight the merges (ToMe's merge_wavg) and bias every later attention by log(size)
    (proportional attention). The merged tokens come in ToMe's order (unmerged a-tokens, then b-tokens)."""

    name = "tome"

    def __init__(self, section, tower_config, feature_layer):
        super().__init__(section, tower_config, feature_layer)
        self.schedule = tome_schedule(self.num_patches + 1, self.tokens_per_image + 1, self.layers_used,
                                      protect_cls=True)

    def step_names(self) -> list[str]:
        return [f"tome.layer{i}" for i, r in enumerate(self.schedule) if r]

    def vit_tokens_per_layer(self) -> list[int]:
        # A layer's attention runs on the tokens it gets; its merge comes before its MLP, which runs on r fewer.
        # One count per layer: the larger, so the MLP is priced a little high.
        out, count = [], self.num_patches + 1
        for r in self.schedule:
            out.append(count)
            count -= r
        return out

    def block(self, layer, hidden, size, r):
        """One CLIP encoder layer with ToMe between its attention and its MLP (the layer's own modules; the
        attention is the patched one, which hands back its head-mean keys). hidden: (B, n, D); size: (B, n, 1)
        or None. Returns (B, n - r, D) and the sizes (None while nothing has merged)."""
        bias = None if size is None else size.log().to(hidden.dtype).transpose(1, 2)[:, None]  # (B, 1, 1, n)
        probe = Probe(mode=None, keys=True)
        hidden = attention_half(layer, hidden, bias, probe)
        if r:
            match = bipartite_soft_matching(probe["keys"], r, protect_cls=True, order=self.section.order)
            hidden, size = merge_weighted(hidden, size, match)
        return mlp_half(layer, hidden), size

    def run(self, tower, pixel_values, want_final_cls):
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (B, 1 + N, D)
        size = None  # (B, n, 1) original tokens per token
        counts = [self.num_patches]
        layers = tower.encoder.layers
        for layer, r in zip(layers[: self.layers_used], self.schedule):
            hidden, size = self.block(layer, hidden, size, r)
            if r:
                counts.append(hidden.shape[1] - 1)
        out = output(tower, hidden, None, counts, False, self.layers_used)
        if want_final_cls:  # the layers above the feature layer keep proportional attention (no more merges)
            top = hidden
            for layer in layers[self.layers_used :]:
                top, _ = self.block(layer, top, size, 0)
            out.cls_final = tower.post_layernorm(top[:, 0])  # (B, D)
        return out


for _runner in (RandomRunner, TopKRunner, FasterVLMRunner, VisPrunerRunner, SpatialRunner, EViTRunner, ToMeRunner):
    register(_runner.name)(lambda config, tower_config, feature_layer, cls=_runner:
                           cls(getattr(config, cls.name), tower_config, feature_layer))
