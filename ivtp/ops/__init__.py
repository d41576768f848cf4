"""Pure tensor functions behind every pruning method: no model imports, testable on random tensors."""

from ivtp.ops.rollout import head_mean_attention, rollout_query_row, gtp_scores, value_norms
from ivtp.ops.select import keep_topk_sorted, linear_schedule, gather_tokens, compose_indices

__all__ = [
    "head_mean_attention",
    "rollout_query_row",
    "gtp_scores",
    "value_norms",
    "keep_topk_sorted",
    "linear_schedule",
    "gather_tokens",
    "compose_indices",
]
