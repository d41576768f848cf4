"""SparseVLM's tensor algorithms (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", ICML 2025), as pure functions for IVTP's own LLM decoder loop.

Read from the public code, github.com/Gumpest/SparseVLMs (branch main, which carries v1.5 and, behind
USE_VERSION=2_0, SparseVLM+ "v2.0"; the first release, v1, is in the history). docs/sparsevlm_notes.md has the
step-by-step reading, the source functions and every choice made here.

Shapes: B batch, Nv visual tokens (the image segment as it stands at the pruning layer, recycled tokens of earlier
stages included), Nt text tokens (everything after the image), H heads, D hidden size, Nd deleted visual tokens,
Nr recycling candidates, C clusters (recycled tokens). Nothing here touches a model.

One pruning stage, as the reference runs it (v1.5, LLaVA-1.5, stages after decoder layers 2, 6 and 15):
  1. once, before layer 0: text raters from the input embeddings (text_relevance, select_raters);
  2. run decoder layer l on the whole sequence and keep its attention probabilities;
  3. score the visual tokens by the raters' attention, head mean (score_visual);
  4. keep the top `keep` of them, at most Nv - 1 (sparsevlm_split);
  5. recycle: the top 30% (+1) of the deleted tokens by score are clustered by DPC-KNN into about a tenth as many
     tokens, each the plain mean of its cluster (recycle, dpc_knn_merge);
  6. the image segment of layer l's output becomes [kept tokens in spatial order, recycled tokens]; layers l+1...
     see the shorter sequence.
sparsevlm_prune runs steps 4-6 on the visual hidden states.

Conventions (ivtp.ops.peers): kept indices ascending, score ties towards the lower index, and a budget or knob out
of range raises ValueError naming the method and the knob ("sparsevlm: budget must be ...").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ivtp.ops.select import gather_tokens

__all__ = [
    "SPARSEVLM_LAYERS",
    "SPARSEVLM_V1_LAYERS",
    "SparseVLMStage",
    "SparseVLMSplit",
    "DPCResult",
    "RecycleResult",
    "SparseVLMPruned",
    "sparsevlm_schedule",
    "text_relevance",
    "select_raters",
    "rope_gravity",
    "score_visual",
    "adaptive_keep",
    "sparsevlm_split",
    "recycle_counts",
    "dpc_knn_merge",
    "recycle",
    "sparsevlm_prune",
    "sparsevlm_visual_counts",
    "sparsevlm_layer_counts",
]

METHOD = "sparsevlm"

# 0-based indices of the decoder layers whose attention rates the visual tokens and whose *output* is pruned
# (the layer itself runs on the full sequence; layer + 1 is the first to see fewer tokens).
SPARSEVLM_LAYERS = (2, 6, 15)
# The first release (v1, Oct 2024) pruned after a fourth layer and sized each stage from a rank (adaptive_keep).
SPARSEVLM_V1_LAYERS = (2, 6, 15, 19)

# Visual tokens kept *by score* at each of SPARSEVLM_LAYERS, per budget (score.py, sparse_token_list_*). The budget
# is not a final count: recycled tokens come on top (v1.5), and the number averages the visual tokens over the 32
# layers in the authors' own accounting (see sparsevlm_layer_counts).
_KEEP = {
    "1.5": {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)},
    "2.0": {64: (66, 34, 20), 96: (246, 54, 28), 128: (238, 108, 60), 192: (300, 200, 118)},
}
# v2.0 (SparseVLM+) switches recycling off and keeps the 14 heads that attend most from raters to the image.
V2_HEADS = 14


# ---------------------------------------------------------------------------------------------------- checks


def _fail(knob: str, rule: str, value: object) -> None:
    raise ValueError(f"{METHOD}: {knob} {rule}, got {value}")


def _check_dims(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        _fail(name, f"must have {dims} dimensions", f"shape {tuple(t.shape)}")


def _check_size(names: str, a: int, b: int) -> None:
    if a != b:
        raise ValueError(f"{METHOD}: {names} disagree ({a} vs {b})")


def _check_version(version: str) -> None:
    if version not in _KEEP:
        _fail("version", "must be '1.5' or '2.0'", repr(version))


def _valid_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """mask (B, N) bool or None -> (B, N) bool, all True for None."""
    if mask is None:
        return torch.ones(like.shape[0], like.shape[1], dtype=torch.bool, device=like.device)
    _check_dims("text_mask", mask, 2)
    if tuple(mask.shape) != tuple(like.shape[:2]):
        _fail("text_mask", f"must have shape {tuple(like.shape[:2])}", f"shape {tuple(mask.shape)}")
    return mask.bool()


def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) indices, highest score first; a stable sort on the negation puts ties at the lower index."""
    return torch.sort(-scores.float(), dim=-1, stable=True).indices


