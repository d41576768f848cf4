"""ToMe as its authors run it, re-derived here token by token, against ours.

The re-derivation follows the ToMe paper (Bolya et al., ICLR 2023) and what the authors' code
(facebookresearch/ToMe: tome/merge.py, tome/patch/timm.py) does; it is written as plain loops over tokens,
independent of ivtp.ops.merge:
  - a step splits the current token list by parity of index (a: 0, 2, ...; b: 1, 3, ...), gives every a-token
    its most cosine-similar b-token (a protected [CLS] gets none), ranks the a-tokens by that similarity and
    merges the top r into their b-tokens: a size-weighted average, sizes adding;
  - the new token list is the unmerged a-tokens (by index if [CLS] is protected, else in rank order), then every
    b-token in b order;
  - in a transformer block the step sits after the attention's residual add and before the MLP, matching on that
    attention's keys averaged over heads, and every attention adds log(size) to its logits.
Where ours could deviate (spatial order, merging after the whole layer), the checks below also show that the
reference tells the deviation apart on these inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from ivtp.config import ToMeSection
from ivtp.methods.peers import ToMeRunner
from ivtp.ops.merge import bipartite_soft_matching, merge_weighted, tome_schedule
from ivtp.patch.clip import patch_attention


# ------------------------------------------------------------------------------------------- one matching step


def reference_step(keys, x, size, members, r, cls, order="tome"):
    """One ToMe step on one image. keys: (n, C); x: (n, D); size: (n,) float64; members: n sets of original
    token indices. Returns the new x, size and members as lists/tensors in the new token order."""
    n = keys.shape[0]
    unit = [k / k.norm() for k in keys.double()]
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    partner, sim = {}, {}
    for i in a_idx:
        if cls and i == 0:
            partner[i], sim[i] = None, -math.inf  # [CLS] ranks below every real similarity
            continue
        best_j, best_s = None, -math.inf
        for j in b_idx:
            s = float(unit[i] @ unit[j])
            if s > best_s:  # the first of equals wins
                best_j, best_s = j, s
        partner[i], sim[i] = best_j, best_s
    ranked = sorted(a_idx, key=lambda i: -sim[i])  # Python's sort is stable
    merging, staying = ranked[:r], ranked[r:]
    if cls or order == "spatial":
        staying = sorted(staying)

    total = {j: x[j].double() * size[j] for j in b_idx}
    weight = {j: size[j] for j in b_idx}
    group = {j: set(members[j]) for j in b_idx}
    for i in merging:
        j = partner[i]
        total[j] = total[j] + x[i].double() * size[i]
        weight[j] = weight[j] + size[i]
        group[j] |= members[i]

    entries = [(i, x[i].double(), size[i], members[i]) for i in staying]
    entries += [(j, total[j] / weight[j], weight[j], group[j]) for j in b_idx]
    if order == "spatial":  # the deviation ours used to have: survivors by their current position
        entries.sort(key=lambda e: e[0])
    new_x = torch.stack([e[1] for e in entries])
    new_size = torch.tensor([float(e[2]) for e in entries], dtype=torch.float64)
    return new_x, new_size, [e[3] for e in entries]


def reference_chain(x0, proj, schedule, cls, order="tome"):
    """Several steps on each image of a batch; each step's keys are a fixed projection of the current tokens, so
    the token order of one step changes the a/b split, and so the result, of the next."""
    out = []
    for row in range(x0.shape[0]):
        x = x0[row].double()
        size = torch.ones(x.shape[0], dtype=torch.float64)
        members = [{i} for i in range(x.shape[0])]
        for r in schedule:
            x, size, members = reference_step(x @ proj, x, size, members, r, cls, order)
        out.append((x, size, members))
    return out


def ours_chain(x0, proj, schedule, cls):
    x, size = x0.double(), None
    n = x0.shape[1]
    member = torch.eye(n, dtype=torch.float64).expand(x0.shape[0], n, n)  # (B, n, N): which originals
    for r in schedule:
        match = bipartite_soft_matching(x @ proj, r, protect_cls=cls)
        x, size = merge_weighted(x, size, match)
        member = match.merge(member, mode="sum")
    return x, size, member


@pytest.mark.parametrize("cls", [True, False])
def test_steps_match_the_reference_in_features_sizes_and_order(cls):
    torch.manual_seed(0)
    b, n, d = 2, 41, 12
    x0 = torch.randn(b, n, d, dtype=torch.float64)
    proj = torch.randn(d, 6, dtype=torch.float64)
    schedule = [9, 7, 6, 4]
    x, size, member = ours_chain(x0, proj, schedule, cls)
    ref = reference_chain(x0, proj, schedule, cls)
    spatial = reference_chain(x0, proj, schedule, cls, order="spatial")
    assert x.shape[1] == n - sum(schedule)
    for row, (rx, rsize, rmembers) in enumerate(ref):
        torch.testing.assert_close(x[row], rx, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(size[row, :, 0].double(), rsize, rtol=0, atol=0)
        assert [set(torch.nonzero(m).flatten().tolist()) for m in member[row]] == rmembers  # the same order
        if cls:
            assert rmembers[0] == {0}  # [CLS] never merges and stays first
        # The reference tells ToMe's order from spatial order: after the first step the splits differ.
        assert spatial[row][2] != rmembers


def test_one_step_order_by_hand_against_the_reference():
    # The first step alone: ours puts the same token sets in the same slots.
    torch.manual_seed(1)
    keys, x = torch.randn(1, 15, 4, dtype=torch.float64), torch.randn(1, 15, 3, dtype=torch.float64)
    for cls in (True, False):
        match = bipartite_soft_matching(keys, 5, protect_cls=cls)
        rx, _, rmembers = reference_step(keys[0], x[0], torch.ones(15, dtype=torch.float64),
                                         [{i} for i in range(15)], 5, cls)
        # Each survivor is listed under its own (unmerged a, or b) index: the slot order is the keep order.
        assert [min(m & set(match.keep[0].tolist())) for m in rmembers] == match.keep[0].tolist()
        torch.testing.assert_close(merge_weighted(x, None, match)[0][0], rx)


# ------------------------------------------------------------------------------------------- a tiny CLIP tower


def tiny_tower(layers=7, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=56, patch_size=8)  # 7 x 7 = 49 patches
    cfg._attn_implementation = "sdpa"
    model = CLIPVisionModel(cfg).eval()
    return model, cfg


def reference_attention(attn, h, size):
    """A CLIP attention written out: (n, D) -> the output (n, D) and the head-mean keys (n, Dh); log(size) is
    added to every query's logits at each key (proportional attention)."""
    n, d = h.shape
    heads = attn.num_heads
    dh = d // heads
    q = attn.q_proj(h).view(n, heads, dh).transpose(0, 1)  # (H, n, Dh)
    k = attn.k_proj(h).view(n, heads, dh).transpose(0, 1)
    v = attn.v_proj(h).view(n, heads, dh).transpose(0, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (H, n, n)
    if size is not None:
        logits = logits + size.log().to(logits.dtype)[None, None, :]
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, d)
    return attn.out_proj(out), k.mean(0)


