"""The peer methods' tensor algorithms (ivtp.ops.peers), against hand-computed cases and random tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from ivtp.ops.peers import (
    cls_attention_keep,
    evit_keep_and_fuse,
    fastv_keep,
    random_keep,
    spatial_pool,
    topk_cosine_to_cls,
    visiondrop_encoder,
    visiondrop_llm_scores,
    visiondrop_merge,
    visiondrop_schedule,
    vispruner_select,
    vispruner_split,
)


def is_sorted_unique(idx: torch.Tensor) -> bool:
    return bool((idx[..., 1:] > idx[..., :-1]).all())


# ---------------------------------------------------------------------------------------------------- Table 1


def test_random_keep_is_deterministic_sorted_and_exact():
    a = random_keep(576, 64, torch.Generator().manual_seed(7))
    b = random_keep(576, 64, torch.Generator().manual_seed(7))
    assert a.shape == (64,) and torch.equal(a, b) and is_sorted_unique(a)
    assert 0 <= int(a.min()) and int(a.max()) < 576
    batch = random_keep(10, 4, torch.Generator().manual_seed(0), batch=5)
    assert batch.shape == (5, 4) and is_sorted_unique(batch)
    assert len({tuple(r) for r in batch.tolist()}) > 1  # rows are drawn independently
    assert random_keep(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_topk_cosine_to_cls_by_hand():
    cls = torch.tensor([[1.0, 0.0]])
    # cosines to [1, 0]: 1, 0, 0.707, -1, 0.999, and 1 again (the norm must not matter).
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.1], [10.0, 0.0]]])
    assert topk_cosine_to_cls(cls, patches, 3).tolist() == [[0, 4, 5]]
    assert topk_cosine_to_cls(cls, patches, 4).tolist() == [[0, 2, 4, 5]]


def test_topk_cosine_random():
    torch.manual_seed(0)
    cls, patches = torch.randn(3, 16), torch.randn(3, 100, 16)
    idx = topk_cosine_to_cls(cls, patches, 10)
    cos = F.cosine_similarity(patches, cls[:, None], dim=-1)
    assert idx.shape == (3, 10) and is_sorted_unique(idx)
    for r in range(3):
        assert set(idx[r].tolist()) == set(cos[r].topk(10).indices.tolist())


def test_spatial_pool_even_grid_by_hand():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, value = position
    # 2x2 windows: {0,1,4,5} -> 2.5, {2,3,6,7} -> 4.5, {8,9,12,13} -> 10.5, {10,11,14,15} -> 12.5
    assert spatial_pool(x, 4, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_spatial_pool_uneven_grid_is_adaptive():
    x = torch.arange(9.0).view(1, 9, 1)  # 3x3 grid
    # 3 -> 2: windows rows/cols 0-1 and 1-2, sharing the middle: {0,1,3,4} -> 2, {1,2,4,5} -> 3,
    # {3,4,6,7} -> 5, {4,5,7,8} -> 6.
    assert spatial_pool(x, 3, 2).flatten().tolist() == [2.0, 3.0, 5.0, 6.0]


def test_spatial_pool_llava_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 576, 8)
    out = spatial_pool(x, 24, 8)
    assert out.shape == (2, 64, 8)
    # Equal to a 3x3 average pool of the row-major grid; the first token averages rows 0-2, columns 0-2.
    torch.testing.assert_close(out[:, 0], x.view(2, 24, 24, 8)[:, :3, :3].mean((1, 2)))
    assert spatial_pool(x, 24, 7).shape == (2, 49, 8)
    assert torch.equal(spatial_pool(x, 24, 24), x)


def test_evit_by_hand():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
    attn = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    tokens, keep = evit_keep_and_fuse(patches, attn, 2)
    # Keep 1 and 2 (0.4, 0.3); fuse 0.1 * [1, 0] + 0.2 * [4, 0] = [0.9, 0], last.
    assert keep.tolist() == [[1, 2]]
    torch.testing.assert_close(tokens, torch.tensor([[[0.0, 1.0], [2.0, 2.0], [0.9, 0.0]]]))
    # Normalised: [0.9, 0] / (0.1 + 0.2) = [3, 0].
    tokens, _ = evit_keep_and_fuse(patches, attn, 2, normalize=True)
    torch.testing.assert_close(tokens[:, -1], torch.tensor([[3.0, 0.0]]))


def test_evit_random():
    torch.manual_seed(0)
    x, attn = torch.randn(2, 576, 8), torch.rand(2, 576)
    tokens, keep = evit_keep_and_fuse(x, attn, 63)
    assert tokens.shape == (2, 64, 8) and keep.shape == (2, 63) and is_sorted_unique(keep)
    rest = torch.ones(2, 576, dtype=torch.bool)
    rest.scatter_(1, keep, False)
    torch.testing.assert_close(tokens[:, -1], ((attn * rest)[..., None] * x).sum(1))


# ---------------------------------------------------------------------------------------------------- attention top-k


def test_fastv_by_hand():
    row = torch.tensor([[0.1, 0.5, 0.2, 0.15]])
    assert fastv_keep(row).tolist() == [[1, 2]]  # R = 50%: 2 of 4
    assert fastv_keep(row, keep_ratio=0.25).tolist() == [[1]]
    assert fastv_keep(row, k=3).tolist() == [[1, 2, 3]]
    assert fastv_keep(torch.rand(2, 576)).shape == (2, 288)


def test_fastervlm_random():
    torch.manual_seed(0)
    attn = torch.rand(3, 576)
    idx = cls_attention_keep(attn, 64)
    assert idx.shape == (3, 64) and is_sorted_unique(idx)
    for r in range(3):
        assert set(idx[r].tolist()) == set(attn[r].topk(64).indices.tolist())


# ---------------------------------------------------------------------------------------------------- VisPruner

# Eight tokens. Attention ranks them 0 (.30), 2 (.20), 5 (.12), 3 (.10), 7 (.09), 4 (.08), 6 (.06), 1 (.05).
VP_ATTN = torch.tensor([[0.30, 0.05, 0.20, 0.10, 0.08, 0.12, 0.06, 0.09]])


def vp_features(rows: dict[int, list[float]]) -> torch.Tensor:
    f = torch.zeros(1, 8, 2)
    for i, v in rows.items():
        f[0, i] = torch.tensor(v)
    return f


def test_vispruner_one_round_by_hand():
    # total 6, ratio 0.5: important = top 3 = {0, 2, 5}; residual list [3, 7, 4, 6, 1], R = 5, T_div = 3.
    # Round 1: r = min(8, 5 - 3) = 2; a = [3, 4, 1], b = [7, 6].
    #   cover(3) = cos([1, .1], [1, 0]) = .995; cover(4) = cos([.6, .8], [0, 1]) = .8; cover(1) = max(-1, 0) = 0
    #   drop 3 and 4 -> residual [1, 7, 6] = T_div. Selected: {0, 2, 5} + {1, 6, 7}.
    f = vp_features({3: [1, 0.1], 4: [0.6, 0.8], 1: [-1, 0], 7: [1, 0], 6: [0, 1], 0: [1, 1], 2: [1, 1], 5: [1, 1]})
    imp, div = vispruner_split(VP_ATTN, f, 6)
    assert imp.tolist() == [[0, 2, 5]] and div.tolist() == [[1, 6, 7]]
    assert vispruner_select(VP_ATTN, f, 6).tolist() == [[0, 1, 2, 5, 6, 7]]


def test_vispruner_two_rounds_by_hand():
    # total 4, ratio 0.5: important {0, 2}; residual [5, 3, 7, 4, 6, 1], R = 6, T_div = 2.
    # Round 1: r = min(8, 4) = 4 but a = [5, 7, 6] holds 3: all of a goes -> residual [3, 4, 1].
    # Round 2: r = 1; a = [3, 1], b = [4]; cover(3) = cos([1, 0], [1, 0]) = 1, cover(1) = 0 -> drop 3.
    # Residual [1, 4]. Selected: [0, 1, 2, 4].
    f = vp_features({3: [1, 0], 4: [1, 0], 1: [0, 1], 5: [1, 1], 7: [1, 1], 6: [1, 1], 0: [1, 1], 2: [1, 1]})
    assert vispruner_select(VP_ATTN, f, 4).tolist() == [[0, 1, 2, 4]]


def vispruner_reference(attn: torch.Tensor, feats: torch.Tensor, total: int, ratio: float) -> list[int]:
    """A plain, list-based restatement of the procedure in DESIGN.md section 9, for one row. The residual list starts
    in attention order, so an implementation that split by spatial position would disagree on random inputs."""
    n_imp = int(total * ratio)
    ranked = sorted(range(len(attn)), key=lambda i: (-float(attn[i]), i))
    important, residual = ranked[:n_imp], ranked[n_imp:]
    if total == n_imp:
        return sorted(important)
    unit = F.normalize(feats.double(), dim=-1)
    while len(residual) > total - n_imp:
        r = min(8, len(residual) - (total - n_imp))
        a, b = residual[0::2], residual[1::2]
        cover = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        order = sorted(range(len(a)), key=lambda t: (-cover[t], t))
        residual = [a[t] for t in order[r:]] + b
    return sorted(important + residual)


@pytest.mark.parametrize("n, total, ratio", [(50, 20, 0.5), (64, 7, 0.25), (40, 40, 0.5), (30, 12, 1.0)])
def test_vispruner_matches_the_plain_procedure(n, total, ratio):
    torch.manual_seed(n + total)
    attn, feats = torch.rand(3, n), torch.randn(3, n, 6)
    got = vispruner_select(attn, feats, total, ratio)
    assert got.shape == (3, total) and is_sorted_unique(got)
    for r in range(3):
        assert got[r].tolist() == vispruner_reference(attn[r], feats[r], total, ratio)


def test_vispruner_64_at_075_is_48_important_16_diverse():
    torch.manual_seed(0)
    attn, feats = torch.rand(2, 576), torch.randn(2, 576, 32)
    imp, div = vispruner_split(attn, feats, 64, important_ratio=0.75)
    assert imp.shape == (2, 48) and div.shape == (2, 16)
    for r in range(2):
        assert set(imp[r].tolist()) == set(attn[r].topk(48).indices.tolist())
        assert not set(imp[r].tolist()) & set(div[r].tolist())
    sel = vispruner_select(attn, feats, 64, important_ratio=0.75)
    assert sel.shape == (2, 64) and is_sorted_unique(sel)
    assert torch.equal(sel, torch.cat([imp, div], 1).sort(-1).values)


# ---------------------------------------------------------------------------------------------------- VisionDrop


def test_visiondrop_merge_by_hand():
    scores = torch.tensor([[0.5, 0.1, 0.05, 0.3, 0.02, 0.03]])
    keys = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.9, 0.1], [9.0, 9.0], [0.0, 1.0], [0.2, 0.9]]])
    x = torch.tensor([[[10.0], [1.0], [3.0], [20.0], [5.0], [7.0]]])
    # Dominant {0, 3}. Rest [1, 2, 4, 5], R = 4, stride 4 // 2 = 2: targets are rest[0], rest[2] = 1, 4.
    # Token 2 ([.9, .1]) joins target 1 ([1, 0]); token 5 ([.2, .9]) joins target 4 ([0, 1]).
    # Contextual: 1 + mean(3) = 4 and 5 + mean(7) = 12 (target plus the members' mean).
    out = visiondrop_merge(scores, keys, x, dominant=2, contextual=2)
    assert out.dominant.tolist() == [[0, 3]] and out.targets.tolist() == [[1, 4]]
    assert out.tokens.flatten().tolist() == [10.0, 20.0, 4.0, 12.0]
    # Both members join target 1: 1 + mean(3, 7) = 6; target 4 has no member and stays 5.
    keys2 = keys.clone()
    keys2[0, 5] = torch.tensor([1.0, 0.05])
    out = visiondrop_merge(scores, keys2, x, dominant=2, contextual=2)
    assert out.tokens.flatten().tolist() == [10.0, 20.0, 6.0, 5.0]
    # contextual 0: dominant tokens only; dominant 0: everything merges.
    assert visiondrop_merge(scores, keys, x, 3, 0).tokens.flatten().tolist() == [10.0, 1.0, 20.0]
    assert visiondrop_merge(scores, keys, x, 0, 2).targets.tolist() == [[0, 3]]


def test_visiondrop_encoder_random_matches_a_loop():
    torch.manual_seed(0)
    b, n, c, d = 2, 576, 16, 8
    attn, keys, x = torch.rand(b, n), torch.randn(b, n, c), torch.randn(b, n, d)
    out = visiondrop_encoder(attn, keys, x)
    assert out.tokens.shape == (b, 48, d) and out.dominant.shape == (b, 42) and out.targets.shape == (b, 6)
    assert is_sorted_unique(out.dominant) and is_sorted_unique(out.targets)
    for r in range(b):
        assert set(out.dominant[r].tolist()) == set(attn[r].topk(42).indices.tolist())
        rest = [i for i in range(n) if i not in set(out.dominant[r].tolist())]
        # 534 remaining, stride 534 // 6 = 89: targets at 0, 89, ..., 445 of the remaining list.
        targets = [rest[j] for j in range(0, 534, 89)]
        assert out.targets[r].tolist() == targets
        members = [i for i in rest if i not in targets]
        unit = F.normalize(keys[r], dim=-1)
        groups = {t: [] for t in targets}
        for i in members:
            groups[targets[int((unit[targets] @ unit[i]).argmax())]].append(i)
        for j, t in enumerate(targets):
            expected = x[r, t] + (x[r, groups[t]].mean(0) if groups[t] else 0)
            torch.testing.assert_close(out.tokens[r, 42 + j], expected)
        torch.testing.assert_close(out.tokens[r, :42], x[r, out.dominant[r]])


def test_visiondrop_llm_scores_by_hand():
    q = torch.zeros(1, 1, 2, 1)
    k = torch.zeros(1, 1, 2, 1)
    # All logits 0. Query 0 sees key 0 only: [1, 0]; query 1 sees both: [1/2, 1/2]. Query mean: [3/4, 1/4].
    torch.testing.assert_close(visiondrop_llm_scores(q, k, 1.0), torch.tensor([[0.75, 0.25]]))
    # Two prefix keys share the softmax: query 0 -> [1/3, 0], query 1 -> [1/4, 1/4]; mean [7/24, 1/8].
    got = visiondrop_llm_scores(q, k, 1.0, prefix_k=torch.zeros(1, 1, 2, 1))
    torch.testing.assert_close(got, torch.tensor([[7 / 24, 1 / 8]]))


def test_visiondrop_llm_scores_random_with_grouped_keys():
    torch.manual_seed(0)
    b, h, hk, nv, p, dh = 2, 4, 2, 9, 3, 8
    q, k, pk = torch.randn(b, h, nv, dh), torch.randn(b, hk, nv, dh), torch.randn(b, hk, p, dh)
    got = visiondrop_llm_scores(q, k, dh ** -0.5, prefix_k=pk)
    # Brute force over the full causal sequence [prefix, visual].
    keys = torch.cat([pk, k], 2).repeat_interleave(h // hk, dim=1)  # (B, H, P + Nv, Dh)
    logits = q @ keys.transpose(-1, -2) * dh ** -0.5
    mask = torch.ones(nv, p + nv, dtype=torch.bool).tril(p)  # query i sees prefix and visual 0..i
    attn = logits.masked_fill(~mask, -math.inf).softmax(-1)[..., p:]
    torch.testing.assert_close(got, attn.mean(1).mean(1))
    assert got.shape == (b, nv)


def test_visiondrop_schedule_defaults():
    stages = visiondrop_schedule()
    assert [s.total for s in stages] == [48, 35, 26, 19]
    assert [(s.layer, s.dominant, s.contextual) for s in stages] == [
        (None, 42, 6), (8, 30, 5), (16, 22, 4), (24, 16, 3)
    ]


def test_visiondrop_stages_chain_to_the_schedule():
    torch.manual_seed(0)
    x = torch.randn(1, 576, 8)
    stages = visiondrop_schedule()
    x = visiondrop_encoder(torch.rand(1, 576), torch.randn(1, 576, 4), x).tokens
    for s in stages[1:]:
        n = x.shape[1]
        scores = visiondrop_llm_scores(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4), 0.5)
        x = visiondrop_merge(scores, torch.randn(1, n, 4), x, s.dominant, s.contextual).tokens
        assert x.shape[1] == s.total
    assert x.shape == (1, 19, 8)


# ---------------------------------------------------------------------------------------------------- errors

A, F8, X = torch.rand(2, 8), torch.randn(2, 8, 4), torch.randn(2, 8, 4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: random_keep(8, 9), "random: k must be in [1, 8]"),
        (lambda: random_keep(8, 0), "random: k"),
        (lambda: topk_cosine_to_cls(torch.rand(2, 4), X, 9), "topk: k must be in [1, 8]"),
        (lambda: spatial_pool(X, 3, 2), "spatial: grid"),
        (lambda: spatial_pool(torch.rand(1, 16, 2), 4, 5), "spatial: out_grid must be in [1, 4]"),
        (lambda: evit_keep_and_fuse(X, A, 8), "evit: k must be in [1, 7]"),
        (lambda: fastv_keep(A, keep_ratio=1.5), "fastv: keep_ratio must be in (0, 1], got 1.5"),
        (lambda: fastv_keep(A, keep_ratio=0.0), "fastv: keep_ratio must be in (0, 1], got 0.0"),
        (lambda: fastv_keep(A, k=9), "fastv: k must be in [1, 8]"),
        (lambda: fastv_keep(A, k=2, keep_ratio=0.5), "fastv: give k or keep_ratio"),
        (lambda: cls_attention_keep(A, 9), "fastervlm: k must be in [1, 8]"),
        (lambda: vispruner_select(A, F8, 4, 1.5), "vispruner: important_ratio must be in (0, 1], got 1.5"),
        (lambda: vispruner_select(A, F8, 4, 0.0), "vispruner: important_ratio must be in (0, 1], got 0.0"),
        (lambda: vispruner_select(A, F8, 9), "vispruner: total must be in [1, 8]"),
        (lambda: visiondrop_encoder(A, F8, X), "visiondrop: dominant + contextual must be in [1, 8]"),
        (lambda: visiondrop_merge(A, F8, X, 5, 4), "visiondrop: dominant + contextual"),
        (lambda: visiondrop_merge(A, F8, X, -1, 4), "visiondrop: dominant + contextual"),
        (lambda: visiondrop_schedule(llm=((8, 50, 5),)), "visiondrop: dominant + contextual cannot grow"),
        (lambda: visiondrop_schedule(llm=((8, 30, 5), (8, 20, 4))), "visiondrop: LLM stage layers"),
    ],
)
def test_budget_and_knob_errors_name_the_method_and_the_knob(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(message), str(err.value)