# ---------------------------------------------------------------------------------------------------- schedule


class SparseVLMStage(NamedTuple):
    """layer: 0-based index of the decoder layer that runs on the full sequence, whose attention probabilities score
    the visual tokens and whose output is pruned, i.e. the input of layer + 1 is the first pruned one.
    keep: visual tokens kept by score there (recycled tokens are added on top)."""

    layer: int
    keep: int


def sparsevlm_schedule(budget: int, version: str = "1.5") -> list[SparseVLMStage]:
    """The fixed per-stage counts of SparseVLM v1.5 (the ICML 2025 code) or v2.0 for LLaVA-1.5 (576 visual tokens).

    budget: 64, 96, 128 or 192, the authors' layer-averaged token budget (the code defines no rule for others).
    v1.5, budget 192: keep 300 after layer 2, 200 after layer 6, 110 after layer 15, each plus its recycled tokens,
    i.e. 309, 204, 113 visual tokens (sparsevlm_visual_counts). v2.0 recycles nothing: 300, 200, 118.
    """
    _check_version(version)
    table = _KEEP[version]
    if budget not in table:
        _fail("budget", f"must be one of {sorted(table)} (version {version})", budget)
    return [SparseVLMStage(layer, keep) for layer, keep in zip(SPARSEVLM_LAYERS, table[budget])]


# ---------------------------------------------------------------------------------------------------- raters


