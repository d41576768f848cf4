"""Group-wise attention rollout and GTP importance scores (IVTP eqs. 2-4).

Shapes: B batch, H heads, N tokens (including the query token: the ViT [CLS] or, in the LLM, the pseudo-CLS),
Dh head dim.

Eq. 3 rolls attention out over the layers l1..l2 of one group:
    R(l1) = A(l1),   R(l) = norm(A(l) + I) @ R(l-1)   for l1 < l <= l2,
where norm() renormalises rows to sum 1. Only the query's row of R(l2) is needed, and a row vector times a
product of matrices can be pushed down the product one matrix at a time, so the top layer needs only its query
row and each lower layer its full head-mean matrix. Nothing here ever forms the N x N product.
"""

from __future__ import annotations

import torch


def head_mean_attention(
    query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention averaged over heads, in float32 (eq. 2).

    query: (B, H, Nq, Dh), key: (B, H, Nk, Dh), mask: additive, broadcastable to (B, H, Nq, Nk) or None.
    Returns (B, Nq, Nk); each row sums to 1.
    """
    logits = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))  # (B, H, Nq, Nk)
    if mask is not None:
        logits = logits + mask.float()
    return logits.softmax(dim=-1).mean(dim=1)  # (B, Nq, Nk)


def _add_identity_row(row: torch.Tensor, query_index: int) -> torch.Tensor:
    """Row `query_index` of norm(A + I), given that row of A. row: (B, N) -> (B, N)."""
    row = row.clone()
    row[:, query_index] += 1.0
    return row / row.sum(dim=-1, keepdim=True)


def rollout_query_row(lower: list[torch.Tensor], top_row: torch.Tensor, query_index: int = 0) -> torch.Tensor:
    """The query's row of the group rollout R(l2) of eq. 3.

    lower:   head-mean attention matrices of the group's layers below the top, bottom layer first, each (B, N, N).
             Empty for a group of one layer, where the rollout is that layer's own attention.
    top_row: head-mean attention row of the query at the group's top layer, (B, N).
    Returns (B, N), summing to 1.
    """
    if not lower:
        return top_row.float()
    # e_q^T norm(A(l2) + I)
    row = _add_identity_row(top_row.float(), query_index)  # (B, N)
    # ... norm(A(l) + I) for l2 > l > l1, pushed down one layer at a time: row @ norm(A + I).
    # With s_i = 1 + sum_j A[i, j], row @ norm(A + I) = (row / s) @ A + row / s: no N x N temporary.
    for attn in reversed(lower[1:]):
        attn = attn.float()  # (B, N, N)
        row = row / (attn.sum(dim=-1) + 1.0)  # (B, N)
        row = torch.bmm(row.unsqueeze(1), attn).squeeze(1) + row  # (B, N)
    # ... A(l1): the bottom layer enters without the identity.
    return torch.bmm(row.unsqueeze(1), lower[0].float()).squeeze(1)  # (B, N)


def value_norms(value: torch.Tensor) -> torch.Tensor:
    """||V_i|| with the heads concatenated. value: (B, H, N, Dh) -> (B, N)."""
    return torch.linalg.vector_norm(value, dim=(1, 3), dtype=torch.float32)


def gtp_scores(query_row: torch.Tensor, vnorms: torch.Tensor, query_index: int = 0) -> torch.Tensor:
    """Eq. 4: S_i = R[q, i] ||V_i|| / sum_j R[q, j] ||V_j||, over every token but the query itself.

    query_row: (B, N) rollout row, vnorms: (B, N). Returns (B, N - 1) in the order of the remaining tokens.
    """
    q = query_index % query_row.shape[-1]

    def without_query(x):  # (B, N) -> (B, N-1), by slicing: a list index is copied to the device (a GPU sync)
        if q == 0:
            return x[:, 1:]
        if q == x.shape[-1] - 1:
            return x[:, :-1]
        return torch.cat([x[:, :q], x[:, q + 1 :]], dim=-1)

    weighted = without_query(query_row).float() * without_query(vnorms).float()  # (B, N-1)
    return weighted / weighted.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def probe_modes(aggregation: str, group_len: int) -> list[str | None]:
    """What each layer of a group must record, bottom first: 'full' (the head-mean matrix), 'row' (the query
    row) or None (nothing)."""
    if aggregation == "rollout":
        return ["full"] * (group_len - 1) + ["row"]
    if aggregation in ("mean", "max", "multiply"):
        return ["row"] * group_len
    return [None] * (group_len - 1) + ["row"]  # single_layer, layer_wise: the top layer's own row


def aggregate_group(aggregation: str, lower: list[torch.Tensor], rows: list[torch.Tensor],
                    query_index: int = 0) -> torch.Tensor:
    """One importance row for a group (IVTP Tables 4-5).

    lower: head-mean matrices of the layers below the top (rollout only), each (B, N, N).
    rows:  the query rows the group recorded, bottom first, each (B, N). Returns (B, N), summing to 1.
    """
    if aggregation == "rollout":
        return rollout_query_row(lower, rows[-1], query_index)
    if aggregation in ("single_layer", "layer_wise"):
        return rows[-1].float()
    stacked = torch.stack([r.float() for r in rows])  # (G, B, N)
    if aggregation == "mean":
        out = stacked.mean(0)
    elif aggregation == "max":
        out = stacked.max(0).values
    elif aggregation == "multiply":
        out = stacked.prod(0)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
