"""Pure tensor functions behind every pruning method: no model imports, testable on random tensors."""

from ivtp.ops import fused_maps
from ivtp.ops.rollout import (
    aggregate_group,
    gtp_scores,
    head_mean_attention,
    probe_modes,
    rollout_query_row,
    value_norms,
)
from ivtp.ops.select import compose_indices, gather_tokens, keep_topk_per_row, keep_topk_sorted, linear_schedule

__all__ = [
    "fused_maps",
    "aggregate_group",
    "probe_modes",
    "head_mean_attention",
    "rollout_query_row",
    "gtp_scores",
    "value_norms",
    "keep_topk_sorted",
    "keep_topk_per_row",
    "linear_schedule",
    "gather_tokens",
    "compose_indices",
]