def text_relevance(visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """How much each text token relates to the image, from the LLM's *input embeddings* (before layer 0).

    visual: (B, Nv, D) projector outputs; text: (B, Nt, D) embeddings of every token after the image (the question
    and the template's tail, e.g. "ASSISTANT:"); text_mask: (B, Nt) bool, True for real tokens, or None.
    For each visual token, a softmax over the text tokens of the dot products; the mean of those rows over the
    visual tokens. Returns (B, Nt) float32: each row sums to 1 over its valid tokens, 0 at padding.
    """
    _check_dims("visual", visual, 3)
    _check_dims("text", text, 3)
    _check_size("visual and text batch sizes", visual.shape[0], text.shape[0])
    _check_size("visual and text hidden sizes", visual.shape[2], text.shape[2])
    valid = _valid_mask(text_mask, text)
    if not bool(valid.any(-1).all()):
        _fail("text_mask", "must leave at least one text token per row", valid.sum(-1).tolist())
    sim = visual.float() @ text.float().transpose(1, 2)  # (B, Nv, Nt) raw dot products, no scaling
    # Padding takes no share of the softmax, so a padded row equals the same row unpadded.
    sim = sim.masked_fill(~valid[:, None, :], float("-inf"))
    return sim.softmax(dim=-1).mean(dim=1)  # (B, Nt)


def select_raters(relevance: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SparseVLM's text raters: the text tokens whose relevance is strictly above the row's mean.

    relevance: (B, Nt) from text_relevance (or any per-text-token relevance); text_mask: (B, Nt) bool or None.
    The mean runs over the valid tokens (from text_relevance it is 1 / Nt_valid). Returns (B, Nt) bool.
    A row whose valid relevances are all equal has no token above the mean; the reference would then score with an
    empty set (NaN scores). Here every valid token of that row rates instead.
    """
    _check_dims("relevance", relevance, 2)
    valid = _valid_mask(text_mask, relevance)
    if not bool(valid.any(-1).all()):
        _fail("text_mask", "must leave at least one text token per row", valid.sum(-1).tolist())
    rel = relevance.float()
    mean = (rel * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)  # (B, 1)
    raters = (rel > mean) & valid  # (B, Nt)
    empty = ~raters.any(-1, keepdim=True)  # (B, 1)
    return torch.where(empty, valid, raters)


# ---------------------------------------------------------------------------------------------------- scoring


def rope_gravity(
    text_pos: torch.Tensor, visual_pos: torch.Tensor, head_dim: int, base: float = 10000.0
) -> torch.Tensor:
    """SparseVLM+ (v2.0) "attention gravity": the RoPE score of an all-ones query at m and all-ones key at n.

    text_pos: (B, Nt), visual_pos: (B, Nv) position ids; head_dim even; base the RoPE base (LLaMA: 10000).
    With Llama's rotate-half RoPE the two rotated all-ones vectors have dot product 2 * sum_i cos((m - n) theta_i),
    theta_i = base ** (-2i / head_dim), i < head_dim / 2; divided by sqrt(head_dim) as the attention is. The code
    builds it by rotating ones; this is the same number in closed form. Returns (B, Nt, Nv) float32, sqrt(head_dim)
    at distance 0. It depends on m - n only, and can reach 0 or turn negative at some distances: v2.0 divides the
    attention by it regardless (score_visual's gravity).
    """
    _check_dims("text_pos", text_pos, 2)
    _check_dims("visual_pos", visual_pos, 2)
    if head_dim < 2 or head_dim % 2:
        _fail("head_dim", "must be a positive even number", head_dim)
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=text_pos.device) / head_dim)
    delta = (text_pos[:, :, None] - visual_pos[:, None, :]).double()  # (B, Nt, Nv)
    total = torch.cos(delta[..., None] * theta).sum(-1)  # (B, Nt, Nv)
    return (2.0 * total / math.sqrt(head_dim)).float()


def score_visual(
    attn: torch.Tensor,
    raters: torch.Tensor,
    heads: int | None = None,
    gravity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each visual token's score: the raters' attention to it, averaged over heads, then over the raters.

    attn: (B, H, Nt, Nv) the pruning layer's attention *probabilities* (softmax over the whole causal sequence:
    prefix, image and text keys) in the text rows and image columns; raters: (B, Nt) bool (select_raters).
    heads: None (v1.5: mean over all H heads) or the number of heads to keep (v2.0: 14), those whose summed
    rater-to-image attention is largest (ties to the lower head). gravity: None, or (B, Nt, Nv) from rope_gravity
    (v2.0), which divides the probabilities before the heads are chosen. Returns (B, Nv) float32.
    """
    _check_dims("attn", attn, 4)
    _check_dims("raters", raters, 2)
    b, h, nt, nv = attn.shape
    if tuple(raters.shape) != (b, nt):
        _fail("raters", f"must have shape {(b, nt)}", f"shape {tuple(raters.shape)}")
    r = raters.bool().float()  # (B, Nt)
    count = r.sum(-1)  # (B,)
    if bool((count == 0).any()):
        _fail("raters", "must select at least one text token per row", count.tolist())
    a = attn.float()
    if gravity is not None:
        _check_dims("gravity", gravity, 3)
        if tuple(gravity.shape) != (b, nt, nv):
            _fail("gravity", f"must have shape {(b, nt, nv)}", f"shape {tuple(gravity.shape)}")
        a = a / gravity.float()[:, None]  # (B, H, Nt, Nv), the same bias for every head
    if heads is not None:
        if not 1 <= heads <= h:
            _fail("heads", f"must be in [1, {h}]", heads)
        per_head = torch.einsum("bhtv,bt->bh", a, r)  # (B, H) rater-to-image attention mass
        top = _rank_desc(per_head)[:, :heads]  # (B, heads)
        a = torch.gather(a, 1, top[:, :, None, None].expand(-1, -1, nt, nv))  # (B, heads, Nt, Nv)
    head_mean = a.mean(dim=1)  # (B, Nt, Nv)
    return torch.einsum("btv,bt->bv", head_mean, r) / count[:, None]  # (B, Nv) mean over the raters


def adaptive_keep(rater_attn: torch.Tensor, raters: torch.Tensor, scale: float, bias: float = 0.0) -> torch.Tensor:
    """SparseVLM v1's stage size from the rank of the raters' attention (score.py attn_postprocess_rank).

    rater_attn: (B, Nt, Nv) head-mean attention probabilities, text rows by image columns; raters: (B, Nt) bool.
    Per row: P = the rater rows (Nr, Nv) in float32 and r = rank(P) (torch.linalg.matrix_rank, default tolerance);
    keep = min(int(r * scale + bias), Nv - 1), or Nv (no pruning at this layer) when r == Nv. int truncates, so
    keep can be 0 (everything deleted, then recycled). v1's scripts pair scale/bias with a benchmark, not a rule:
    13.5/0 (MME, "192"), 9/6 (POPE, "128"), 0.8/0 (TextVQA, "64"). Returns (B,) int64; feed one row at a time to
    sparsevlm_split, as counts differ between rows.
    """
    _check_dims("rater_attn", rater_attn, 3)
    _check_dims("raters", raters, 2)
    b, nt, nv = rater_attn.shape
    if tuple(raters.shape) != (b, nt):
        _fail("raters", f"must have shape {(b, nt)}", f"shape {tuple(raters.shape)}")
    if not scale > 0:
        _fail("scale", "must be positive", scale)
    if not bias >= 0:
        _fail("bias", "must be non-negative", bias)
    keep = []
    for row in range(b):
        # The rank only of the rater rows: zero rows for the others would leave the rank alone but change
        # matrix_rank's default tolerance, which scales with the larger dimension.
        p = rater_attn[row][raters[row].bool()].float()  # (Nr, Nv)
        if p.shape[0] == 0:
            _fail("raters", "must select at least one text token per row", 0)
        rank = int(torch.linalg.matrix_rank(p))
        keep.append(nv if rank == nv else min(int(rank * scale + bias), nv - 1))
    return torch.tensor(keep, dtype=torch.long, device=rater_attn.device)


# ---------------------------------------------------------------------------------------------------- pruning


class SparseVLMSplit(NamedTuple):
    """kept: (B, k) and deleted: (B, Nv - k), indices into the image segment, each ascending."""

    kept: torch.Tensor
    deleted: torch.Tensor


def sparsevlm_split(scores: torch.Tensor, keep: int) -> SparseVLMSplit:
    """Keep the top min(keep, Nv - 1) scores, delete the rest. scores: (B, Nv).

    The reference caps the count at Nv - 1, so a stage always deletes at least one token (and so always recycles);
    a stage asked for more than is there keeps Nv - 1. keep 0 deletes every token (possible under adaptive_keep).
    """
    _check_dims("scores", scores, 2)
    b, nv = scores.shape
    if nv < 1:
        _fail("scores", "must hold at least one visual token", f"shape {tuple(scores.shape)}")
    if keep < 0:
        _fail("keep", "must be at least 0", keep)
    k = min(keep, nv - 1)
    order = _rank_desc(scores)  # (B, Nv) best first
    return SparseVLMSplit(order[:, :k].sort(-1).values, order[:, k:].sort(-1).values)


def recycle_counts(n_deleted: int, ratio: float = 0.3, per_cluster: int = 10) -> tuple[int, int]:
    """(candidates, clusters) for n_deleted deleted tokens: int(n_deleted * ratio) + 1 candidates (capped at
    n_deleted), and int(candidates / per_cluster) + 1 clusters. 273 deleted -> 82 candidates -> 9 clusters."""
    if n_deleted < 1:
        _fail("n_deleted", "must be at least 1", n_deleted)
    if not 0.0 < ratio <= 1.0:
        _fail("ratio", "must be in (0, 1]", ratio)
    if per_cluster < 1:
        _fail("per_cluster", "must be at least 1", per_cluster)
    # The same float expressions as the reference, so that products like 10 * 0.3 truncate the same way.
    candidates = min(int(n_deleted * ratio) + 1, n_deleted)
    return candidates, min(int(candidates / per_cluster) + 1, candidates)


class DPCResult(NamedTuple):
    """tokens: (B, C, D) the cluster means, in the order of centers; centers: (B, C) the centre of each cluster,
    indices into the input, by DPC score (highest first); assign: (B, N) each input token's cluster in [0, C)."""

    tokens: torch.Tensor
    centers: torch.Tensor
    assign: torch.Tensor


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> DPCResult:
    """DPC-KNN clustering of x into `clusters` groups, each merged into its plain mean (utils.py cluster_and_merge).

    x: (B, N, D). With d_ij = ||x_i - x_j|| / sqrt(D) and k = clusters (the same number serves both roles):
      density   rho_i   = exp(-mean of d_ij^2 over the k nearest j, i itself included);
      distance  delta_i = min d_ij over the denser j; for the densest token, the largest d in the row's matrix;
      centres: the `clusters` highest rho_i * delta_i; every token joins its nearest centre (ties: the centre
      listed first), a centre always its own cluster.
    The reference breaks density ties with uniform noise of 1e-6; here j counts as denser than i on a tie when
    j < i, which makes the result deterministic. The reference divides each cluster sum by (count + 1e-6); this is
    the exact mean. Returns DPCResult; tokens in x's dtype, computed in float32.
    """
    _check_dims("x", x, 3)
    b, n, d = x.shape
    if not 1 <= clusters <= n:
        _fail("clusters", f"must be in [1, {n}]", clusters)
    xf = x.float()
    # The difference form puts exact zeros on the diagonal, which the k-nearest mean counts.
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)  # (B, N, N)
    nearest = dist.topk(clusters, dim=-1, largest=False).values  # (B, N, k)
    density = torch.exp(-(nearest**2).mean(-1))  # (B, N)

    idx = torch.arange(n, device=x.device)
    rho_i, rho_j = density[:, :, None], density[:, None, :]  # (B, N, 1), (B, 1, N)
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & (idx[None, None, :] < idx[None, :, None]))  # (B, i, j)
    dist_max = dist.flatten(1).max(-1).values  # (B,)
    delta = dist.masked_fill(~denser, float("inf")).min(-1).values  # (B, N); inf for the densest
    delta = torch.minimum(delta, dist_max[:, None])  # the densest gets the largest distance

    centers = _rank_desc(delta * density)[:, :clusters]  # (B, C)
    to_centers = torch.gather(dist, 1, centers[:, :, None].expand(-1, -1, n))  # (B, C, N)
    assign = to_centers.argmin(dim=1)  # (B, N) first minimum on ties: the centre ranked higher
    # Duplicated centres (distance 0 to each other) would otherwise all join the first of them.
    assign.scatter_(1, centers, torch.arange(clusters, device=x.device).expand(b, clusters))

    sums = torch.zeros(b, clusters, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, assign[:, :, None].expand(-1, -1, d), xf)  # (B, C, D)
    counts = torch.zeros(b, clusters, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))  # (B, C), each >= 1
    return DPCResult((sums / counts[:, :, None]).to(x.dtype), centers, assign)


