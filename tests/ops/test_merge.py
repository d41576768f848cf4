"""ToMe matching, size-weighted merging and the r schedule, against hand-computed cases (the side-by-side check
against a re-derivation of the authors' algorithm is tests/ops/test_tome_reference.py)."""

import pytest
import torch

from ivtp.ops.merge import bipartite_soft_matching, merge_weighted, tome_max_r, tome_schedule

# Four tokens: a = positions {0, 2}, b = positions {1, 3}.
#   cos(k0, k1) = 0, cos(k0, k3) = 1/sqrt 2   -> 0's match is 3, similarity 0.707
#   cos(k2, k1) = 1, cos(k2, k3) = 1/sqrt 2   -> 2's match is 1, similarity 1
KEYS = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
X = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])


def test_matching_by_hand():
    m = bipartite_soft_matching(KEYS, 1)
    # The most similar pair (2 -> 1) merges first; token 2 disappears. The unmerged a-token 0 comes first, then
    # the b-tokens 1 and 3 (ToMe's order, here also the spatial one).
    assert m.src.tolist() == [[2]] and m.dst.tolist() == [[1]] and m.keep.tolist() == [[0, 1, 3]]
    x, size = merge_weighted(X, None, m)
    # Position 1 becomes (2 + 4) / 2 = 3 and stands for 2 tokens.
    assert x.flatten().tolist() == [1.0, 3.0, 8.0]
    assert size.flatten().tolist() == [1.0, 2.0, 1.0]
    # The plain sum and mean modes on the same match.
    assert m.merge(X).flatten().tolist() == [1.0, 6.0, 8.0]
    assert m.merge(X, mode="mean").flatten().tolist() == [1.0, 3.0, 8.0]

    m2 = bipartite_soft_matching(KEYS, 2)
    assert m2.src.tolist() == [[2, 0]] and m2.dst.tolist() == [[1, 3]] and m2.keep.tolist() == [[1, 3]]
    # Sizes [3, 1, 1, 1]: position 1 = (1*2 + 1*4) / 2 = 3; position 3 = (3*1 + 1*8) / 4 = 11/4.
    x, size = merge_weighted(X, torch.tensor([[[3.0], [1.0], [1.0], [1.0]]]), m2)
    assert x.flatten().tolist() == [3.0, 2.75] and size.flatten().tolist() == [2.0, 4.0]
    # Conserved: 3*1 + 1*2 + 1*4 + 1*8 = 17 = 2*3 + 4*2.75.
    assert (x * size).sum().item() == 17.0


def test_r_zero_is_the_identity():
    m = bipartite_soft_matching(KEYS, 0)
    x, size = merge_weighted(X, None, m)
    assert torch.equal(x, X) and size.flatten().tolist() == [1.0] * 4