def reference_tower(model, pixels, schedule, used, placement="between", order="tome"):
    """ToMe through the tower image by image: returns, per image, the feature-layer tokens and the final pooled
    [CLS] (post-layernormed, the layers above the feature layer without merges)."""
    vm = model
    hidden = vm.pre_layrnorm(vm.embeddings(pixels))
    results = []
    for row in range(hidden.shape[0]):
        x, size = hidden[row], None
        members = [{i} for i in range(x.shape[0])]
        top = None
        for idx, layer in enumerate(vm.encoder.layers):
            r = schedule[idx] if idx < used else 0
            out, keys = reference_attention(layer.self_attn, layer.layer_norm1(x), size)
            x = x + out
            if r and placement == "between":
                s = torch.ones(x.shape[0], dtype=torch.float64) if size is None else size
                x, s, members = reference_step(keys, x, s, members, r, cls=True, order=order)
                x, size = x.float(), s
            x = x + layer.mlp(layer.layer_norm2(x))
            if r and placement == "after":
                s = torch.ones(x.shape[0], dtype=torch.float64) if size is None else size
                xs, s, members = reference_step(keys, x, s, members, r, cls=True, order=order)
                x, size = xs.float(), s
            if idx == used - 1:
                top = x
        results.append((top, vm.post_layernorm(x[0])))
    return results


def test_runner_merges_between_attention_and_mlp_as_the_authors_do():
    model, cfg = tiny_tower()
    runner = ToMeRunner(ToMeSection(keep=12), cfg, feature_layer=-2)
    assert runner.schedule == tome_schedule(50, 13, 6, protect_cls=True) and len(runner.schedule) == 6
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = reference_tower(model, pixels, runner.schedule, runner.layers_used)
        after = reference_tower(model, pixels, runner.schedule, runner.layers_used, placement="after")
        spatial = reference_tower(model, pixels, runner.schedule, runner.layers_used, order="spatial")
        for layer in model.encoder.layers:
            patch_attention(layer.self_attn)
        out = runner.run(model, pixels, want_final_cls=True)
    assert out.features.shape == (2, 12, 32)
    assert out.trace.counts == [49] + [49 - sum(runner.schedule[: i + 1]) for i in range(6)]
    for row, (tokens, pooled) in enumerate(ref):
        torch.testing.assert_close(out.cls_feature[row], tokens[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.features[row], tokens[1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cls_final[row], pooled, rtol=1e-5, atol=1e-5)
        # The reference tells the deviations apart: merging after the whole layer, or keeping spatial order.
        assert not torch.allclose(after[row][0], tokens, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(spatial[row][0], tokens, rtol=1e-3, atol=1e-3)


def test_runner_without_merges_is_the_stock_tower():
    # keep = every patch: r = 0 everywhere, so the block forward is the layer's own.
    model, cfg = tiny_tower()
    runner = ToMeRunner(ToMeSection(keep=1.0), cfg, feature_layer=-2)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        stock = model(pixels, output_hidden_states=True)
        for layer in model.encoder.layers:
            patch_attention(layer.self_attn)
        out = runner.run(model, pixels, want_final_cls=True)
    torch.testing.assert_close(out.features, stock.hidden_states[-2][:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_final, stock.pooler_output, rtol=1e-5, atol=1e-5)