class RecycleResult(NamedTuple):
    """tokens: (B, C, D) the recycled tokens, in DPC centre order. candidates: (B, Nr) the recycled deleted tokens,
    indices into the deleted list, highest score first. centers: (B, C) each recycled token's centre, an index into
    the deleted list. assign: (B, Nr) each candidate's cluster (row j of assign belongs to candidates[:, j])."""

    tokens: torch.Tensor
    candidates: torch.Tensor
    centers: torch.Tensor
    assign: torch.Tensor


def recycle(
    deleted_tokens: torch.Tensor, deleted_scores: torch.Tensor, ratio: float = 0.3, per_cluster: int = 10
) -> RecycleResult:
    """SparseVLM's token recycling of one stage's deleted visual tokens.

    deleted_tokens: (B, Nd, D) the pruning layer's *output* hidden states of the deleted tokens; deleted_scores:
    (B, Nd) their score_visual scores. The Nr = int(Nd * ratio) + 1 best-scored (recycle_counts) are clustered by
    dpc_knn_merge into C = int(Nr / per_cluster) + 1 tokens, each the mean of its cluster. Defaults: the code's
    30% and one cluster per ten candidates. Returns RecycleResult.
    """
    _check_dims("deleted_tokens", deleted_tokens, 3)
    _check_dims("deleted_scores", deleted_scores, 2)
    _check_size("deleted_tokens and deleted_scores batch sizes", deleted_tokens.shape[0], deleted_scores.shape[0])
    _check_size("deleted_tokens and deleted_scores token counts", deleted_tokens.shape[1], deleted_scores.shape[1])
    n_cand, n_clusters = recycle_counts(deleted_tokens.shape[1], ratio, per_cluster)
    candidates = _rank_desc(deleted_scores)[:, :n_cand]  # (B, Nr) highest score first, as topk lists them
    # The candidates' order matters: it is the index order DPC breaks density ties by.
    merged = dpc_knn_merge(gather_tokens(deleted_tokens, candidates), n_clusters)
    centers = torch.gather(candidates, 1, merged.centers)  # (B, C) into the deleted list
    return RecycleResult(merged.tokens, candidates, centers, merged.assign)


