"""SparseVLM's tensor algorithms (ivtp.ops.sparsevlm), against hand-computed cases and random tensors."""

import math

import pytest
import torch

from ivtp.ops.sparsevlm import (
    SPARSEVLM_LAYERS,
    SparseVLMStage,
    adaptive_keep,
    dpc_knn_merge,
    recycle,
    recycle_counts,
    rope_gravity,
    score_visual,
    select_raters,
    sparsevlm_layer_counts,
    sparsevlm_prune,
    sparsevlm_schedule,
    sparsevlm_split,
    sparsevlm_visual_counts,
    text_relevance,
)


def is_sorted_unique(idx: torch.Tensor) -> bool:
    return bool((idx[..., 1:] > idx[..., :-1]).all())


# ---------------------------------------------------------------------------------------------------- raters


def test_text_relevance_and_raters_by_hand():
    ln3 = math.log(3.0)
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text = torch.tensor([[[ln3, 0.0], [0.0, 0.0], [0.0, ln3]]])
    # Dot products: v1 -> [ln3, 0, 0], softmax [3/5, 1/5, 1/5]; v2 -> [0, 0, ln3], softmax [1/5, 1/5, 3/5].
    # Mean over the two visual tokens: [2/5, 1/5, 2/5]; mean 1/3, so raters are t1 and t3.
    rel = text_relevance(visual, text)
    torch.testing.assert_close(rel, torch.tensor([[0.4, 0.2, 0.4]]))
    assert select_raters(rel).tolist() == [[True, False, True]]


def test_padding_changes_nothing():
    ln3 = math.log(3.0)
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # A fourth, padded token that would dominate every softmax if it counted.
    text = torch.tensor([[[ln3, 0.0], [0.0, 0.0], [0.0, ln3], [50.0, 50.0]]])
    mask = torch.tensor([[True, True, True, False]])
    rel = text_relevance(visual, text, mask)
    torch.testing.assert_close(rel, torch.tensor([[0.4, 0.2, 0.4, 0.0]]))
    assert select_raters(rel, mask).tolist() == [[True, False, True, False]]


def test_raters_use_the_row_mean_strictly_and_fall_back_when_flat():
    rel = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    # Row 0: mean 1/3 -> only 0.5. Row 1: mean 1/3 -> only 0.5 (0.25 is below).
    # Row 2: valid [0.5, 0.5], mean 0.5, none strictly above -> every valid token rates.
    assert select_raters(rel, mask).tolist() == [[True, False, False], [False, False, True], [True, True, False]]


def test_text_relevance_random_rows_sum_to_one():
    torch.manual_seed(0)
    rel = text_relevance(torch.randn(3, 20, 8), torch.randn(3, 7, 8))
    assert rel.shape == (3, 7)
    torch.testing.assert_close(rel.sum(-1), torch.ones(3))


# ---------------------------------------------------------------------------------------------------- scoring

# Two heads, three text rows, two visual columns.
ATTN = torch.tensor(
    [[
        [[0.2, 0.4], [0.9, 0.0], [0.0, 0.6]],  # head 0
        [[0.4, 0.0], [0.0, 0.9], [0.2, 0.2]],  # head 1
    ]]
)
RATERS = torch.tensor([[True, False, True]])


def test_score_visual_by_hand():
    # Head mean: t0 [0.3, 0.2], t1 [0.45, 0.45], t2 [0.1, 0.4]. Raters t0, t2: [0.2, 0.3].
    torch.testing.assert_close(score_visual(ATTN, RATERS), torch.tensor([[0.2, 0.3]]))
    # One head (v2.0 style): rater-to-image mass head 0 = 0.2 + 0.4 + 0 + 0.6 = 1.2, head 1 = 0.8 -> head 0 alone:
    # t0 [0.2, 0.4], t2 [0.0, 0.6] -> [0.1, 0.5].
    torch.testing.assert_close(score_visual(ATTN, RATERS, heads=1), torch.tensor([[0.1, 0.5]]))
    # Gravity divides before anything else: all 2 halves the scores.
    torch.testing.assert_close(score_visual(ATTN, RATERS, gravity=torch.full((1, 3, 2), 2.0)),
                               torch.tensor([[0.1, 0.15]]))


