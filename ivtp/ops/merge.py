"""ToMe: bipartite soft matching and size-weighted merging (Bolya et al., "Token Merging: Your ViT but Faster").

Shapes: B batch, N tokens, C key dim, D feature dim, r tokens merged away in one step.

One step, given the keys of N tokens:
  1. split by alternating position: a = positions 0, 2, 4, ...; b = positions 1, 3, 5, ...
  2. cosine similarity between every a-key and every b-key; each a-token's best b-token is its match;
  3. the r a-tokens whose best match is most similar merge into those b-tokens; the rest of a, and all of b, stay.
Merging is a size-weighted average, and sizes add, so sum over tokens of size * x is conserved. The sizes are what
a model feeds to ToMe's proportional attention (log size added to the attention logits), which is model-side.

The survivors come back in the order of the authors' code (facebookresearch/ToMe, tome/merge.py): first the a-tokens
that did not merge, then every b-token (merged into or not) in b order. The unmerged a-tokens are in position order
when [CLS] is protected (so [CLS] stays first), otherwise most similar first. That order decides the a/b split of
the next step, so it is part of the algorithm. `order="spatial"` (ours, not the default) keeps the survivors in
position order instead; a merged token then sits at its b-token's position.

One deliberate departure: asking for more merges than a step allows is an error (ToMe silently clamps r), so that a
budget is never quietly missed. The limit itself is ToMe's: floor((N - protected) / 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ivtp.config import TOME_ORDERS


def tome_max_r(n: int, protect_cls: bool = False) -> int:
    """How many tokens one step can merge away from n: half the unprotected tokens, rounded down (ToMe's limit).

    With [CLS] protected that is every a-token but [CLS]; without, an odd n leaves one a-token that cannot merge.
    """
    return max(0, (n - int(protect_cls)) // 2)


@dataclass(frozen=True)
class ToMeMatch:
    """The outcome of one matching step over N tokens; apply it to any (B, N, D) tensor with `merge`.

    keep: (B, N - r) positions of the surviving tokens, in output order (all of b, and the a-tokens not merged;
          ToMe's order or ascending, see `bipartite_soft_matching`).
    src:  (B, r) positions of the a-tokens merged away, most similar first.
    dst:  (B, r) positions of the b-tokens they merge into (src[:, i] joins dst[:, i]).
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]

    def merge(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """x: (B, N, D) -> (B, N - r, D), accumulated in at least float32, returned in x's dtype.

        mode 'sum': each destination becomes itself plus the sources merged into it.
        mode 'mean': each destination becomes the plain mean of itself and its sources.
        """
        if mode not in ("sum", "mean"):
            raise ValueError(f"tome: mode must be 'sum' or 'mean', got {mode!r}")
        d = x.shape[-1]
        out = x.to(torch.promote_types(x.dtype, torch.float32))  # (B, N, D)
        if self.r:
            moved = torch.gather(out, 1, self.src.unsqueeze(-1).expand(-1, -1, d))  # (B, r, D)
            reduce = "sum" if mode == "sum" else "mean"
            # include_self: the destination's own value takes part in the sum or the mean. Out of place: the
            # gather above keeps `out` for its backward pass, so an in-place scatter would break training.
            out = out.scatter_reduce(1, self.dst.unsqueeze(-1).expand(-1, -1, d), moved, reduce=reduce,
                                     include_self=True)
        return torch.gather(out, 1, self.keep.unsqueeze(-1).expand(-1, -1, d)).to(x.dtype)  # (B, N - r, D)

    __call__ = merge


ORDERS = TOME_ORDERS  # 'tome' (the default) or 'spatial' (ours); the config's tome.order


def bipartite_soft_matching(keys: torch.Tensor, r: int, protect_cls: bool = False, order: str = "tome") -> ToMeMatch:
    """Match r a-tokens to b-tokens by the cosine similarity of their keys (one ToMe step).

    keys: (B, N, C), usually the head-mean attention keys of the layer. protect_cls: token 0 (an a-token) never
    merges (ToMe's class_token). r must lie in [0, tome_max_r(N, protect_cls)]. Ties in similarity break towards
    the lower position. order: 'tome' returns the survivors as ToMe does, the unmerged a-tokens (by position with
    [CLS] protected, else most similar first) then all b-tokens; 'spatial' returns them by position.
    """
    if order not in ORDERS:
        raise ValueError(f"tome: order must be one of {ORDERS}, got {order!r}")
    b, n, _ = keys.shape
    limit = tome_max_r(n, protect_cls)
    if not 0 <= r <= limit:
        raise ValueError(
            f"tome: r must be in [0, {limit}] (half the {n} tokens"
            f"{', [CLS] protected' if protect_cls else ''}, rounded down), got {r}"
        )
    pos = torch.arange(n, device=keys.device)
    if r == 0:  # ToMe does nothing at all here: the order stays as it was
        empty = pos.new_empty(b, 0)
        return ToMeMatch(keep=pos.expand(b, n).clone(), src=empty, dst=empty.clone())

    metric = F.normalize(keys.float(), dim=-1)  # (B, N, C) unit keys: dot product = cosine
    a, bb = metric[:, ::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C)
    scores = a @ bb.transpose(-1, -2)  # (B, Na, Nb)
    if protect_cls:
        scores[:, 0, :] = float("-inf")  # [CLS] ranks last and r <= Na - 1, so it is never chosen
    best, best_b = scores.max(dim=-1)  # (B, Na) similarity to, and index of, each a-token's match
    # Stable sort of the negated similarity: most similar first, ties to the lower position.
    ranked = torch.sort(-best, dim=-1, stable=True).indices  # (B, Na) local a indices, most similar first
    chosen = ranked[:, :r]  # (B, r) the a-tokens that merge
    src = 2 * chosen  # (B, r) a-token j sits at position 2j
    dst = 2 * torch.gather(best_b, 1, chosen) + 1  # (B, r) b-token j sits at position 2j + 1

    if order == "spatial":
        survive = torch.ones(b, n, dtype=torch.bool, device=keys.device)
        survive.scatter_(1, src, False)
        # Boolean indexing walks each row in order, and every row keeps exactly N - r, so the view is exact.
        keep = pos.expand(b, n)[survive].view(b, n - r)  # (B, N - r) ascending
    else:
        unmerged = ranked[:, r:]  # (B, Na - r) most similar first
        if protect_cls:
            unmerged = unmerged.sort(dim=-1).values  # by position: [CLS] (a-token 0) leads
        keep = torch.cat([2 * unmerged, pos[1::2].expand(b, -1)], dim=1)  # (B, N - r): unmerged a, then all b
    return ToMeMatch(keep=keep, src=src, dst=dst)


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor | None, match: ToMeMatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: each destination becomes the size-weighted average of itself and its sources.

    x: (B, N, D); size: (B, N, 1) how many original tokens each token stands for (None: all ones).
    Returns (x', size'): (B, N - r, D) and (B, N - r, 1), with sum(size' * x') == sum(size * x) per row.
    """
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
    work = torch.promote_types(torch.promote_types(x.dtype, size.dtype), torch.float32)
    weighted = match.merge(x.to(work) * size.to(work), mode="sum")  # (B, N - r, D) sum of size * x
    new_size = match.merge(size.to(work), mode="sum")  # (B, N - r, 1) sizes add
    return (weighted / new_size).to(x.dtype), new_size.to(size.dtype)


def tome_schedule(n: int, target: int, layers: int, protect_cls: bool = False) -> list[int]:
    """Per-layer r that takes n tokens to exactly `target` over `layers` ToMe steps.

    Ours, for a fixed token budget: ToMe itself takes a constant r per layer (or a list, or an r with a slope) and
    lands wherever that leads. Counts include a protected [CLS]. The reduction is spread as evenly as possible
    (earlier layers take the remainder). One step can at most halve the unprotected tokens, so where an even split
    would ask a later layer for more than it can merge, earlier layers merge more instead. Raises ValueError when
    no schedule reaches the target.
    """
    if layers < 1:
        raise ValueError(f"tome: layers must be at least 1, got {layers}")
    if not 1 <= target <= n:
        raise ValueError(f"tome: target must be in [1, {n}], got {target}")

    def floor_after(count: int, steps: int) -> int:
        # The fewest tokens reachable from `count` in `steps` steps: merge the most possible at every step.
        for _ in range(steps):
            count -= tome_max_r(count, protect_cls)
        return count

    if floor_after(n, layers) > target:
        raise ValueError(
            f"tome: target {target} is out of reach from {n} tokens in {layers} layers "
            f"(at best {floor_after(n, layers)}: one step merges at most half)"
        )
    schedule, count = [], n
    for step in range(layers):
        left = layers - step
        need = count - target
        even = -(-need // left)  # ceil
        # The least this step may merge so that the remaining steps can still reach the target. floor_after grows
        # with its count (a step leaves ceil((count - [CLS]) / 2) + [CLS]), so bisect over r in [0, need].
        lo, hi = 0, need
        while lo < hi:
            mid = (lo + hi) // 2
            if floor_after(count - mid, left - 1) <= target:
                hi = mid
            else:
                lo = mid + 1
        least = lo
        r = min(max(even, least), tome_max_r(count, protect_cls))
        schedule.append(r)
        count -= r
    return schedule
