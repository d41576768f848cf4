"""Stage 1 against references computed from the stock CLIP tower."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from ivtp.config import ConfigError, VisionStage
from ivtp.ops import gtp_scores, keep_topk_sorted, rollout_query_row
from ivtp.patch.clip import GTPAttention, MapScratch, make_vision_plan, patch_attention, prune_vision_tower


def tower(layers=7, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=56, patch_size=8)  # 7 x 7 = 49 patches
    cfg._attn_implementation = attn
    return CLIPVisionModel(cfg).eval()


def test_plan_groups_cover_the_feature_layers_and_allow_a_short_last_group():
    plan = make_vision_plan(VisionStage(group_size=3, keep=64), num_layers=24, feature_layer=-2, num_patches=576)
    assert plan.layers_used == 23
    assert plan.groups == [(0, 2), (3, 5), (6, 8), (9, 11), (12, 14), (15, 17), (18, 20), (21, 22)]
    assert plan.counts == [512, 448, 384, 320, 256, 192, 128, 64]
    one = make_vision_plan(VisionStage(group_size=100, keep=64), 24, -2, 576)
    assert one.groups == [(0, 22)] and one.counts == [64]
    with pytest.raises(ConfigError, match="3 entries given.*8 pruning steps"):
        make_vision_plan(VisionStage(keep=64, schedule=[256, 128, 64]), 24, -2, 576)
    with pytest.raises(ConfigError, match="vision.keep.*larger than the 576"):
        make_vision_plan(VisionStage(keep=600), 24, -2, 576)
    with pytest.raises(ConfigError, match="schedule"):
        make_vision_plan(VisionStage(keep=0.1, schedule=[0.5, 0.6, 0.1]), 9, -1, 576)


def test_keep_all_features_equal_stock_hidden_state_minus_two():
    model = tower()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        for layer in model.encoder.layers:
            patch_attention(layer.self_attn)
        plan = make_vision_plan(VisionStage(keep=1.0), 7, -2, 49)
        out = prune_vision_tower(model, pixels, plan, want_final_cls=True)
        pooled = model(pixels).pooler_output  # post_layernorm([CLS] of the last layer)
    torch.testing.assert_close(out.features, ref, rtol=0, atol=1e-6)
    assert out.trace.counts == [49, 49, 49]
    # The last layer, run for the [CLS] query alone, gives the stock pooled [CLS] (the aligner's input).
    torch.testing.assert_close(out.cls_final, pooled, rtol=1e-5, atol=1e-5)


def test_first_group_scores_match_eager_attentions_of_the_stock_tower():
    """The probe computes only the rows the rollout needs; its scores must equal those from the full eager
    attention maps (output_attentions) and the value vectors of the stock tower."""
    pixels = torch.randn(2, 3, 56, 56)
    eager = tower(attn="eager")
    with torch.no_grad():
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
        attn = [a.mean(1) for a in out.attentions]  # (B, 50, 50) head means
        top = eager.encoder.layers[2]
        values = top.self_attn.v_proj(top.layer_norm1(out.hidden_states[2]))  # input of layer 2, (B, 50, 32)
        ref_scores = gtp_scores(rollout_query_row(attn[:2], attn[2][:, 0], 0), values.norm(dim=-1), 0)

        sdpa = tower(attn="sdpa")  # same seed, same weights
        for layer in sdpa.encoder.layers:
            patch_attention(layer.self_attn)
        plan = make_vision_plan(VisionStage(group_size=3, keep=10), 7, -2, 49)
        out = prune_vision_tower(sdpa, pixels, plan)
        feats, trace = out.features, out.trace
    torch.testing.assert_close(trace.scores[0], ref_scores, rtol=1e-4, atol=1e-6)
    assert trace.counts == [49, 30, 10]  # 6 layers feed layer -2: groups 0-2 and 3-5
    assert feats.shape == (2, 10, 32)
    # The first pruning step keeps the top-30 by those scores; the second keeps a subset, in spatial order.
    first_keep = keep_topk_sorted(ref_scores, 30)
    assert torch.equal(trace.kept, torch.sort(trace.kept, dim=-1).values)
    assert set(trace.kept[0].tolist()) <= set(first_keep[0].tolist())


def test_pruned_features_are_the_kept_tokens_run_through_the_remaining_layers():
    """Independent re-computation: prune by the recorded indices and run stock layers on the survivors."""
    model = tower()
    pixels = torch.randn(1, 3, 56, 56)
    for layer in model.encoder.layers:
        patch_attention(layer.self_attn)
    plan = make_vision_plan(VisionStage(group_size=7, keep=12), 7, -2, 49)  # one group: prune after layer 6
    with torch.no_grad():
        out = prune_vision_tower(model, pixels, plan)
        ref = model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(out.features, ref[:, out.trace.kept[0]], rtol=0, atol=1e-6)


def test_inference_maps_in_the_shared_buffer_equal_the_autograd_path():
    """Without autograd, the rollout layers write their maps into one reused buffer; with it (training), each
    layer keeps its own softmax output. Both give the same scores, kept tokens and features."""
    model = tower()
    for layer in model.encoder.layers:
        patch_attention(layer.self_attn)
    pixels = torch.randn(2, 3, 56, 56)
    plan = make_vision_plan(VisionStage(group_size=3, keep=10), 7, -2, 49)
    with torch.no_grad():
        fast = prune_vision_tower(model, pixels, plan)
    slow = prune_vision_tower(model, pixels, plan)
    assert slow.features.requires_grad and not fast.features.requires_grad
    torch.testing.assert_close(fast.features, slow.features.detach(), rtol=0, atol=0)
    for a, b in zip(fast.trace.scores, slow.trace.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(fast.trace.kept, slow.trace.kept)


def test_map_scratch_reuses_one_buffer_for_smaller_maps():
    scratch = MapScratch()
    big = scratch.take((2, 4, 50, 50), torch.device("cpu"))
    small = scratch.take((2, 4, 30, 30), torch.device("cpu"))
    assert small.shape == (2, 4, 30, 30) and small.is_contiguous() and small.dtype == torch.float32
    assert small.data_ptr() == big.data_ptr()  # a prefix of the same storage, no new allocation
    bigger = scratch.take((2, 4, 60, 60), torch.device("cpu"))
    assert bigger.numel() == 2 * 4 * 60 * 60


@pytest.mark.parametrize("aggregation", ["mean", "max", "multiply", "single_layer"])
def test_aggregation_variants_match_the_eager_rows(aggregation):
    """Tables 4-5 variants: the group's per-layer [CLS] rows combined elementwise (or the top row alone)."""
    pixels = torch.randn(2, 3, 56, 56)
    eager = tower(attn="eager")
    with torch.no_grad():
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
        rows = [a.mean(1)[:, 0] for a in out.attentions[:3]]  # [CLS] rows of layers 0-2, (B, 50)
        top = eager.encoder.layers[2]
        vnorm = top.self_attn.v_proj(top.layer_norm1(out.hidden_states[2])).norm(dim=-1)
        combined = {"mean": torch.stack(rows).mean(0), "max": torch.stack(rows).max(0).values,
                    "multiply": torch.stack(rows).prod(0), "single_layer": rows[-1]}[aggregation]
        ref = gtp_scores(combined / combined.sum(-1, keepdim=True), vnorm, 0)
        sdpa = tower(attn="sdpa")
        for layer in sdpa.encoder.layers:
            patch_attention(layer.self_attn)
        plan = make_vision_plan(VisionStage(group_size=3, keep=10, aggregation=aggregation), 7, -2, 49)
        got = prune_vision_tower(sdpa, pixels, plan).trace.scores[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_layer_wise_prunes_at_every_layer():
    plan = make_vision_plan(VisionStage(group_size=3, keep=13, aggregation="layer_wise"), 7, -2, 49)
    assert plan.groups == [(i, i) for i in range(6)] and plan.counts == [43, 37, 31, 25, 19, 13]


def test_patch_keeps_weights_and_refuses_nothing_twice():
    model = tower()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.encoder.layers:
        patch_attention(layer.self_attn)
        patch_attention(layer.self_attn)  # idempotent
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(cls is GTPAttention for cls in type(model.encoder.layers[0].self_attn).__mro__) == 1
