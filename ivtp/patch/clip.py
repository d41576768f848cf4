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

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import eager_attention_forward

from ivtp.config import ConfigError, VisionStage, check_schedule_counts, resolve_budget
from ivtp.ops import (
    compose_indices,
    gather_tokens,
    gtp_scores,
    head_mean_attention,
    keep_topk_sorted,
    linear_schedule,
    rollout_query_row,
    value_norms,
)

CLS_INDEX = 0  # CLIP puts [CLS] first


class GTPAttention(nn.Module):
    """Mixin forward for CLIPAttention; `patch_attention` builds the concrete subclass."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, ivtp_probe: dict | None = None, **kwargs):
        if ivtp_probe is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, Dh)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, Dh)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, N, Dh)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            self, query, key, value, attention_mask,
            scaling=self.scale, dropout=0.0 if not self.training else self.dropout, **kwargs,
        )
        out = self.out_proj(out.reshape(*input_shape, -1).contiguous())  # (B, N, D)

        # The scores are a decision, not a differentiable path: no graph is kept for them.
        with torch.no_grad():
            if ivtp_probe["mode"] == "full":
                ivtp_probe["attn"] = head_mean_attention(query, key, self.scale)  # (B, N, N)
            else:  # the group's top layer: only the query row, plus ||V_i||
                q = ivtp_probe.get("query_index", CLS_INDEX) % query.shape[2]
                row = head_mean_attention(query[:, :, q : q + 1], key, self.scale)  # (B, 1, N)
                ivtp_probe["row"] = row[:, 0]  # (B, N)
                ivtp_probe["vnorm"] = value_norms(value)  # (B, N)
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

    @property
    def keep(self) -> int:
        return self.counts[-1] if self.counts else self.num_patches

    def step_names(self) -> list[str]:
        return [f"vit.layers{lo}-{hi}" if lo != hi else f"vit.layer{lo}" for lo, hi in self.groups]


def make_vision_plan(stage: VisionStage, num_layers: int, feature_layer: int, num_patches: int) -> VisionPlan:
    """Resolve groups and the per-group budgets. Raises ConfigError for budgets the tower cannot meet."""
    layers_used = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= layers_used <= num_layers:
        raise ConfigError(f"vision_feature_layer {feature_layer} does not exist in a {num_layers}-layer tower")
    keep = resolve_budget(stage.keep, num_patches, "vision.keep")
    if layers_used == 0:
        if keep != num_patches:
            raise ConfigError("vision.keep: the features come from the embeddings; no layer is left to prune in")
        return VisionPlan(num_patches, 0, [], [])
    g = stage.group_size
    groups = [(lo, min(lo + g, layers_used) - 1) for lo in range(0, layers_used, g)]
    if stage.schedule == "linear":
        counts = linear_schedule(num_patches, keep, len(groups))
    else:
        if len(stage.schedule) != len(groups):
            raise ConfigError(
                f"vision.schedule: {len(stage.schedule)} entries given, but {layers_used} layers in groups of "
                f"{g} make {len(groups)} pruning steps"
            )
        counts = [resolve_budget(b, num_patches, f"vision.schedule[{i}]") for i, b in enumerate(stage.schedule)]
        check_schedule_counts(counts, num_patches, "vision.schedule")
        if counts[-1] != keep:
            raise ConfigError(f"vision.schedule: the last step keeps {counts[-1]}, but vision.keep is {keep}")
    return VisionPlan(num_patches, layers_used, groups, counts)


@dataclass
class VisionTrace:
    """What stage 1 did to one batch of images."""

    counts: list[int]  # patches after the input and after each group
    kept: torch.Tensor  # (n_images, K) original patch indices that reached the projector, ascending
    scores: list[torch.Tensor] = field(default_factory=list)  # per group, (n_images, n_before) eq.-4 scores


def prune_vision_tower(vision_tower: nn.Module, pixel_values: torch.Tensor, plan: VisionPlan):
    """Run the CLIP tower with GTP and return the pruned patch features of the feature layer.

    pixel_values: (B, 3, S, S). Returns (features (B, K, D) without [CLS], VisionTrace).
    The layers above the feature layer are not run: LLaVA never reads them.
    """
    hidden = vision_tower.embeddings(pixel_values)  # (B, 1 + N, D)
    hidden = vision_tower.pre_layrnorm(hidden)
    layers = vision_tower.encoder.layers
    batch = hidden.shape[0]
    origin = torch.arange(plan.num_patches, device=hidden.device).expand(batch, -1)  # (B, N) original indices
    trace = VisionTrace(counts=[plan.num_patches], kept=origin)

    for (lo, hi), count in zip(plan.groups, plan.counts):
        lower: list[torch.Tensor] = []
        probe: dict = {}
        for layer_idx in range(lo, hi + 1):
            probe = {"mode": "full" if layer_idx < hi else "row", "query_index": CLS_INDEX}
            hidden = layers[layer_idx](hidden, None, ivtp_probe=probe)  # (B, 1 + n, D)
            if layer_idx < hi:
                lower.append(probe["attn"])
        row = rollout_query_row(lower, probe["row"], CLS_INDEX)  # (B, 1 + n)
        scores = gtp_scores(row, probe["vnorm"], CLS_INDEX)  # (B, n)
        keep = keep_topk_sorted(scores, count)  # (B, count), spatial order
        hidden = torch.cat([hidden[:, :1], gather_tokens(hidden[:, 1:], keep)], dim=1)  # (B, 1 + count, D)
        origin = compose_indices(origin, keep)
        trace.counts.append(count)
        trace.scores.append(scores)
    trace.kept = origin
    return hidden[:, 1:], trace
