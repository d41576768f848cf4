"""Stage 1: Group-wise Token Pruning inside the CLIP vision tower (IVTP section 3.2, DESIGN.md section 4).

Two pieces, in the ToMe manner:
- `GTPAttention` is swapped in as the class of every CLIPAttention of the tower. It overrides `forward` only:
  the attention output still comes from the implementation the model was loaded with (SDPA, flash, eager), and,
  when the caller hands it a probe dict, it also computes the attention rows the rollout needs from the same
  q/k/v: the full head-mean matrix for a group's lower layers, the [CLS] row and the value norms for its top.
- `prune_vision_tower` runs the tower layer by layer, rolls attention out over each group, prunes at the group's
  top layer and returns the features of the layer LLaVA reads (hidden_states[vision_feature_layer]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import eager_attention_forward

from ivtp.config import ConfigError, VisionStage, check_schedule_counts, resolve_budget
from ivtp.ops import (
    aggregate_group,
    compose_indices,
    fused_maps,
    gather_tokens,
    gtp_scores,
    head_mean_attention,
    keep_topk_sorted,
    linear_schedule,
    probe_modes,
    value_norms,
)
from ivtp.patch.probe import Probe

CLS_INDEX = 0  # CLIP puts [CLS] first


class MapScratch:
    """One float32 buffer that every rollout layer of an inference pass writes its attention maps into.

    A fresh (B, H, N, N) tensor per product is paid in page faults on a CPU: on one 577-token, 8-head layer of
    cpu-mid at 2 threads, reusing a buffer took the unfused attention from 8.9 to 5.4 ms (fused SDPA: 3.9 ms).
    The first (largest) group sizes it; later groups, with fewer tokens, take a prefix.
    """

    def __init__(self):
        self._flat: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        if self._flat is None or self._flat.numel() < numel or self._flat.device != device:
            self._flat = torch.empty(numel, dtype=torch.float32, device=device)
        return self._flat[:numel].view(shape)


class GTPAttention(nn.Module):
    """Mixin forward for CLIPAttention; `patch_attention` builds the concrete subclass."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, ivtp_probe: Probe | None = None, **kwargs):
        if ivtp_probe is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, Dh)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, Dh)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, Dh)

        mode = ivtp_probe.get("mode")
        fused = mode == "full" and attention_mask is None and fused_maps.available(query)
        if mode == "full" and attention_mask is None and not fused:
            # A lower layer of a rollout group needs every row of its attention anyway: compute the weights once,
            # in float32, and take both the output and the head mean from them (no second pass through SDPA).
            # This replaces the layer's own attention, so only the head mean counts as scoring.
            scratch = ivtp_probe.get("scratch")
            if scratch is not None and not torch.is_grad_enabled():  # inference: fill the shared buffer in place
                weights = scratch.take((*query.shape[:-1], key.shape[-2]), query.device)  # (B, H, N, N)
                torch.matmul(query.float() * self.scale, key.float().transpose(-1, -2), out=weights)
                torch.softmax(weights, -1, out=weights)
            else:  # autograd keeps the softmax output for the backward pass: a tensor of its own
                weights = torch.matmul(query.float() * self.scale, key.float().transpose(-1, -2)).softmax(-1)
                if self.training and self.dropout:
                    weights = nn.functional.dropout(weights, p=self.dropout)
            out = torch.matmul(weights.to(value.dtype), value).transpose(1, 2)  # (B, N, H, Dh)
            with torch.no_grad(), torch.profiler.record_function("ivtp.score"):
                ivtp_probe["attn"] = weights.detach().mean(dim=1)  # (B, N, N)
        else:
            attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            out, _ = attention(
                self, query, key, value, attention_mask,
                scaling=self.scale, dropout=0.0 if not self.training else self.dropout, **kwargs,
            )
        out = self.out_proj(out.reshape(*input_shape, -1).contiguous())  # (B, N, D)

        # The scores are a decision, not a differentiable path: no graph is kept for them. The label lets
        # `ivtp bench` price the scoring on its own.
        with torch.no_grad(), torch.profiler.record_function("ivtp.score"):
            if fused:  # on a GPU: the layer's own (fused) attention above, the map from the Triton kernels here
                ivtp_probe["attn"] = fused_maps.maps(query.detach(), key.detach(), self.scale)  # (B, N, N) or None
            if mode == "full" and ivtp_probe.get("attn") is None:  # a mask (ToMe's sizes), or no kernel: torch ops
                ivtp_probe["attn"] = head_mean_attention(query, key, self.scale, attention_mask)  # (B, N, N)
            elif mode == "row":  # only the [CLS] query row, plus ||V_i|| for the top layer's scores
                row = head_mean_attention(query[:, :, CLS_INDEX : CLS_INDEX + 1], key, self.scale,
                                          None if attention_mask is None else attention_mask[:, :, :1])
                ivtp_probe["row"] = row[:, 0]  # (B, N)
                ivtp_probe["vnorm"] = value_norms(value)  # (B, N)
            if ivtp_probe.get("keys") is True:  # methods that match tokens by key similarity (ToMe, VisionDrop)
                ivtp_probe["keys"] = key.float().mean(dim=1)  # (B, N, Dh)
        return out, None