def test_gravity_can_change_the_head_choice():
    # Gravity is shared by the heads but weighs columns differently; dividing visual column 1 by 10 shrinks head 0's
    # mass most: head 0: 0.2 + 0.04 + 0 + 0.06 = 0.3; head 1: 0.4 + 0 + 0.2 + 0.02 = 0.62. Head 1 wins:
    # t0 [0.4, 0], t2 [0.2, 0.02] -> [0.3, 0.01].
    g = torch.tensor([[[1.0, 10.0], [1.0, 1.0], [1.0, 10.0]]])
    torch.testing.assert_close(score_visual(ATTN, RATERS, heads=1, gravity=g), torch.tensor([[0.3, 0.01]]))


def test_score_visual_from_a_causal_softmax_matches_a_loop():
    # The way a decoder loop feeds it: the full causal attention of the layer, sliced to text rows x image columns.
    torch.manual_seed(0)
    b, h, p, nv, nt = 2, 4, 3, 10, 5
    logits = torch.randn(b, h, p + nv + nt, p + nv + nt)
    causal = torch.ones(p + nv + nt, p + nv + nt, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, -math.inf).softmax(-1)
    attn = probs[:, :, p + nv:, p:p + nv]  # (B, H, Nt, Nv)
    raters = torch.rand(b, nt) > 0.5
    raters[:, 0] = True
    got = score_visual(attn, raters)
    for r in range(b):
        rows = [t for t in range(nt) if raters[r, t]]
        want = torch.stack([attn[r, :, t].mean(0) for t in rows]).mean(0)
        torch.testing.assert_close(got[r], want)


def test_rope_gravity_by_hand_and_against_rotated_ones():
    pos_t, pos_v = torch.tensor([[5, 7]]), torch.tensor([[5, 4, 7]])
    # head_dim 2: theta_0 = 1, value 2 cos(m - n) / sqrt(2) = sqrt(2) cos(m - n).
    want = math.sqrt(2) * torch.cos(torch.tensor([[[0.0, 1.0, -2.0], [2.0, 3.0, 0.0]]]))
    torch.testing.assert_close(rope_gravity(pos_t, pos_v, 2), want)
    # head_dim 8, base 100: rotate all-ones vectors the Llama way (rotate_half) and take q.k / sqrt(8).
    d, base = 8, 100.0
    inv = base ** (-torch.arange(0, d, 2).double() / d)

    def rotated(pos):
        ang = pos.double()[..., None] * torch.cat([inv, inv])  # (B, N, d)
        ones = torch.ones_like(ang)
        half = torch.cat([-ones[..., d // 2:], ones[..., :d // 2]], -1)
        return ones * ang.cos() + half * ang.sin()

    brute = rotated(pos_t) @ rotated(pos_v).transpose(1, 2) / math.sqrt(d)
    torch.testing.assert_close(rope_gravity(pos_t, pos_v, d, base), brute.float())
    assert abs(float(rope_gravity(pos_t, pos_v, 128)[0, 0, 0]) - math.sqrt(128)) < 1e-4


def test_adaptive_keep_by_hand():
    rater_attn = torch.tensor([[
        [0.5, 0.5, 0.0, 0.0],
        [0.25, 0.25, 0.25, 0.25],
        [0.5, 0.5, 0.0, 0.0],  # not a rater: a repeat would not raise the rank anyway
        [0.1, 0.2, 0.3, 0.4],  # not a rater: would raise the rank to 3
    ]])
    raters = torch.tensor([[True, True, False, False]])
    # rank 2 of 4 columns: int(2 * 1.0 + 0.5) = 2; int(2 * 13.5) = 27 -> capped at Nv - 1 = 3; int(2 * 0.8) = 1.
    assert adaptive_keep(rater_attn, raters, 1.0, 0.5).tolist() == [2]
    assert adaptive_keep(rater_attn, raters, 13.5).tolist() == [3]
    assert adaptive_keep(rater_attn, raters, 0.8).tolist() == [1]
    # Every row a rater: rank 3; full rank (= Nv) would mean no pruning at all.
    assert adaptive_keep(rater_attn, torch.ones(1, 4, dtype=torch.bool), 1.0).tolist() == [3]
    square = torch.tensor([[[0.6, 0.4], [0.1, 0.9]]])
    assert adaptive_keep(square, torch.ones(1, 2, dtype=torch.bool), 0.5).tolist() == [2]


# ---------------------------------------------------------------------------------------------------- pruning


def test_split_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5]])
    # Top 2: the two 0.5s (1 and 3); a tie goes to the lower index, and both fit anyway.
    out = sparsevlm_split(scores, 2)
    assert out.kept.tolist() == [[1, 3]] and out.deleted.tolist() == [[0, 2]]
    # Asking for all 4 keeps Nv - 1 = 3: a stage always deletes one.
    assert sparsevlm_split(scores, 4).kept.tolist() == [[1, 2, 3]]
    assert sparsevlm_split(scores, 99).deleted.tolist() == [[0]]
    # keep 1 with a tie at the top: the lower index.
    assert sparsevlm_split(scores, 1).kept.tolist() == [[1]]
    out = sparsevlm_split(scores, 0)
    assert out.kept.shape == (1, 0) and out.deleted.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("n, want", [(273, (82, 9)), (202, (61, 7)), (81, (25, 3)), (10, (4, 1)), (1, (1, 1)),
                                     (2, (1, 1)), (510, (154, 16)), (15, (5, 1))])