class SparseVLMPruned(NamedTuple):
    """tokens: (B, k + C, D) the new image segment: the kept tokens in spatial order, then the recycled tokens.
    kept, deleted: (B, k), (B, Nv - k) indices into the old image segment, ascending. recycled: the RecycleResult
    (its indices point into `deleted`), or None when recycling is off."""

    tokens: torch.Tensor
    kept: torch.Tensor
    deleted: torch.Tensor
    recycled: RecycleResult | None


def sparsevlm_prune(
    visual: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    recycle_tokens: bool = True,
    ratio: float = 0.3,
    per_cluster: int = 10,
) -> SparseVLMPruned:
    """One SparseVLM stage on the image segment of the pruning layer's output.

    visual: (B, Nv, D) hidden states of the image segment after decoder layer l; scores: (B, Nv) score_visual.
    Keeps min(keep, Nv - 1) tokens (sparsevlm_split) and, when recycle_tokens (v1.5; v2.0 turns it off), appends
    the recycled tokens of the deleted ones. The caller puts `tokens` back between the prefix and the text.
    """
    _check_dims("visual", visual, 3)
    _check_dims("scores", scores, 2)
    _check_size("visual and scores batch sizes", visual.shape[0], scores.shape[0])
    _check_size("visual and scores token counts", visual.shape[1], scores.shape[1])
    kept, deleted = sparsevlm_split(scores, keep)
    tokens = gather_tokens(visual, kept)  # (B, k, D)
    if not recycle_tokens:
        return SparseVLMPruned(tokens, kept, deleted, None)
    rec = recycle(gather_tokens(visual, deleted), torch.gather(scores, 1, deleted), ratio, per_cluster)
    return SparseVLMPruned(torch.cat([tokens, rec.tokens], dim=1), kept, deleted, rec)  # (B, k + C, D)