def patch_attention(attn: nn.Module) -> None:
    """Swap the class of one CLIPAttention module for its GTP subclass (weights untouched)."""
    if isinstance(attn, GTPAttention):
        return
    attn.__class__ = type(f"GTP{attn.__class__.__name__}", (GTPAttention, attn.__class__), {})


@dataclass
class VisionPlan:
    """Stage 1 resolved against one vision tower: which layers form each group and how many patches survive."""

    num_patches: int
    layers_used: int  # layers that produce the features LLaVA reads (23 of 24 for layer -2)
    groups: list[tuple[int, int]]  # inclusive layer ranges, bottom first
    counts: list[int]  # patches left after each group
    aggregation: str = "rollout"
    score: bool = True  # False: stage 1 is off, the layers just run

    @property
    def keep(self) -> int:
        return self.counts[-1] if self.counts else self.num_patches

    def step_names(self) -> list[str]:
        if not self.score:
            return []
        return [f"vit.layers{lo}-{hi}" if lo != hi else f"vit.layer{lo}" for lo, hi in self.groups]


def tower_patches(vision_config) -> int:
    """Patch tokens of a square CLIP tower: (image_size / patch_size)^2, 576 for LLaVA-1.5."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def layers_used(num_layers: int, feature_layer: int) -> int:
    """How many layers produce LLaVA's features: the hidden-state index, or 23 of 24 for -2."""
    used = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= used <= num_layers:
        raise ConfigError(f"vision_feature_layer {feature_layer} does not exist in a {num_layers}-layer tower")
    return used


def passthrough_plan(num_layers: int, feature_layer: int, num_patches: int) -> VisionPlan:
    """Stage 1 off: the feature layers run unpruned (the [CLS] the aligner needs still comes out)."""
    used = layers_used(num_layers, feature_layer)
    return VisionPlan(num_patches, used, [(0, used - 1)] if used else [], [num_patches] if used else [],
                      score=False)


def group_layers(first: int, count: int, group_size: int) -> list[tuple[int, int]]:
    """Consecutive groups of `group_size` over layers first..first+count-1; the last may be shorter."""
    end = first + count
    return [(lo, min(lo + group_size, end) - 1) for lo in range(first, end, group_size)]


def resolve_schedule(schedule, keep: int, available: int, steps: int, key: str, what: str) -> list[int]:
    """Token counts after each of `steps` pruning steps, from 'linear' or an explicit list of budgets."""
    if schedule == "linear":
        return linear_schedule(available, keep, steps)
    if len(schedule) != steps:
        raise ConfigError(f"{key}.schedule: {len(schedule)} entries given, but {what} make {steps} pruning steps")
    counts = [resolve_budget(b, available, f"{key}.schedule[{i}]") for i, b in enumerate(schedule)]
    check_schedule_counts(counts, available, f"{key}.schedule")
    if counts[-1] != keep:
        raise ConfigError(f"{key}.schedule: the last step keeps {counts[-1]}, but {key}.keep is {keep}")
    return counts


def make_vision_plan(stage: VisionStage, num_layers: int, feature_layer: int, num_patches: int) -> VisionPlan:
    """Resolve groups and the per-group budgets. Raises ConfigError for budgets the tower cannot meet."""
    used = layers_used(num_layers, feature_layer)
    keep = resolve_budget(stage.keep, num_patches, "vision.keep")
    if used == 0:
        if keep != num_patches:
            raise ConfigError("vision.keep: the features come from the embeddings; no layer is left to prune in")
        return VisionPlan(num_patches, 0, [], [], stage.aggregation)
    g = stage.effective_group_size
    groups = group_layers(0, used, g)
    counts = resolve_schedule(stage.schedule, keep, num_patches, len(groups), "vision",
                              f"{used} layers in groups of {g}")
    return VisionPlan(num_patches, used, groups, counts, stage.aggregation)