def test_recycle_counts(n, want):
    # 273: int(81.9) + 1 = 82 candidates, int(8.2) + 1 = 9 clusters. 10: int(3.0000000000000004) + 1 = 4.
    assert recycle_counts(n) == want


def test_recycle_counts_caps_at_the_deleted_count():
    assert recycle_counts(5, ratio=1.0) == (5, 1)
    assert recycle_counts(5, ratio=1.0, per_cluster=1) == (5, 5)


def test_dpc_knn_by_hand():
    x = torch.tensor([[[0.0], [0.1], [5.0], [5.2], [10.0]]])
    # D = 1, so d = |x_i - x_j|. k = 2: self + nearest neighbour.
    # Densities exp(-d_nn^2 / 2): tokens 0, 1: exp(-0.005); 2, 3: exp(-0.02); 4: exp(-11.52).
    # Ties go to the lower index, so the density order is 0 > 1 > 2 > 3 > 4.
    # delta: 0 -> the largest distance, 10; 1 -> 0.1; 2 -> min(5, 4.9) = 4.9; 3 -> 0.2; 4 -> min(10, 9.9, 5, 4.8).
    # rho * delta: 9.95, 0.0995, 4.80, 0.196, ~5e-5 -> centres 0 then 2.
    # Token 4 is 5 from centre 2, 10 from centre 0: clusters {0, 1} and {2, 3, 4}; means 0.05 and 20.2 / 3.
    out = dpc_knn_merge(x, 2)
    assert out.centers.tolist() == [[0, 2]]
    assert out.assign.tolist() == [[0, 0, 1, 1, 1]]
    torch.testing.assert_close(out.tokens, torch.tensor([[[0.05], [20.2 / 3]]]))


def test_dpc_knn_one_cluster_is_the_mean_and_duplicates_stay_apart():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3)
    out = dpc_knn_merge(x, 1)
    torch.testing.assert_close(out.tokens[:, 0], x.mean(1))
    # Every density ties at k = 1 (only the token itself), so token 0 is densest and, with the largest delta, the
    # centre.
    assert out.centers.tolist() == [[0], [0]]
    # Two identical tokens, two clusters: both are centres of their own cluster.
    dup = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    out = dpc_knn_merge(dup, 2)
    assert sorted(out.assign[0].tolist()) == [0, 1]


