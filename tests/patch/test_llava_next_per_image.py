"""LLaVA-NeXT with budgets per image (`anyres.budget: per_image`): stage 1's count is the whole image's, split over its
crops; a stage in the LLM keeps its count per image. Tiny random LLaVA-1.6 at 112 px (8 x 8 patches per crop);
the images below have 3 and 4 crops, and the model's grids allow 3, 4 and 5."""

import pytest
import torch

from conftest import assert_cache_matches_recompute
from ivtp import anyres
from ivtp.config import ConfigError
from ivtp.models import preset_config, tiny_random_next
from test_llava_next import QUESTIONS, next_batch, next_images, pruned

PER_IMAGE = {"anyres": {"budget": "per_image"}}
AT_40 = {  # 40 tokens per image: 14/13/13 of a 3-crop image, 10 x 4 of a 4-crop one, 8 x 5 of a 5-crop one
    "topk": {"topk": {"keep": 40}},
    "evit": {"evit": {"keep": 40}},
    "tome": {"tome": {"keep": 40}},
    "fastervlm": {"fastervlm": {"keep": 40}},
    "vispruner": {"vispruner": {"visual_token_num": 40}, "anyres": {"layout": "survivors"}},
    "ivtp": {"vision": {"keep": 64}, "llm": {"keep": 40, "layers": 6}},
    "topk+": {"topk": {"keep": 64}, "llm": {"keep": 40, "layers": 6}},
}


def per_image(method: str, section: dict) -> dict:
    return {"method": method, **section, "anyres": {**PER_IMAGE["anyres"], **section.get("anyres", {})}}


def test_split_budget_and_the_models_crop_counts_by_hand():
    assert anyres.split_budget(160, 3) == [54, 53, 53] and anyres.split_budget(320, 5) == [64] * 5
    assert anyres.split_budget(41, 4) == [11, 10, 10, 10]
    config = preset_config("llava-1.6-7b")
    assert anyres.crop_count_range(config) == [3, 4, 5]
    assert anyres.most_stock_tokens(config) == 576 + 48 * 49  # a 2 x 2 grid, nothing cut: 2,928


@pytest.mark.parametrize("method", sorted(AT_40))
def test_every_image_hands_the_llm_its_count_whatever_its_crops(method):
    model, processor = pruned(per_image(method, AT_40[method]))
    batch = next_batch(processor, next_images()[:2], QUESTIONS[:2])
    with torch.no_grad():
        model(**batch)
    state = model.ivtp_state
    crops = anyres.crop_counts(batch["image_sizes"], model.config)
    assert sorted(crops) == [3, 4]
    places = state.last_vision.trace.places(state.last_vision.features.shape[1]).split(crops)
    entering = 64 if state.llm_plan is not None else 40
    for p, n in zip(places, crops):  # each crop keeps its share, the rest of its row is padding
        assert (p != anyres.ABSENT).sum(1).tolist() == anyres.split_budget(entering, n)
    assert [len(p) for p in state.last_image_places] == [entering, entering]
    if state.llm_plan is not None:
        assert [c[-1] for c in state.last_llm_trace.counts] == [40, 40]