@dataclass
class VisionTrace:
    """What stage 1 did to one batch of images."""

    counts: list[int]  # patches after the input and after each group
    kept: torch.Tensor  # (n_images, K) original patch indices that reached the projector, ascending
    scores: list[torch.Tensor] = field(default_factory=list)  # per group, (n_images, n_before) eq.-4 scores
    # Which features the kept patches are: features[:, first:first + kept.shape[1]], in order. Any other feature
    # (a [CLS] handed on, EViT's fused token, merged tokens) stands for no single patch.
    first: int = 0

    def places(self, tokens: int) -> torch.Tensor:
        """(n_images, tokens): each feature's original patch index, -1 for one that stands for no single patch."""
        out = torch.full((self.kept.shape[0], tokens), -1, dtype=torch.long, device=self.kept.device)
        out[:, self.first:self.first + self.kept.shape[1]] = self.kept
        return out


@dataclass
class VisionOutput:
    features: torch.Tensor  # (B, K, D) pruned patch features of the feature layer, [CLS] dropped
    cls_feature: torch.Tensor  # (B, D) [CLS] at the feature layer (what the projector would see)
    cls_final: torch.Tensor | None  # (B, D) post-layernormed [CLS] of the last layer (the aligner's input)
    trace: VisionTrace


def prune_vision_tower(vision_tower: nn.Module, pixel_values: torch.Tensor, plan: VisionPlan,
                       want_final_cls: bool = False) -> VisionOutput:
    """Run the CLIP tower with GTP and return the pruned patch features of the feature layer.

    pixel_values: (B, 3, S, S). The layers above the feature layer run only if `want_final_cls` asks for the last
    layer's [CLS], and then the last one for the [CLS] query alone.
    """
    hidden = vision_tower.embeddings(pixel_values)  # (B, 1 + N, D)
    hidden = vision_tower.pre_layrnorm(hidden)
    layers = vision_tower.encoder.layers
    batch = hidden.shape[0]
    origin = torch.arange(plan.num_patches, device=hidden.device).expand(batch, -1)  # (B, N) original indices
    trace = VisionTrace(counts=[plan.num_patches], kept=origin)
    scratch = MapScratch()  # used only without autograd (GTPAttention checks)

    for (lo, hi), count in zip(plan.groups, plan.counts):
        if not plan.score:
            for layer_idx in range(lo, hi + 1):
                hidden = layers[layer_idx](hidden, None)
            continue
        lower: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        probe: Probe | None = None
        for layer_idx, mode in zip(range(lo, hi + 1), probe_modes(plan.aggregation, hi - lo + 1)):
            probe = None if mode is None else Probe(mode=mode, scratch=scratch)
            hidden = layers[layer_idx](hidden, None, ivtp_probe=probe)  # (B, 1 + n, D)
            if mode == "full":
                lower.append(probe["attn"])
            elif mode == "row":
                rows.append(probe["row"])
        row = aggregate_group(plan.aggregation, lower, rows, CLS_INDEX)  # (B, 1 + n)
        scores = gtp_scores(row, probe["vnorm"], CLS_INDEX)  # (B, n)
        keep = keep_topk_sorted(scores, count)  # (B, count), spatial order
        hidden = torch.cat([hidden[:, :1], gather_tokens(hidden[:, 1:], keep)], dim=1)  # (B, 1 + count, D)
        origin = compose_indices(origin, keep)
        trace.counts.append(count)
        trace.scores.append(scores)
    trace.kept = origin
    cls_feature = hidden[:, 0]
    cls_final = final_cls(vision_tower, hidden, plan.layers_used) if want_final_cls else None
    return VisionOutput(hidden[:, 1:], cls_feature, cls_final, trace)


def final_cls(vision_tower: nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """The post-layernormed [CLS] of the last layer, from the (pruned) tokens at layer `start`.

    Layers below the last run in full (their outputs feed the next layer's keys); the last runs for the [CLS]
    query alone: its keys and values need every token, its MLP only the [CLS]. hidden: (B, 1 + n, D) -> (B, D).
    """
    layers = vision_tower.encoder.layers
    for layer in layers[start:-1]:
        hidden = layer(hidden, None)
    if start < len(layers):
        layer = layers[-1]
        attn = layer.self_attn
        b, n, d = hidden.shape
        x = layer.layer_norm1(hidden)  # (B, 1 + n, D)
        q = attn.q_proj(x[:, :1]).view(b, 1, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1, Dh)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1 + n, Dh)
        v = attn.v_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1 + n, Dh)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, H, 1, Dh)
        cls = hidden[:, :1] + attn.out_proj(o.transpose(1, 2).reshape(b, 1, d))  # (B, 1, D)
        hidden = cls + layer.mlp(layer.layer_norm2(cls))
    return vision_tower.post_layernorm(hidden[:, 0])  # (B, D)