def dpc_reference(x: torch.Tensor, c: int) -> tuple[list[int], list[int], torch.Tensor]:
    """A plain, list-based restatement of DPC-KNN for one row (N, D), float64, same tie rules."""
    n, d = x.shape
    xd = x.double()
    dist = [[float((xd[i] - xd[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(dist[i])[:c]) / c) for i in range(n)]
    order = sorted(range(n), key=lambda i: (-rho[i], i))  # densest first, ties to the lower index
    dmax = max(max(r) for r in dist)
    delta = [min([dist[i][j] for j in order[:order.index(i)]], default=dmax) for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-rho[i] * delta[i], i))[:c]
    assign = [min(range(c), key=lambda k: (dist[centers[k]][i], k)) for i in range(n)]
    for k, ctr in enumerate(centers):
        assign[ctr] = k
    means = torch.stack([xd[[i for i in range(n) if assign[i] == k]].mean(0) for k in range(c)])
    return centers, assign, means


@pytest.mark.parametrize("n, c, d", [(25, 3, 4), (40, 5, 16), (9, 9, 2), (12, 1, 3)])
def test_dpc_knn_matches_the_plain_procedure(n, c, d):
    torch.manual_seed(n * c + d)
    x = torch.randn(2, n, d)
    out = dpc_knn_merge(x, c)
    assert out.tokens.shape == (2, c, d) and out.centers.shape == (2, c) and out.assign.shape == (2, n)
    for r in range(2):
        centers, assign, means = dpc_reference(x[r], c)
        assert out.centers[r].tolist() == centers
        assert out.assign[r].tolist() == assign
        torch.testing.assert_close(out.tokens[r].double(), means, rtol=1e-5, atol=1e-5)


def test_recycle_one_cluster_by_hand():
    # 10 deleted tokens: int(10 * 0.3) + 1 = 4 candidates, int(0.4) + 1 = 1 cluster.
    scores = torch.tensor([[0.10, 0.90, 0.30, 0.80, 0.05, 0.70, 0.20, 0.60, 0.00, 0.15]])
    tokens = torch.arange(10.0).view(1, 10, 1) * 10  # token i holds 10 * i
    out = recycle(tokens, scores)
    # Top 4 by score: 1 (.9), 3 (.8), 5 (.7), 7 (.6); the recycled token is their mean, 40.
    assert out.candidates.tolist() == [[1, 3, 5, 7]]
    torch.testing.assert_close(out.tokens, torch.tensor([[[40.0]]]))
    # One cluster: all densities tie, the first candidate (the best score) is the centre.
    assert out.centers.tolist() == [[1]] and out.assign.tolist() == [[0, 0, 0, 0]]


def test_recycle_two_groups_by_hand():
    # 40 deleted: int(12.0) + 1 = 13 candidates, int(1.3) + 1 = 2 clusters.
    values = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06] + [100.0, 100.01, 100.02, 100.03, 100.04, 100.05]
    tokens = torch.full((1, 40, 1), 50.0)  # the 27 others, never candidates
    scores = torch.zeros(1, 40)
    for j, v in enumerate(values):
        tokens[0, 3 * j, 0] = v
        scores[0, 3 * j] = 1.0 + j / 100  # the 13 best scores
    out = recycle(tokens, scores)
    assert sorted(out.candidates[0].tolist()) == [3 * j for j in range(13)]
    # Two far-apart groups: one token per group, the group's mean, 0.03 and 100.025.
    got = sorted(out.tokens.flatten().tolist())
    assert got == pytest.approx([0.03, 100.025], abs=1e-4)


def test_prune_by_hand():
    visual = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]])
    scores = torch.tensor([[0.3, 0.1, 0.6, 0.2, 0.5, 0.05]])
    # Keep 3: 2 (.6), 4 (.5), 0 (.3), in spatial order [0, 2, 4]. Deleted [1, 3, 5]: int(0.9) + 1 = 1 candidate,
    # the best deleted score, token 3 (.2), recycled as itself and appended: [1, 3, 5, 4].
    out = sparsevlm_prune(visual, scores, 3)
    assert out.kept.tolist() == [[0, 2, 4]] and out.deleted.tolist() == [[1, 3, 5]]
    assert out.tokens.flatten().tolist() == [1.0, 3.0, 5.0, 4.0]
    assert out.recycled.candidates.tolist() == [[1]]  # index 1 of the deleted list = token 3
    # v2.0: no recycling.
    out = sparsevlm_prune(visual, scores, 3, recycle_tokens=False)
    assert out.tokens.flatten().tolist() == [1.0, 3.0, 5.0] and out.recycled is None


