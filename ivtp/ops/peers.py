"""The tensor algorithms of the peer methods IVTP is compared against (DESIGN.md section 9, IVTP Table 1).

Shapes: B batch, N tokens (patches only: no [CLS] unless a docstring says so), D feature dim, C key dim, H heads,
Dh head dim. Nothing here touches a model: callers pass in the attention rows, keys and features they recorded.

Conventions shared by every function:
  - a function asked for k tokens returns exactly k, or raises;
  - pruning functions return indices sorted ascending, i.e. the kept tokens in their original spatial order, and
    score ties break towards the lower index, so results are deterministic;
  - a budget or knob out of range raises ValueError naming the method and the knob, e.g.
    "vispruner: important_ratio must be in (0, 1], got 1.5".

ToMe lives in ivtp.ops.merge and is re-exported here, so that `from ivtp.ops.peers import ...` reaches every peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import math

import torch
import torch.nn.functional as F

from ivtp.ops.merge import ToMeMatch, bipartite_soft_matching, merge_weighted, tome_max_r, tome_schedule
from ivtp.ops.select import gather_tokens, keep_topk_sorted

__all__ = [
    "random_keep",
    "topk_cosine_to_cls",
    "spatial_pool",
    "evit_keep_and_fuse",
    "ToMeMatch",
    "bipartite_soft_matching",
    "merge_weighted",
    "tome_max_r",
    "tome_schedule",
    "fastv_keep",
    "cls_attention_keep",
    "vispruner_split",
    "vispruner_select",
    "VisionDropResult",
    "VisionDropStage",
    "visiondrop_merge",
    "visiondrop_encoder",
    "visiondrop_llm_scores",
    "visiondrop_schedule",
]


# ---------------------------------------------------------------------------------------------------- checks


def _check_count(method: str, knob: str, value: int, low: int, high: int, what: str = "") -> None:
    if not low <= value <= high:
        raise ValueError(f"{method}: {knob} must be in [{low}, {high}]{what}, got {value}")


def _check_ratio(method: str, knob: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{method}: {knob} must be in (0, 1], got {value}")


def _check_dims(method: str, name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ValueError(f"{method}: {name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_same(method: str, names: str, a: int, b: int) -> None:
    if a != b:
        raise ValueError(f"{method}: {names} disagree ({a} vs {b})")


# ---------------------------------------------------------------------------------------------------- Table 1


def random_keep(
    n: int, k: int, generator: torch.Generator | None = None, batch: int | None = None
) -> torch.Tensor:
    """k of n token indices drawn uniformly without replacement, sorted ascending (IVTP Table 1 'Random').

    Returns (k,), or (batch, k) with an independent draw per row, on the generator's device. The same generator
    state gives the same indices.
    """
    _check_count("random", "k", k, 1, n, f" (tokens: {n})")
    rows = 1 if batch is None else batch
    if rows < 1:
        raise ValueError(f"random: batch must be at least 1, got {batch}")
    device = generator.device if generator is not None else None
    # randperm is an exact uniform permutation; its first k entries are a uniform k-subset.
    draws = torch.stack([torch.randperm(n, generator=generator, device=device)[:k] for _ in range(rows)])  # (rows, k)
    draws = draws.sort(dim=-1).values
    return draws[0] if batch is None else draws


def topk_cosine_to_cls(cls: torch.Tensor, patches: torch.Tensor, k: int) -> torch.Tensor:
    """The k patches most cosine-similar to the [CLS] feature, in spatial order (IVTP Table 1 'TopK').

    cls: (B, D), patches: (B, N, D). Returns (B, k) int64.
    """
    _check_dims("topk", "cls", cls, 2)
    _check_dims("topk", "patches", patches, 3)
    _check_same("topk", "cls and patches batch sizes", cls.shape[0], patches.shape[0])
    _check_same("topk", "cls and patches feature dims", cls.shape[-1], patches.shape[-1])
    _check_count("topk", "k", k, 1, patches.shape[1], f" (tokens: {patches.shape[1]})")
    sim = torch.einsum("bnd,bd->bn", F.normalize(patches.float(), dim=-1), F.normalize(cls.float(), dim=-1))  # (B, N)
    return keep_topk_sorted(sim, k)


def spatial_pool(patches: torch.Tensor, grid: int, out_grid: int | tuple[int, int]) -> torch.Tensor:
    """2-D average pooling of the square patch grid (IVTP Table 1 'Spatial pooling').

    patches: (B, grid * grid, D), row-major (LLaVA's order). out_grid: the output side, or (rows, cols) for a
    budget that is not a square (128 = 8 x 16). Returns (B, rows * cols, D), row-major.

    This is adaptive average pooling. When the output side divides grid it is plain average pooling with a
    (grid / out)-square window and equal stride (24 -> 8: 3x3 windows). Otherwise output cell i along an axis
    averages input rows floor(i * grid / out) to ceil((i + 1) * grid / out) - 1, so windows differ in size by one
    and neighbouring windows may share a row (24 -> 7: windows of 4 rows, e.g. rows 0-3, 3-6, 6-10...). Every
    input patch lies in at least one window.
    """
    _check_dims("spatial", "patches", patches, 3)
    b, n, d = patches.shape
    if grid < 1 or grid * grid != n:
        raise ValueError(f"spatial: grid must satisfy grid * grid == tokens ({n}), got {grid}")
    rows, cols = (out_grid, out_grid) if isinstance(out_grid, int) else out_grid
    _check_count("spatial", "out_grid", rows, 1, grid, f" (grid: {grid})")
    _check_count("spatial", "out_grid", cols, 1, grid, f" (grid: {grid})")
    image = patches.float().transpose(1, 2).reshape(b, d, grid, grid)  # (B, D, grid, grid)
    pooled = F.adaptive_avg_pool2d(image, (rows, cols))  # (B, D, rows, cols)
    return pooled.flatten(2).transpose(1, 2).to(patches.dtype)  # (B, rows * cols, D)


def pooling_grid(tokens: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows * cols == tokens and rows <= cols: 64 -> (8, 8), 128 -> (8, 16),
    192 -> (12, 16)."""
    _check_count("spatial", "keep", tokens, 1, tokens)
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rows, tokens // rows


def evit_keep_and_fuse(
    patches: torch.Tensor, cls_attn: torch.Tensor, k: int, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT: keep the k patches with the most [CLS] attention, fuse all the others into one token.

    patches: (B, N, D), cls_attn: (B, N) the [CLS] row over the patches (head mean). k in [1, N - 1].
    Returns (tokens, keep): tokens (B, k + 1, D) = the kept patches in spatial order, then the fused token;
    keep (B, k) their indices.

    The fused token is sum_i a_i x_i over the dropped patches i, with a_i their [CLS] attention: EViT's rule,
    which does not divide by sum_i a_i (in a ViT the next pre-norm absorbs the scale). normalize=True divides by it,
    giving the attention-weighted mean, a token on the scale of the others.
    """
    _check_dims("evit", "patches", patches, 3)
    _check_dims("evit", "cls_attn", cls_attn, 2)
    b, n, d = patches.shape
    _check_same("evit", "patches and cls_attn token counts", n, cls_attn.shape[1])
    _check_count("evit", "k", k, 1, n - 1, f" (tokens: {n}; one must be left to fuse)")
    keep = keep_topk_sorted(cls_attn, k)  # (B, k)
    dropped = torch.ones(b, n, dtype=torch.bool, device=patches.device)
    dropped.scatter_(1, keep, False)
    # Zeroing the kept tokens' weights makes the fused sum run over the dropped ones only, with no gather.
    weight = cls_attn.float() * dropped  # (B, N)
    fused = torch.einsum("bn,bnd->bd", weight, patches.float())  # (B, D)
    if normalize:
        fused = fused / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    tokens = torch.cat([gather_tokens(patches, keep), fused.unsqueeze(1).to(patches.dtype)], dim=1)  # (B, k + 1, D)
    return tokens, keep


# ---------------------------------------------------------------------------------------------------- attention top-k


def fastv_keep(attn_row: torch.Tensor, k: int | None = None, keep_ratio: float | None = None) -> torch.Tensor:
    """FastV: at LLM layer K (2 by default), keep the image tokens the last token attends to most.

    attn_row: (B, N_visual) the last token's attention row over the image positions, averaged over heads.
    Give k, or keep_ratio = 1 - R (FastV's R is the fraction dropped); with neither, R = 50%. From a ratio,
    k = round(N_visual * keep_ratio). Returns (B, k) indices among the image positions, ascending: the caller keeps
    those tokens' original position ids.
    """
    _check_dims("fastv", "attn_row", attn_row, 2)
    n = attn_row.shape[1]
    if k is not None and keep_ratio is not None:
        raise ValueError(f"fastv: give k or keep_ratio, not both (got k={k}, keep_ratio={keep_ratio})")
    if k is None:
        ratio = 0.5 if keep_ratio is None else keep_ratio
        _check_ratio("fastv", "keep_ratio", ratio)
        # round, not int: 0.29 * 100 is 28.999... in floating point.
        k = int(round(n * ratio))
        if k < 1:
            raise ValueError(f"fastv: keep_ratio {ratio} keeps no token of {n}")
    _check_count("fastv", "k", k, 1, n, f" (image tokens: {n})")
    return keep_topk_sorted(attn_row, k)


def cls_attention_keep(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """FasterVLM: keep the k patches with the most [CLS] attention at CLIP layer -2, before the LLM.

    cls_attn: (B, N) the [CLS] row over the patches, averaged over heads. Returns (B, k), ascending.
    """
    _check_dims("fastervlm", "cls_attn", cls_attn, 2)
    _check_count("fastervlm", "k", k, 1, cls_attn.shape[1], f" (tokens: {cls_attn.shape[1]})")
    return keep_topk_sorted(cls_attn, k)


# ---------------------------------------------------------------------------------------------------- VisPruner


def vispruner_split(
    cls_attn: torch.Tensor, features: torch.Tensor, total: int, important_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisPruner's two sets, each sorted ascending: important (B, T_imp) and diverse (B, T_div).

    cls_attn: (B, N) [CLS] row at CLIP layer -2, head mean; features: (B, N, D) the layer -2 patch features.
    T_imp = int(total * important_ratio) (floor, as VisPruner), T_div = total - T_imp.

    Important: the T_imp patches with the most [CLS] attention. Diverse: the rest, ranked by attention
    (descending, ties to the lower index), thinned by repeated duplicate removal on L2-normalised features until
    T_div remain. One round over the current residual list (R tokens):
        r = min(8, R - T_div)
        a = residual[0::2], b = residual[1::2]      (alternate positions in the list, not in the image)
        s_j = max over b of cos(a_j, b)             (how well b already covers a_j)
        drop the r a-tokens with the highest s_j    (all of a if r exceeds it; a later round goes on)
        residual = [kept a, by s_j descending] + b
    Each round removes between 1 and R - T_div tokens, so the loop ends at exactly T_div. The list orders (by
    attention at the start; kept a-tokens by s_j descending) follow VisPruner's code: they decide which tokens
    face each other in later rounds.
    """
    _check_dims("vispruner", "cls_attn", cls_attn, 2)
    _check_dims("vispruner", "features", features, 3)
    b, n = cls_attn.shape
    _check_same("vispruner", "cls_attn and features token counts", n, features.shape[1])
    _check_count("vispruner", "total", total, 1, n, f" (tokens: {n})")
    _check_ratio("vispruner", "important_ratio", important_ratio)
    n_imp = int(total * important_ratio)
    n_div = total - n_imp

    ranked = torch.sort(-cls_attn.float(), dim=-1, stable=True).indices  # (B, N) most attended first
    important = ranked[:, :n_imp]  # (B, T_imp)
    residual = ranked[:, n_imp:]  # (B, N - T_imp), still in attention order
    if n_div == 0:
        return important.sort(-1).values, residual[:, :0]

    unit = F.normalize(features.float(), dim=-1)  # (B, N, D)
    # Every round compares tokens of the same set, so the cosines are computed once (one GEMM over all patches,
    # fewer FLOPs than the rounds' products together) and each round only gathers its (Ra, Rb) block.
    cos = unit @ unit.transpose(-1, -2)  # (B, N, N)
    while residual.shape[1] > n_div:
        r = min(8, residual.shape[1] - n_div)
        a_idx, b_idx = residual[:, 0::2], residual[:, 1::2]  # (B, Ra), (B, Rb); Rb >= 1 because R >= 2 here
        rows_a = gather_tokens(cos, a_idx)  # (B, Ra, N)
        sim = torch.gather(rows_a, 2, b_idx[:, None, :].expand(-1, a_idx.shape[1], -1))  # (B, Ra, Rb)
        cover = sim.max(dim=-1).values  # (B, Ra)
        by_cover = torch.sort(-cover, dim=-1, stable=True).indices  # (B, Ra) most redundant first
        kept_a = torch.gather(a_idx, 1, by_cover[:, r:])  # (B, Ra - min(r, Ra))
        residual = torch.cat([kept_a, b_idx], dim=1)  # (B, R - min(r, Ra))
    return important.sort(-1).values, residual.sort(-1).values


def vispruner_select(
    cls_attn: torch.Tensor, features: torch.Tensor, total: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """VisPruner: important plus diverse tokens (see vispruner_split), together in spatial order. Returns (B, total)."""
    important, diverse = vispruner_split(cls_attn, features, total, important_ratio)
    return torch.cat([important, diverse], dim=1).sort(dim=-1).values


# ---------------------------------------------------------------------------------------------------- VisionDrop


class VisionDropResult(NamedTuple):
    """tokens: (B, dominant + contextual, D), the dominant tokens in spatial order, then the contextual ones.
    dominant: (B, dominant) their indices, ascending. targets: (B, contextual) the indices of the tokens each
    contextual token was built on, ascending (a caller may give a contextual token its target's position)."""

    tokens: torch.Tensor
    dominant: torch.Tensor
    targets: torch.Tensor


def visiondrop_merge(
    scores: torch.Tensor, keys: torch.Tensor, x: torch.Tensor, dominant: int, contextual: int
) -> VisionDropResult:
    """One VisionDrop stage: dominant-token selection, then contextual merging of the rest.

    scores: (B, N) importance (encoder: [CLS] attention summed over heads; LLM: visiondrop_llm_scores);
    keys: (B, N, C) the head-mean keys of the scoring layer, used only for similarity; x: (B, N, D) the tokens.

    1. Dominant: the `dominant` highest scores, in spatial order.
    2. The R = N - dominant others, in spatial order, supply `contextual` targets, uniformly strided: positions
       0, s, 2s, ... (s = max(1, R // contextual)) of that list, the first `contextual` of them.
    3. Every other remaining token joins the target whose key is most cosine-similar (ties: the earlier target).
    4. Contextual token = target + mean of the tokens that joined it. This is "target plus the mean" read
       literally, as DESIGN.md states and as VisionZip/VisionDrop's code computes: the target is added to the
       members' mean, not averaged with them. A target nobody joined stays itself.
    """
    method = "visiondrop"
    _check_dims(method, "scores", scores, 2)
    _check_dims(method, "keys", keys, 3)
    _check_dims(method, "x", x, 3)
    b, n = scores.shape
    _check_same(method, "scores and keys token counts", n, keys.shape[1])
    _check_same(method, "scores and x token counts", n, x.shape[1])
    if dominant < 0 or contextual < 0 or not 1 <= dominant + contextual <= n:
        raise ValueError(
            f"{method}: dominant + contextual must be in [1, {n}] (tokens) with neither negative, "
            f"got dominant={dominant}, contextual={contextual}"
        )
    d = x.shape[-1]
    if dominant:
        dom = keep_topk_sorted(scores, dominant)  # (B, dominant)
    else:
        dom = torch.empty(b, 0, dtype=torch.long, device=scores.device)
    rest_mask = torch.ones(b, n, dtype=torch.bool, device=scores.device)
    rest_mask.scatter_(1, dom, False)
    pos = torch.arange(n, device=scores.device)
    rest = pos.expand(b, n)[rest_mask].view(b, n - dominant)  # (B, R) ascending: row-major boolean indexing
    dom_tokens = gather_tokens(x, dom)  # (B, dominant, D)
    if contextual == 0:
        return VisionDropResult(dom_tokens, dom, rest[:, :0])

    r = n - dominant
    step = max(1, r // contextual)
    local_t = torch.arange(0, r, step, device=scores.device)[:contextual]  # (contextual,) positions in `rest`
    is_target = torch.zeros(r, dtype=torch.bool, device=scores.device)
    is_target[local_t] = True
    targets = rest[:, local_t]  # (B, contextual) original indices, ascending
    members = rest[:, ~is_target]  # (B, M) M = R - contextual

    unit = F.normalize(keys.float(), dim=-1)  # (B, N, C)
    sim = gather_tokens(unit, members) @ gather_tokens(unit, targets).transpose(-1, -2)  # (B, M, contextual)
    join = sim.argmax(dim=-1)  # (B, M) first maximum on ties, i.e. the earlier target
    sums = torch.zeros(b, contextual, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, join.unsqueeze(-1).expand(-1, -1, d), gather_tokens(x, members).float())  # (B, c, D)
    counts = torch.zeros(b, contextual, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, join, torch.ones_like(join, dtype=torch.float32))  # (B, c)
    mean = sums / counts.clamp_min(1.0).unsqueeze(-1)  # (B, c, D) zero where nobody joined
    ctx_tokens = (gather_tokens(x, targets).float() + mean).to(x.dtype)  # (B, c, D)
    return VisionDropResult(torch.cat([dom_tokens, ctx_tokens], dim=1), dom, targets)


def visiondrop_encoder(
    cls_attn_summed: torch.Tensor, keys: torch.Tensor, x: torch.Tensor, dominant: int = 42, contextual: int = 6
) -> VisionDropResult:
    """VisionDrop's encoder stage (VisionZip-style) at CLIP layer -2, before the projector.

    cls_attn_summed: (B, N) the [CLS] row over the patches, summed over heads (same ranking as the head mean);
    keys: (B, N, C) layer -2 keys averaged over heads; x: (B, N, D) the layer -2 patch features.
    Returns dominant + contextual tokens (42 + 6 = 48 by default); see visiondrop_merge.
    """
    return visiondrop_merge(cls_attn_summed, keys, x, dominant, contextual)


def visiondrop_llm_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, prefix_k: torch.Tensor | None = None
) -> torch.Tensor:
    """VisionDrop's in-LLM importance: causal visual-to-visual attention, averaged over heads, then over queries.

    q: (B, H, Nv, Dh) and k: (B, Hkv, Nv, Dh) the visual tokens' queries and keys at the scoring layer, RoPE
    applied (Hkv divides H: grouped keys are shared as in Llama). Visual token i is attended to only by queries
    j >= i, and the query mean divides by all Nv queries, so the causal mask's zeros count.
    prefix_k: (B, Hkv, P, Dh) or None, keys of the tokens before the image (system prompt). VisionDrop's code
    takes the softmax over every key a visual query sees, prefix included, and then keeps the visual columns;
    pass prefix_k to reproduce that. Without it the softmax runs over the visual keys alone.
    Returns (B, Nv), float32.
    """
    method = "visiondrop"
    _check_dims(method, "q", q, 4)
    _check_dims(method, "k", k, 4)
    h, nv = q.shape[1], q.shape[2]
    _check_same(method, "q and k visual token counts", nv, k.shape[2])
    if h % k.shape[1]:
        raise ValueError(f"{method}: k heads ({k.shape[1]}) must divide q heads ({h})")
    rep = h // k.shape[1]

    def widen(t: torch.Tensor) -> torch.Tensor:
        # Key head j serves query heads j * rep ... (j + 1) * rep - 1.
        return t.float().repeat_interleave(rep, dim=1) if rep > 1 else t.float()

    logits = torch.matmul(q.float(), widen(k).transpose(-1, -2)) * scale  # (B, H, Nv, Nv)
    future = torch.ones(nv, nv, dtype=torch.bool, device=q.device).triu(1)  # key after query
    logits = logits.masked_fill(future, float("-inf"))
    p = 0
    if prefix_k is not None:
        _check_dims(method, "prefix_k", prefix_k, 4)
        p = prefix_k.shape[2]
        before = torch.matmul(q.float(), widen(prefix_k).transpose(-1, -2)) * scale  # (B, H, Nv, P) all visible
        logits = torch.cat([before, logits], dim=-1)  # (B, H, Nv, P + Nv)
    attn = logits.softmax(dim=-1)[..., p:]  # (B, H, Nv, Nv) the visual columns
    return attn.mean(dim=1).mean(dim=1)  # (B, Nv): head mean, then query mean


@dataclass(frozen=True)
class VisionDropStage:
    """One VisionDrop stage. layer: None for the encoder stage; for an LLM stage, the 0-based index of the LLM
    layer whose input is pruned (that many layers have run), scored with that layer's own q and k."""

    layer: int | None
    dominant: int
    contextual: int

    @property
    def total(self) -> int:
        return self.dominant + self.contextual


def visiondrop_schedule(
    encoder: tuple[int, int] = (42, 6),
    llm: tuple[tuple[int, int, int], ...] = ((8, 30, 5), (16, 22, 4), (24, 16, 3)),
) -> list[VisionDropStage]:
    """VisionDrop's stages for LLaVA-1.5 at its defaults: encoder (42, 6), then after LLM layers 8, 16 and 24
    (30, 5), (22, 4), (16, 3): 48 -> 35 -> 26 -> 19 visual tokens.

    encoder: (dominant, contextual); llm: (layer, dominant, contextual) per LLM stage, layers increasing.
    """
    stages = [VisionDropStage(None, *encoder)] + [VisionDropStage(*s) for s in llm]
    for s in stages:
        if s.dominant < 0 or s.contextual < 0 or s.total < 1:
            raise ValueError(
                f"visiondrop: dominant and contextual must be non-negative with a positive total, "
                f"got ({s.dominant}, {s.contextual})"
            )
    for prev, cur in zip(stages, stages[1:]):
        if cur.total > prev.total:
            raise ValueError(
                f"visiondrop: dominant + contextual cannot grow from one stage to the next, "
                f"got {prev.total} then {cur.total}"
            )
        if cur.layer < 1 or (prev.layer is not None and cur.layer <= prev.layer):
            raise ValueError(f"visiondrop: LLM stage layers must be positive and increasing, got {cur.layer} "
                             f"after {prev.layer}")
    return stages
