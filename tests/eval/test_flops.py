"""The FLOPs calculator against IVTP's printed numbers (Tables 1, 2, 3, 9), plus its arithmetic and its input checks.

A printed number with k decimals is reproduced when our value rounds to it, so the tolerance is half a unit in its
last digit. The rows we cannot reproduce are strict xfails: each one records the gap (docs/flops.md explains it),
and the test fails if a change to the convention makes the row match after all.
"""

import math
from dataclasses import replace

import pytest

from ivtp.eval.flops import (
    Arch,
    TextEncoder,
    arch_preset,
    extra_flops_clip_text,
    extra_flops_rollout,
    llava_flops,
    llm_flops,
    llm_layer_flops,
    lm_head_flops,
    per_layer_counts,
    projector_flops,
    vit_flops,
    vit_layer_flops,
)
from ivtp.ops.select import linear_schedule

A7 = Arch.llava_1_5_7b()
A13 = Arch.llava_1_5_13b()


def matches(value: float, printed: str) -> bool:
    """True when `value` rounds to the printed decimal string (half a unit in its last digit, plus float slack)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed)) <= 0.5 * 10**-decimals + 1e-9


def topk_vit_tokens() -> list[int]:
    """Our reading of the paper's in-ViT TopK: the sequence, [CLS] included, falls linearly from 577 to 64 over
    the 23 priced layers, and every layer already runs at its reduced count."""
    return per_layer_counts(577, linear_schedule(577, 64, 23), group_size=1, layers=23, prune_before=True)


def topk(arch: Arch, text: int, visual_in_llm: int = 63) -> dict:
    # 64 ViT tokens kept, [CLS] among them, so 63 patch tokens reach the LLM (docs/flops.md, "TopK").
    return llava_flops(arch, text, topk_vit_tokens(), [visual_in_llm] * arch.llm_layers)


# ------------------------------------------------------------------------------------------ paper rows, 7B


def test_table9_unpruned_total():
    assert matches(llava_flops(A7, 512)["total"], "15.364")


@pytest.mark.xfail(strict=True, reason="split not reproduced: we give ViT 0.365 / LLM 14.998, printed 0.361 / 15.003")
@pytest.mark.parametrize("key, printed", [("vit", "0.361"), ("llm", "15.003")])
def test_table9_unpruned_split(key, printed):
    assert matches(llava_flops(A7, 512)[key], printed)


@pytest.mark.parametrize("key, printed", [("vit", "0.190"), ("llm", "7.772"), ("total", "7.962")])
def test_table9_topk(key, printed):
    assert matches(topk(A7, 512)[key], printed)


def test_table9_topk_with_64_patches_in_the_llm_misses_the_llm_column():
    # The other reading, with 64 patch tokens in the LLM, gives 7.786. The printed 7.772 is the 575-token prefill.
    r = topk(A7, 512, visual_in_llm=64)
    assert matches(r["llm"], "7.786") and not matches(r["llm"], "7.772")


@pytest.mark.parametrize("text, printed", [(128, "9.9"), (256, "11.7"), (512, "15.4"), (1024, "22.9")])
def test_table3_unpruned(text, printed):
    assert matches(llava_flops(A7, text)["total"], printed)


@pytest.mark.parametrize("text, printed", [(128, "2.7"), (256, "4.5"), (512, "8.0"), (1024, "15.2")])
@pytest.mark.parametrize("visual_in_llm", [63, 64])
def test_table3_topk(text, printed, visual_in_llm):
    # One decimal cannot tell the two TopK readings apart. Both round to the printed row.
    assert matches(topk(A7, text, visual_in_llm)["total"], printed)


def test_table1_column():
    assert matches(llava_flops(A7, 512)["total"], "15.4")
    assert matches(topk(A7, 512)["total"], "8.0")


# ------------------------------------------------------------------------------------------ paper rows, 13B


@pytest.mark.xfail(strict=True, reason="13B not reproduced: we give 29.30, Table 2 prints 29.4")
def test_table2_unpruned_13b():
    assert matches(llava_flops(A13, 512)["total"], "29.4")


@pytest.mark.xfail(strict=True, reason="13B not reproduced: we give 15.24 (15.27 with 64 patches), Table 2 prints 15.4")
@pytest.mark.parametrize("visual_in_llm", [63, 64])
def test_table2_topk_13b(visual_in_llm):
    assert matches(topk(A13, 512, visual_in_llm)["total"], "15.4")


def test_13b_gap_is_small():
    # The part of the 13B rows that does hold: the unpruned total is within 0.4% of the printed one.
    assert abs(llava_flops(A13, 512)["total"] - 29.4) / 29.4 < 0.004


# ------------------------------------------------------------------------------------------ arithmetic


def test_layer_costs_by_hand():
    # CLIP-L layer at 577 tokens: (4*1024^2 + 2*1024*4096) MACs per token, plus 2 * 577^2 * 1024 for QK^T and AV.
    assert vit_layer_flops(A7, 577) == 2 * (577 * 12_582_912 + 2 * 577 * 577 * 1024)
    # Vicuna-7B layer at 1088 tokens: (4*4096^2 + 3*4096*11008) MACs per token, plus 2 * 1088^2 * 4096.
    assert llm_layer_flops(A7, 1088) == 2 * (1088 * 202_375_168 + 2 * 1088 * 1088 * 4096)
    assert lm_head_flops(A7, 1088) == 2 * 1088 * 4096 * 32064
    assert projector_flops(A7, 576) == 2 * 576 * (1024 * 4096 + 4096 * 4096)


def test_grouped_query_attention_shrinks_only_k_and_v():
    gqa = replace(A7, llm_kv_heads=8)
    saved_macs_per_token = 2 * 4096 * (4096 - 1024)  # k and v project to 1024 instead of 4096
    assert llm_layer_flops(A7, 10) - llm_layer_flops(gqa, 10) == 2 * 10 * saved_macs_per_token


def test_falling_schedule_is_the_exact_sum_of_layer_costs():
    vit = [577 - 20 * i for i in range(23)]
    assert vit_flops(A7, vit) == sum(vit_layer_flops(A7, n) for n in vit)
    visual = per_layer_counts(576, [400, 300, 200, 64], group_size=3, layers=32)
    llm = [v + 100 for v in visual]
    r = llava_flops(A7, 100, vit, visual)
    expected_llm = sum(llm_layer_flops(A7, n) for n in llm) + lm_head_flops(A7, llm[-1])
    assert llm_flops(A7, llm) == expected_llm
    assert r["llm"] == expected_llm / 1e12 and r["vit"] == vit_flops(A7, vit) / 1e12
    assert r["vit_tokens"] == vit and r["llm_tokens"] == llm
    assert r["llm_equivalent_visual_tokens"] == sum(visual) / 32
    assert r["total"] == r["vit"] + r["llm"] + r["extra"]


def test_defaults_are_unpruned():
    r = llava_flops(A7, 512)
    assert r["vit_tokens"] == [577] * 23
    assert r["llm_tokens"] == [1088] * 32
    assert r["llm_equivalent_visual_tokens"] == 576
    assert r["extra"] == 0.0


def test_extra_is_reported_and_added():
    r = llava_flops(A7, 512, extra=0.08)
    assert r["extra"] == 0.08 and math.isclose(r["total"], llava_flops(A7, 512)["total"] + 0.08)


def test_per_layer_counts():
    # The package's GTP: pruning at each group's top layer, 23 layers in groups of 3 (the last group is 2 long).
    keeps = linear_schedule(576, 128, 8)
    counts = per_layer_counts(576, keeps, group_size=3, layers=23)
    assert counts[:3] == [576] * 3 and counts[3:6] == [keeps[0]] * 3 and counts[-2:] == [keeps[-2]] * 2
    # The LLM stage: four groups in the first 12 layers, then the final budget to the last layer.
    assert per_layer_counts(128, [112, 96, 80, 64], 3, 32) == [128] * 3 + [112] * 3 + [96] * 3 + [80] * 3 + [64] * 20
    assert per_layer_counts(128, [112, 96, 80, 64], 3, 32, prune_before=True)[:12] == sum(
        ([k] * 3 for k in (112, 96, 80, 64)), []
    )


def test_feature_layer_sets_the_priced_depth():
    assert A7.vit_layers_priced == 23
    full = replace(A7, vision_feature_layer=-1)
    assert full.vit_layers_priced == 24
    assert math.isclose(
        llava_flops(full, 512)["vit"] - llava_flops(A7, 512)["vit"], vit_layer_flops(A7, 577) / 1e12
    )


def test_from_llava_config_matches_presets():
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14,
    )
    for arch, (d, f, n_layers, heads) in [(A7, (4096, 11008, 32, 32)), (A13, (5120, 13824, 40, 40))]:
        text = transformers.LlamaConfig(
            hidden_size=d, intermediate_size=f, num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=heads, vocab_size=32064,
        )
        config = transformers.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)
        assert Arch.from_llava_config(config, name=arch.name) == arch
    multi = transformers.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=[-2, -5])
    assert Arch.from_llava_config(multi).vit_layers_priced == 23


def test_presets_by_name():
    assert arch_preset("llava-1.5-7b") == A7 and arch_preset("llava-1.5-13b") == A13
    with pytest.raises(ValueError, match="unknown architecture"):
        arch_preset("llava-2")


# ------------------------------------------------------------------------------------------ the extra column


def test_clip_text_tower_one_window_by_hand():
    te = TextEncoder.clip_vit_l14()
    tower = 12 * (77 * (4 * 768**2 + 2 * 768 * 3072) + 2 * 77 * 77 * 768)
    one_window = 2 * (tower + 77 * 768 * 768)
    assert extra_flops_clip_text(te, 30) == one_window
    assert extra_flops_clip_text(te, 512) == one_window  # truncated, as ivtp/aligner.py does
    assert extra_flops_clip_text(te, 512, truncate=False) == 7 * one_window  # ceil(512 / 75) windows
    assert extra_flops_clip_text(te, 0) == 0


def test_six_clip_windows_land_on_the_printed_extra():
    # An observation, not a derivation (docs/flops.md): IVTP's 0.080 equals six full 77-token windows of the
    # CLIP-L text tower, which is up to 450 CLIP tokens. Why six windows is not known.
    te = TextEncoder.clip_vit_l14()
    assert matches(extra_flops_clip_text(te, 450, truncate=False) / 1e12, "0.080")
    assert not matches(extra_flops_clip_text(te, 512, truncate=False) / 1e12, "0.080")


def test_rollout_cost_by_hand():
    # One group of 3 layers: two lower layers need full n x n scores, and the top layer only the query row.
    n, d = 10, 8
    assert extra_flops_rollout(d, [n, n, n], 3) == 2 * (2 * (n * n * d + n * n) + 2 * n * d)
    # A shorter last group still ends on a top layer.
    assert extra_flops_rollout(d, [n] * 4, 3) == 2 * (2 * (n * n * d + n * n) + 2 * n * d + 2 * n * d)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: vit_flops(A7, [577] * 24), r"vit_tokens_per_layer has 24 entries, expected 23"),
        (lambda: vit_flops(A7, [577] * 22 + [-1]), r"vit_tokens_per_layer\[22\] is -1: a token count cannot be"),
        (lambda: llm_flops(A7, [1088] * 31), r"llm_tokens_per_layer has 31 entries, expected 32"),
        (lambda: llava_flops(A7, 512, llm_visual_per_layer=[576] * 40), r"llm_visual_per_layer has 40 entries"),
        (lambda: llava_flops(A7, 512, llm_visual_per_layer=[-5] * 32), r"cannot be negative"),
        (lambda: llava_flops(A7, -1), r"text_tokens must be >= 0"),
        (lambda: llava_flops(A7, 512, extra=-0.1), r"extra must be a finite, non-negative"),
        (lambda: llava_flops(A7, 512, vit_tokens_per_layer=[577.0] * 23), r"must be an int token count"),
        (lambda: llava_flops(A7, 512, vit_tokens_per_layer=577), r"must be a list of token counts"),
        (lambda: per_layer_counts(64, [128], 3, 23), r"cannot add tokens"),
        (lambda: per_layer_counts(576, [1] * 9, 3, 23), r"keeps has 9 entries"),
        (lambda: projector_flops(A7, -1), r"n_visual must be >= 0"),
        (lambda: replace(A7, vision_feature_layer=-25), r"vision_feature_layer -25"),
        (lambda: replace(A7, llm_heads=0), r"Arch.llm_heads must be a positive int"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------ LLaVA-NeXT


def _vit_layer_7b(n):  # CLIP-L at n tokens, by hand: 12,582,912 MACs per token and 2 n^2 1024 for QK^T and AV
    return 2 * (n * 12_582_912 + 2 * n * n * 1024)


def _llm_layer_7b(n):  # Vicuna-7B at n tokens: 202,375,168 MACs per token and 2 n^2 4096
    return 2 * (n * 202_375_168 + 2 * n * n * 4096)


@pytest.mark.parametrize("method, expected_visual", [(None, 2040), ("topk", 4 * 64)])
def test_llava_next_prices_each_crop_and_the_anyres_token_count_counted_by_hand(method, expected_visual):
    # A 400 x 1000 image on LLaVA-1.6: of the grids (h, w) 336x672, 672x336, 672x672, 1008x336, 336x1008, the
    # 336 x 1008 one keeps the most of it (scale 0.84: 840 x 336 px), so 1 x 3 tiles and the base view: 4 crops.
    # Stock tokens: the base view's 576, then the 24 x 72 tile map cut to the image's aspect (24 / 400 = 0.06,
    # 1000 x 0.06 = 60 columns: 6 of padding cut on each side) with a newline per row: 24 x 61. 576 + 1464 = 2040.
    # Top-k at 64 per crop hands on 64 x 4 = 256 (no cut, no newlines).
    from ivtp.config import PruneConfig
    from ivtp.eval.bench import method_flops
    from ivtp.models import preset_config

    text = 100
    config = preset_config("llava-1.6-7b")
    got = method_flops(config, method and PruneConfig.for_method(method, 64), text, image_size=(400, 1000))
    assert got["crops"] == 4 and got["final_visual_tokens"] == expected_visual
    vit = 4 * 23 * _vit_layer_7b(577)  # every crop runs the 23 priced CLIP layers unpruned (top-k prunes after)
    n = expected_visual + text
    llm = 32 * _llm_layer_7b(n) + 2 * n * 4096 * 32064
    assert got["vit"] == pytest.approx(vit / 1e12, rel=1e-12)
    assert got["llm"] == pytest.approx(llm / 1e12, rel=1e-12)
    assert got["total"] == pytest.approx((vit + llm) / 1e12, rel=1e-12)


def test_llava_next_default_image_is_a_square_of_five_crops():
    from ivtp.eval.bench import method_flops
    from ivtp.models import preset_config

    got = method_flops(preset_config("llava-1.6-7b"), None, 0)
    assert got["crops"] == 5 and got["final_visual_tokens"] == 576 + 48 * 49  # 2 x 2 tiles: 48 rows of 48 + 1