def test_prune_random_counts_and_determinism():
    torch.manual_seed(0)
    visual, scores = torch.randn(2, 576, 32), torch.rand(2, 576)
    a = sparsevlm_prune(visual, scores, 300)
    b = sparsevlm_prune(visual, scores, 300)
    # 276 deleted -> int(82.8) + 1 = 83 candidates -> 9 recycled.
    assert a.tokens.shape == (2, 309, 32) and a.kept.shape == (2, 300) and a.deleted.shape == (2, 276)
    assert a.recycled.candidates.shape == (2, 83) and a.recycled.tokens.shape == (2, 9, 32)
    assert torch.equal(a.tokens, b.tokens)
    assert is_sorted_unique(a.kept) and is_sorted_unique(a.deleted)
    for r in range(2):
        assert set(a.kept[r].tolist()) == set(scores[r].topk(300).indices.tolist())
        assert not set(a.kept[r].tolist()) & set(a.deleted[r].tolist())
        # The candidates are the 83 best-scored deleted tokens.
        cand = a.deleted[r, a.recycled.candidates[r]]
        rest = scores[r, a.deleted[r]].topk(83).indices
        assert set(cand.tolist()) == set(a.deleted[r, rest].tolist())
        torch.testing.assert_close(a.tokens[r, :300], visual[r, a.kept[r]])
        # Each recycled token is the mean of its cluster's members.
        members = a.deleted[r, a.recycled.candidates[r]]
        for k in range(9):
            group = members[a.recycled.assign[r] == k]
            torch.testing.assert_close(a.tokens[r, 300 + k], visual[r, group].mean(0))


# ---------------------------------------------------------------------------------------------------- schedule


def test_schedule_tables():
    assert SPARSEVLM_LAYERS == (2, 6, 15)
    assert sparsevlm_schedule(192) == [(2, 300), (6, 200), (15, 110)]
    assert sparsevlm_schedule(128) == [(2, 303), (6, 110), (15, 36)]
    assert sparsevlm_schedule(64) == [(2, 66), (6, 30), (15, 17)]
    assert sparsevlm_schedule(96) == [(2, 238), (6, 48), (15, 26)]
    assert sparsevlm_schedule(192, "2.0") == [(2, 300), (6, 200), (15, 118)]
    assert sparsevlm_schedule(128, "2.0") == [(2, 238), (6, 108), (15, 60)]
    assert sparsevlm_schedule(64, "2.0") == [(2, 66), (6, 34), (15, 20)]


@pytest.mark.parametrize(
    "budget, counts, authors_mean",
    [
        (192, [309, 204, 113], (2 * 576 + 4 * 309 + 9 * 204 + 17 * 113) / 32),  # 192.03
        (128, [312, 117, 39], (2 * 576 + 4 * 312 + 9 * 117 + 17 * 39) / 32),  # 128.63
        (96, [249, 55, 27], (2 * 576 + 4 * 249 + 9 * 55 + 17 * 27) / 32),  # 96.94
        (64, [82, 32, 18], (2 * 576 + 4 * 82 + 9 * 32 + 17 * 18) / 32),  # 64.81
    ],
)
def test_visual_counts_and_the_budget_as_a_layer_average(budget, counts, authors_mean):
    # 192: 576 - 300 = 276 deleted -> 83 -> 9, so 309; 309 - 200 = 109 -> 33 -> 4: 204; 204 - 110 = 94 -> 29 -> 3.
    stages = sparsevlm_schedule(budget)
    assert sparsevlm_visual_counts(stages) == counts
    authors = sparsevlm_layer_counts(stages, authors=True)
    assert len(authors) == 32 and sum(authors) / 32 == pytest.approx(authors_mean)
    # The reference logs int(mean) as "Equal Tokens": the budget's name.
    assert int(sum(authors) / 32) == budget
    # IVTP's convention: the pruning layer runs on the unpruned sequence, one more layer at the old count.
    ours = sparsevlm_layer_counts(stages)
    assert ours[:3] == [576] * 3 and ours[3:7] == [counts[0]] * 4 and ours[7:16] == [counts[1]] * 9
    assert ours[16:] == [counts[2]] * 16


