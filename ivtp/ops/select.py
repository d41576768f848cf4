"""Token selection: budgets over steps, top-k that keeps spatial order, index bookkeeping."""

from __future__ import annotations

import torch


def linear_schedule(start: int, end: int, steps: int) -> list[int]:
    """Token counts after each of `steps` pruning steps, falling linearly from `start` to exactly `end`."""
    if steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {steps}")
    if not 1 <= end <= start:
        raise ValueError(f"a schedule must fall from {start} to a count in [1, {start}], got {end}")
    return [int(round(start - (start - end) * (i + 1) / steps)) for i in range(steps)]


def keep_topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, in ascending (original spatial) order.

    scores: (B, N). Returns (B, k) int64. Ties break towards the lower index, so the result is deterministic.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    if k == n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n).clone()
    # A stable sort on the negated scores ranks equal scores by position.
    order = torch.sort(-scores.float(), dim=-1, stable=True).indices[:, :k]  # (B, k)
    return order.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D), index: (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def compose_indices(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Map indices taken from an already-pruned set back to the original tokens.

    outer: (B, N1) original indices of the current tokens; inner: (B, K) positions among them. Returns (B, K).
    """
    return torch.gather(outer, 1, inner)


def keep_topk_per_row(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k[b] highest scores of each row b, among its valid entries.

    scores: (B, N), k: (B,) int64, valid: (B, N) bool or None. Returns (B, N) bool. Ties break towards the lower
    index; invalid entries are never kept, so k[b] must not exceed the row's valid count.
    """
    s = scores.float()
    if valid is not None:
        # A compiled prefill reads nothing back: its host checked the counts before it ran.
        if not torch.compiler.is_compiling() and bool((valid.sum(-1) < k).any()):
            raise ValueError(f"cannot keep {k.tolist()} of {valid.sum(-1).tolist()} valid tokens")
        s = s.masked_fill(~valid, float("-inf"))
    order = torch.sort(-s, dim=-1, stable=True).indices  # (B, N) best first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return rank < k.unsqueeze(-1)