# ---------------------------------------------------------------------------------------------------- counting


def sparsevlm_visual_counts(
    stages: list[SparseVLMStage], n_visual: int = 576, recycle_tokens: bool = True
) -> list[int]:
    """The image segment's length after each stage (kept plus recycled), by the rules of sparsevlm_prune.
    v1.5 budget 192 -> [309, 204, 113]; 128 -> [312, 117, 39]; 64 -> [82, 32, 18]."""
    if n_visual < 1:
        _fail("n_visual", "must be at least 1", n_visual)
    counts, n = [], n_visual
    for s in stages:
        k = min(s.keep, n - 1)
        if k < 0:
            _fail("keep", "must be at least 0", s.keep)
        n = k + (recycle_counts(n - k)[1] if recycle_tokens else 0)
        counts.append(n)
    return counts


def sparsevlm_layer_counts(
    stages: list[SparseVLMStage],
    n_visual: int = 576,
    n_layers: int = 32,
    recycle_tokens: bool = True,
    authors: bool = False,
) -> list[int]:
    """Visual tokens processed by each of the n_layers decoder layers (their mean is the layer-averaged equivalent).

    The pruning layer itself runs on the unpruned segment: v1.5 budget 192 -> 576 x 3, 309 x 4, 204 x 9, 113 x 16,
    mean 206.5. authors=True counts as the reference's "Equal Tokens" log does, giving the pruning layer its pruned
    count: 576 x 2, 309 x 4, 204 x 9, 113 x 17, mean 192.03, logged as int(mean) = 192: the budget's name.
    """
    layers = [s.layer for s in stages]
    if any(not 0 <= l < n_layers for l in layers) or layers != sorted(set(layers)):
        _fail("stage layers", f"must be increasing and in [0, {n_layers - 1}]", layers)
    after = sparsevlm_visual_counts(stages, n_visual, recycle_tokens)
    shift = 0 if authors else 1
    out, current, j = [], n_visual, 0
    for layer in range(n_layers):
        while j < len(stages) and stages[j].layer + shift <= layer:
            current, j = after[j], j + 1
        out.append(current)
    return out