def test_each_crop_keeps_what_the_method_keeps_at_its_share_alone():
    """topk at 40 per image on a 3-crop image: the base view's features are those of topk at 14 per crop, the
    tiles' those of topk at 13 per crop (both in the layout the per-crop model hands on)."""
    image = next_images()[:1]
    model, processor = pruned(per_image("topk", AT_40["topk"]))
    batch = next_batch(processor, image, QUESTIONS[:1])
    assert anyres.crop_counts(batch["image_sizes"], model.config) == [3]
    with torch.no_grad():
        ours = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0]
    ours_places = model.ivtp_state.last_image_places[0]
    for count, crops in [(14, [0]), (13, [1, 2])]:
        alone, _ = pruned({"method": "topk", "topk": {"keep": count}})
        with torch.no_grad():
            ref = alone.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0]
        ref_places = alone.ivtp_state.last_image_places[0]
        for crop in crops:
            mine = (ours_places // 64) == crop
            theirs = (ref_places // 64) == crop
            assert torch.equal(ours_places[mine], ref_places[theirs])
            torch.testing.assert_close(ours[mine], ref[theirs], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["ivtp", "topk", "vispruner"])
def test_a_batch_of_mixed_crop_counts_equals_its_rows_alone_and_decodes_as_recomputed(method):
    section = AT_40[method] if method != "vispruner" else {"vispruner": {"visual_token_num": 40}}  # its own layout
    model, processor = pruned(per_image(method, section))
    images = next_images()[:2] + [None]
    batch = next_batch(processor, images, QUESTIONS, "left")
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            single = model(**next_batch(processor, [image], [question], "left")).logits[0]
            torch.testing.assert_close(logits[row, -1], single[-1], rtol=1e-4, atol=1e-4)
    assert_cache_matches_recompute(model, next_batch(processor, images, QUESTIONS), new_tokens=3)


@pytest.mark.parametrize("method, section, final", [
    ("fastv", {"fastv": {"keep": 40}}, 40),
    ("ivtp", {"vision": {"enabled": False}, "llm": {"keep": 40, "layers": 6}}, 40),
])
def test_in_llm_only_methods_keep_their_count_of_each_images_stock_tokens(method, section, final):
    """Over the stock layout (padding cut, newlines), per image: 40 of each image's stock tokens, not 40 per 64;
    a batch equals its rows alone, and decoding equals recomputation."""
    model, processor = pruned(per_image(method, section))
    images = next_images()[:2] + [None]
    batch = next_batch(processor, images, QUESTIONS, "left")
    with torch.no_grad():
        logits = model(**batch).logits
        counts = model.ivtp_state.last_llm_trace.counts
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            single = model(**next_batch(processor, [image], [question], "left")).logits[0]
            torch.testing.assert_close(logits[row, -1], single[-1], rtol=1e-4, atol=1e-4)
    stock = [anyres.stock_tokens(size, model.config) for size in batch["image_sizes"]]
    assert len(set(stock)) == 2 and [c[0] for c in counts[:2]] == stock and [c[-1] for c in counts[:2]] == [final] * 2
    assert_cache_matches_recompute(model, next_batch(processor, images[:2], QUESTIONS[:2]), new_tokens=3)


def test_two_images_in_one_row_keep_the_count_twice():
    model, processor = pruned(per_image("fastv", {"fastv": {"keep": 40}}))
    processor.tokenizer.padding_side = "left"
    from conftest import prompt

    text = prompt("And these?").replace("<image>", "<image>\n<image>", 1)
    batch = processor(images=next_images()[:2], text=[text], return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    visual = batch["input_ids"] == model.config.image_token_id
    images, units = model.ivtp_state.units_per_row(visual)
    assert images.tolist() == [2] and units.tolist() == [2.0]
    assert model.ivtp_state.last_llm_trace.counts[0][-1] == 80


def test_the_report_counts_each_images_tokens_over_all_its_crops():
    model, processor = pruned(per_image("ivtp", AT_40["ivtp"]))
    batch = next_batch(processor, next_images()[:1], QUESTIONS[:1])
    with torch.no_grad():
        model(**batch)
    report = model.ivtp_state.row_report(0, 0, 1)
    assert report["visual_tokens"][0] == 3 * 64 and report["visual_tokens"][-1] == 40
    assert len(report["stage1_patches"][0]) == 64 and len(report["kept_patches"][0]) == 40


@pytest.mark.parametrize("config, fragment", [
    ({"method": "visiondrop"}, "visiondrop's budgets are dominant + contextual"),
    ({"method": "topk", "topk": {"keep": 0.25}}, "topk.keep 0.25 is a share"),
    ({"method": "fastv"}, "fastv.ratio is a share"),
    ({"method": "ivtp", "vision": {"enabled": False}, "llm": {"keep": 0.5}}, "llm.keep is a share"),
    ({"method": "topk", "topk": {"keep": 4}}, "must lie between 5"),
    ({"method": "topk", "topk": {"keep": 193}}, "and 192 (every patch of a 3-crop image)"),
    ({"method": "spatial", "spatial": {"keep": 40}}, "gives some crop 13 tokens: spatial.keep"),
    ({"method": "ivtp", "vision": {"keep": 40, "schedule": [56, 40]}}, "vision.schedule must be 'linear'"),
])
def test_budgets_per_image_that_cannot_hold_are_refused_before_anything_changes(config, fragment):
    model, processor = tiny_random_next(image_size=112)
    from ivtp import apply_pruning

    with pytest.raises(ConfigError, match="anyres.budget per_image") as e:
        apply_pruning(model, {**config, **PER_IMAGE}, tokenizer=processor.tokenizer)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not hasattr(model, "ivtp_state")


def test_the_setting_round_trips_and_is_ignored_on_llava_15():
    from ivtp import PruneConfig, apply_pruning
    from ivtp.models import tiny_random

    cfg = PruneConfig.from_dict(per_image("topk", AT_40["topk"]))
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["anyres"]["budget"] == "per_image"
    with pytest.raises(ConfigError, match="anyres.budget"):
        PruneConfig.from_dict({"method": "topk", "anyres": {"budget": "per_tile"}})
    model, _ = tiny_random()
    apply_pruning(model, {"method": "topk", "topk": {"keep": 16}, **PER_IMAGE})  # one crop: per crop is per image
    assert model.ivtp_state.tokens_per_image == 16