# Six tokens: a = positions {0, 2, 4}, b = positions {1, 3, 5}.
#   0 -> 1 (cos 0.6), 2 -> 5 (cos 1), 4 -> 3 (cos 0.8): ranked by similarity, a-tokens 2, 4, 0.
KEYS6 = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8],
                       [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def test_survivors_come_in_tomes_order():
    # Without [CLS]: r = 1 merges 2 into 5; the unmerged a-tokens follow the similarity ranking (4 before 0),
    # then all of b.
    m = bipartite_soft_matching(KEYS6, 1)
    assert m.src.tolist() == [[2]] and m.dst.tolist() == [[5]]
    assert m.keep.tolist() == [[4, 0, 1, 3, 5]]
    # With [CLS] protected: the same merge, but the unmerged a-tokens go by position, so [CLS] leads.
    m = bipartite_soft_matching(KEYS6, 1, protect_cls=True)
    assert m.keep.tolist() == [[0, 4, 1, 3, 5]]
    x, size = merge_weighted(torch.arange(6.0).view(1, 6, 1), None, m)
    assert x.flatten().tolist() == [0.0, 4.0, 1.0, 3.0, 3.5] and size.flatten().tolist() == [1, 1, 1, 1, 2]
    # Our spatial option: the same tokens by position.
    s = bipartite_soft_matching(KEYS6, 1, protect_cls=True, order="spatial")
    assert s.keep.tolist() == [[0, 1, 3, 4, 5]] and torch.equal(s.src, m.src) and torch.equal(s.dst, m.dst)
    with pytest.raises(ValueError, match="tome: order"):
        bipartite_soft_matching(KEYS6, 1, order="sorted")


def test_cls_is_protected():
    # With [CLS] at 0 protected, only token 2 can merge.
    m = bipartite_soft_matching(KEYS, 1, protect_cls=True)
    assert m.src.tolist() == [[2]]
    with pytest.raises(ValueError, match=r"tome: r must be in \[0, 1\]"):
        bipartite_soft_matching(KEYS, 2, protect_cls=True)


@pytest.mark.parametrize("r, cls", [(3, False), (-1, False), (2, True)])
def test_r_beyond_the_limit_raises(r, cls):
    # 4 tokens: at most 2 merges (1 with [CLS] protected).
    with pytest.raises(ValueError, match=r"^tome: r must"):
        bipartite_soft_matching(KEYS, r, protect_cls=cls)
    # 5 tokens hold 3 a-tokens, but ToMe merges at most half of them, rounded down: 2.
    with pytest.raises(ValueError, match=r"^tome: r must be in \[0, 2\]"):
        bipartite_soft_matching(KEYS6[:, :5], 3)


def test_max_r():
    # ToMe's limit: floor((n - protected) / 2). (Ours used to let an odd n without [CLS] merge all ceil(n / 2)
    # a-tokens, one more than ToMe.)
    assert [tome_max_r(n) for n in (0, 1, 2, 3, 4, 5, 576)] == [0, 0, 1, 1, 2, 2, 288]
    assert [tome_max_r(n, True) for n in (1, 2, 3, 577)] == [0, 0, 1, 288]


def test_random_merge_conserves_the_size_weighted_sum_in_tomes_order():
    torch.manual_seed(0)
    b, n, r = 3, 577, 200
    keys, x = torch.randn(b, n, 16, dtype=torch.float64), torch.randn(b, n, 8, dtype=torch.float64)
    size = torch.randint(1, 5, (b, n, 1)).double()
    m = bipartite_soft_matching(keys, r, protect_cls=True)
    x2, size2 = merge_weighted(x, size, m)
    assert x2.shape == (b, n - r, 8) and size2.shape == (b, n - r, 1)
    unmerged = (n + 1) // 2 - r  # the a-tokens left, [CLS] among them
    assert torch.equal(m.keep[:, :unmerged], m.keep[:, :unmerged].sort(-1).values)  # by position, [CLS] first
    assert bool((m.keep[:, :unmerged] % 2 == 0).all())
    assert torch.equal(m.keep[:, unmerged:], torch.arange(1, n, 2).expand(b, -1))  # then every b-token
    assert bool((m.src % 2 == 0).all()) and bool((m.dst % 2 == 1).all())  # a -> b only
    assert bool((m.keep[:, 0] == 0).all()) and torch.allclose(x2[:, 0], x[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close((size2 * x2).sum(1), (size * x).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(size2.sum(1), size.sum(1))
    # A second step on the merged tokens still conserves the sum.
    m2 = bipartite_soft_matching(torch.randn(b, n - r, 16), 100, protect_cls=True)
    x3, size3 = merge_weighted(x2, size2, m2)
    torch.testing.assert_close((size3 * x3).sum(1), (size * x).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_merges_are_differentiable(mode):
    # A trainable tower (or activation checkpointing, which makes the tower's inputs require grad) backpropagates
    # through the merges: gradcheck against finite differences, in float64.
    torch.manual_seed(0)
    keys = torch.randn(2, 9, 4, dtype=torch.float64)
    match = bipartite_soft_matching(keys, r=3, protect_cls=True)
    x = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    size = torch.rand(2, 9, 1, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: match.merge(t, mode=mode), (x,))
    assert torch.autograd.gradcheck(lambda t: merge_weighted(t, size, match)[0], (x,))


def test_each_merged_token_joined_its_best_match():
    torch.manual_seed(1)
    keys = torch.randn(2, 30, 8)
    m = bipartite_soft_matching(keys, 6)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # (B, 15, 15)
    best, best_b = sim.max(-1)
    for row in range(2):
        chosen = set(best[row].topk(6).indices.tolist())
        assert set((m.src[row] // 2).tolist()) == chosen
        assert (m.dst[row] // 2).tolist() == best_b[row][m.src[row] // 2].tolist()


def test_schedule_by_hand():
    # 10 -> 4 in 2 steps: 3 then 3 (an even split is feasible).
    assert tome_schedule(10, 4, 2) == [3, 3]
    # 16 -> 4 in 2 steps: an even 6 + 6 fails (10 tokens cannot lose 6 in one step: at most 5), and so does 7 + 5
    # (9 tokens can lose only 4), so the first step takes its maximum 8, leaving 8, which can lose 4.
    assert tome_schedule(16, 4, 2) == [8, 4]
    # 576 -> 64 over 23 layers: 512 = 6 x 23 + 17 x 22, the remainder on the earlier layers.
    assert tome_schedule(576, 64, 23) == [23] * 6 + [22] * 17
    # 577 -> 100 in 3 steps with [CLS] protected (a step leaves floor(n / 2) + 1): reaching 100 at the end needs
    # <= 199 before it, so <= 397 before that: 577 - 397 = 180, then 397 - 199 = 198 (its maximum), then 99.
    assert tome_schedule(577, 100, 3, protect_cls=True) == [180, 198, 99]
    assert tome_schedule(8, 8, 3) == [0, 0, 0]


def test_schedule_reaches_the_target_with_real_merges():
    torch.manual_seed(2)
    for n, target, layers, cls in [(576, 64, 23, False), (577, 37, 5, True), (64, 7, 4, False)]:
        x = torch.randn(1, n, 4)
        for r in tome_schedule(n, target, layers, protect_cls=cls):
            x, _ = merge_weighted(x, None, bipartite_soft_matching(torch.randn(1, x.shape[1], 4), r, cls))
        assert x.shape[1] == target


def test_schedule_errors():
    with pytest.raises(ValueError, match="tome: target 3 is out of reach"):
        tome_schedule(16, 3, 2)  # 16 -> 8 -> 4 at best
    with pytest.raises(ValueError, match="tome: target"):
        tome_schedule(16, 17, 2)
    with pytest.raises(ValueError, match="tome: layers"):
        tome_schedule(16, 4, 0)