def test_v2_counts_have_no_recycled_tokens():
    assert sparsevlm_visual_counts(sparsevlm_schedule(128, "2.0"), recycle_tokens=False) == [238, 108, 60]
    assert sum(sparsevlm_layer_counts(sparsevlm_schedule(128, "2.0"), recycle_tokens=False, authors=True)) == 4096


def test_stages_chain_to_the_counts():
    # Run the three stages on random tensors as a decoder loop would; lengths follow sparsevlm_visual_counts.
    torch.manual_seed(0)
    x = torch.randn(1, 576, 8)
    for stage, want in zip(sparsevlm_schedule(64), [82, 32, 18]):
        x = sparsevlm_prune(x, torch.rand(1, x.shape[1]), stage.keep).tokens
        assert x.shape == (1, want, 8)


# ---------------------------------------------------------------------------------------------------- errors

S = torch.rand(2, 8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sparsevlm_schedule(100), "sparsevlm: budget must be one of [64, 96, 128, 192] (version 1.5), got 100"),
        (lambda: sparsevlm_schedule(64, "3"), "sparsevlm: version must be '1.5' or '2.0'"),
        (lambda: sparsevlm_split(S, -1), "sparsevlm: keep must be at least 0, got -1"),
        (lambda: recycle_counts(10, ratio=0.0), "sparsevlm: ratio must be in (0, 1], got 0.0"),
        (lambda: recycle_counts(10, ratio=1.5), "sparsevlm: ratio must be in (0, 1], got 1.5"),
        (lambda: recycle_counts(10, per_cluster=0), "sparsevlm: per_cluster must be at least 1, got 0"),
        (lambda: recycle_counts(0), "sparsevlm: n_deleted must be at least 1, got 0"),
        (lambda: dpc_knn_merge(torch.randn(1, 4, 2), 5), "sparsevlm: clusters must be in [1, 4], got 5"),
        (lambda: dpc_knn_merge(torch.randn(1, 4, 2), 0), "sparsevlm: clusters must be in [1, 4], got 0"),
        (lambda: score_visual(ATTN, RATERS, heads=3), "sparsevlm: heads must be in [1, 2], got 3"),
        (lambda: score_visual(ATTN, torch.zeros(1, 3, dtype=torch.bool)), "sparsevlm: raters must select"),
        (lambda: score_visual(ATTN, RATERS[:, :2]), "sparsevlm: raters must have shape (1, 3)"),
        (lambda: score_visual(ATTN[0], RATERS), "sparsevlm: attn must have 4 dimensions"),
        (lambda: adaptive_keep(ATTN.mean(1), RATERS, 0.0), "sparsevlm: scale must be positive, got 0.0"),
        (lambda: adaptive_keep(ATTN.mean(1), RATERS, 1.0, -1.0), "sparsevlm: bias must be non-negative, got -1.0"),
        (lambda: text_relevance(torch.randn(1, 3, 4), torch.randn(1, 2, 5)), "sparsevlm: visual and text hidden"),
        (lambda: select_raters(S, torch.zeros(2, 8, dtype=torch.bool)), "sparsevlm: text_mask must leave"),
        (lambda: rope_gravity(S.long(), S.long(), 3), "sparsevlm: head_dim must be a positive even number, got 3"),
        (lambda: sparsevlm_prune(torch.randn(2, 8, 4), torch.rand(2, 7), 3), "sparsevlm: visual and scores token"),
        (lambda: sparsevlm_layer_counts([SparseVLMStage(6, 10), SparseVLMStage(2, 5)]), "sparsevlm: stage layers"),
        (lambda: sparsevlm_layer_counts([SparseVLMStage(40, 10)]), "sparsevlm: stage layers"),
    ],
)
def test_budget_and_knob_errors_name_the_method_and_the_knob(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(message), str(err.value)
