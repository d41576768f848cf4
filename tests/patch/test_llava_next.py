"""apply_pruning on transformers' LlavaNextForConditionalGeneration (tiny random LLaVA-1.6 at 112 px: 8 x 8 patches
per crop, LLaVA-1.6's grids): the stock model for keep-all, each image's crops pruned on their own, the KV cache
against recomputation, a batch against its rows alone."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_cache_matches_recompute, prompt
from ivtp import apply_pruning
from ivtp import anyres
from ivtp.models import tiny_aligner, tiny_random_next
from ivtp.ops.sequence import PlaceholderError

N = 64  # patches per crop
SIZES = [(150, 100), (90, 260), (112, 112)]  # (width, height): 1 x 2, 3 x 1 and 1 x 2 tile grids


def next_images(sizes=SIZES, seed: int = 0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes]


def next_batch(processor, images, questions, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(q, image=img is not None) for q, img in zip(questions, images)]
    present = [img for img in images if img is not None]
    return processor(images=present or None, text=texts, padding=True, return_tensors="pt")


def pruned(config, seed: int = 0):
    model, processor = tiny_random_next(seed, image_size=112)
    apply_pruning(model, config, aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    return model, processor


QUESTIONS = ["What colour is it?", "Where is the square?", "Hi"]
KEEP_ALL = {  # the methods that prune only before the LLM, at keep-all
    "random": {"random": {"keep": 1.0}}, "topk": {"topk": {"keep": 1.0}}, "spatial": {"spatial": {"keep": N}},
    "tome": {"tome": {"keep": 1.0}}, "fastervlm": {"fastervlm": {"keep": 1.0}},
    "vispruner": {"vispruner": {"visual_token_num": 1.0}},
}
AT_16 = {  # 16 tokens per crop, before the LLM or after it
    "ivtp": {"vision": {"keep": 32}, "llm": {"keep": 16, "layers": 6}},
    "random": {"random": {"keep": 16}}, "topk": {"topk": {"keep": 16}}, "spatial": {"spatial": {"keep": 16}},
    "evit": {"evit": {"keep": 16}}, "tome": {"tome": {"keep": 16}}, "fastervlm": {"fastervlm": {"keep": 16}},
    "vispruner": {"vispruner": {"visual_token_num": 16}},
    "visiondrop": {"visiondrop": {"dominant": 24, "contextual": 8, "llm": [[2, 16, 4], [4, 12, 4]]}},
    "topk+": {"topk": {"keep": 32}, "llm": {"keep": 16, "layers": 6}},
    "tome+": {"tome": {"keep": 32}, "llm": {"keep": 16, "layers": 6}},
}
IN_LLM_ONLY = {  # they prune only inside the LLM: over NeXT's stock layout, at 16 per crop of 64
    "fastv": {"fastv": {"keep": 16}},
    "sparsevlm": {"sparsevlm": {"budget": 64}},  # its fixed schedule: 66, 30, 17 of 64 (v1.5 budget 64 of 576)
    "ivtp": {"vision": {"enabled": False}, "llm": {"keep": 16, "layers": 6}},
}


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_all_equals_the_stock_model(method):
    stock, processor = tiny_random_next(image_size=112)
    model, _ = pruned({"method": method, **KEEP_ALL[method]})
    batch = next_batch(processor, next_images()[:2] + [None], QUESTIONS)
    with torch.no_grad():
        ref, out = stock(**batch).logits, model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-5)


def test_each_crop_keeps_its_own_top_patches_in_the_stock_order():
    """topk at 16 per crop: every crop's 16 patches of highest [CLS] attention (the method's own test checks the
    selection), handed on as the stock model's features of those patches, base view first, then the tiles' in
    the order of the stock feature map."""
    stock, processor = tiny_random_next(image_size=112)
    model, _ = pruned({"method": "topk", "topk": {"keep": 16}})
    batch = next_batch(processor, next_images()[:2], QUESTIONS[:2])
    with torch.no_grad():
        ours = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        crops = anyres.crop_counts(batch["image_sizes"], stock.config)
        pixels = anyres.flatten_crops(batch["pixel_values"], crops)
        hidden = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (crops, N, Dv)
        projected = stock.model.multi_modal_projector(hidden).split(crops)  # per image (crops, N, D)
    kept = model.ivtp_state.last_vision.trace.kept.split(crops)  # per image (crops, 16)
    side = anyres.side(stock.config)
    for image, (feats, k, size) in enumerate(zip(projected, kept, batch["image_sizes"])):
        assert k.shape == (crops[image], 16) and torch.equal(k, k.sort(-1).values)
        rows, cols = anyres.tile_grid(size, stock.config)
        # the reference order, patch by patch: base view in its order, then the map's rows top to bottom
        expected = [feats[0, p] for p in k[0].tolist()]
        cells = []
        for t in range(1, crops[image]):
            for p in k[t].tolist():
                row, col = (t - 1) // cols * side + p // side, (t - 1) % cols * side + p % side
                cells.append((row, col, feats[t, p]))
        expected += [f for _, _, f in sorted(cells, key=lambda c: (c[0], c[1]))]
        torch.testing.assert_close(ours[image], torch.stack(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", sorted(AT_16))
def test_every_method_hands_the_llm_its_budget_per_crop(method):
    model, processor = pruned({"method": method, **AT_16[method]})
    batch = next_batch(processor, next_images()[:2], QUESTIONS[:2])
    with torch.no_grad():
        out = model(**batch)
    state = model.ivtp_state
    crops = anyres.crop_counts(batch["image_sizes"], model.config)
    entering = state.tokens_per_image
    if state.llm_plan is None:
        assert entering == 16
        # each row: its real tokens, less the stock layout's placeholders, plus what its image hands on: 16 per crop
        # (VisPruner's own layout: its kept patches left after the padding cut, and a newline per row)
        handed_on = [16 * n for n in crops]
        if state.layout.variable:
            handed_on = [len(p) for p in state.last_image_places]
            assert all(h <= 16 * n + 4 * 8 for h, n in zip(handed_on, crops))  # at most 4 x 8 rows of newlines
        rows = [int(real) - anyres.stock_tokens(size, model.config) + h
                for real, size, h in zip(batch["attention_mask"].sum(1), batch["image_sizes"], handed_on)]
        assert out.logits.shape[1] == max(rows)
    else:
        final = state.llm_tokens_per_layer(32)[-1]
        assert final == 16
        counts = state.last_llm_trace.counts
        for row, n in enumerate(crops):
            assert counts[row][0] == entering * n and counts[row][-1] == final * n
    assert state.last_vision.features.shape[:2] == (sum(crops), entering)


@pytest.mark.parametrize("method", ["ivtp", "topk", "visiondrop"])
def test_decoding_with_the_cache_equals_recomputation(method):
    model, processor = pruned({"method": method, **AT_16[method]})
    batch = next_batch(processor, next_images()[:2] + [None], QUESTIONS)
    assert_cache_matches_recompute(model, batch, new_tokens=4)


@pytest.mark.parametrize("method", ["ivtp", "topk"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_batch_of_mixed_crop_counts_equals_its_rows_alone(method, padding_side):
    """Images of 3 and 4 crops and a text-only row, batched, give each row's logits alone."""
    model, processor = pruned({"method": method, **AT_16[method]})
    images = next_images()[:2] + [None]
    batch = next_batch(processor, images, QUESTIONS, padding_side)
    assert sorted(anyres.crop_counts(batch["image_sizes"], model.config)) == [3, 4]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            single = model(**next_batch(processor, [image], [question], padding_side)).logits[0]  # (L_row, V)
            # the row's last token: the batch's last position (left padding) or the row's own length (right)
            last = logits[row, -1] if padding_side == "left" else logits[row, single.shape[0] - 1]
            torch.testing.assert_close(last, single[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", sorted(IN_LLM_ONLY))
def test_in_llm_only_methods_keep_their_budgets_share_of_the_stock_layout(method):
    """FastV, SparseVLM and IVTP without stage 1 prune over NeXT's stock layout (padding cut, newlines): a budget
    of 16 per crop of 64 keeps a quarter of each image's stock tokens, rounded."""
    model, processor = pruned({"method": method, **IN_LLM_ONLY[method]})
    batch = next_batch(processor, next_images()[:2], QUESTIONS[:2])
    with torch.no_grad():
        model(**batch)
    state = model.ivtp_state
    assert state.layout.stock and state.tokens_per_image == N
    stock = [anyres.stock_tokens(size, model.config) for size in batch["image_sizes"]]
    for row, n in enumerate(stock):
        counts = state.last_llm_trace.counts[row]
        assert counts[0] == n
        if method != "sparsevlm":
            assert counts[-1] == round(state.llm_plan.counts[-1] * n / N)
        else:  # each stage keeps its schedule's share (66 of 64 keeps all), plus the tokens it recycles
            shares = [min(n, round(k * n / N)) for k in state.llm_plan.step.keeps]
            assert shares[0] == counts[1] == n and counts[-1] < counts[2] < n
            assert all(share <= count for share, count in zip(shares, counts[1:]))


@pytest.mark.parametrize("method", sorted(IN_LLM_ONLY))
def test_in_llm_only_methods_batch_as_their_rows_alone_and_decode_as_recomputed(method):
    model, processor = pruned({"method": method, **IN_LLM_ONLY[method]})
    images = next_images()[:2] + [None]
    batch = next_batch(processor, images, QUESTIONS, "left")
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            single = model(**next_batch(processor, [image], [question], "left")).logits[0]
            torch.testing.assert_close(logits[row, -1], single[-1], rtol=1e-4, atol=1e-4)
    assert_cache_matches_recompute(model, next_batch(processor, images[:2], QUESTIONS[:2]), new_tokens=3)


def test_two_images_in_one_row_count_their_own_crops():
    """A row holding a 3-crop and a 4-crop image: FastV's budget is the share of both images' stock tokens, and the
    row counts 7 crops (what IVTP's fallback, the visual [CLS], averages over)."""
    model, processor = pruned({"method": "fastv", **IN_LLM_ONLY["fastv"]})
    images = next_images()[:2]
    processor.tokenizer.padding_side = "left"
    text = prompt("And these?").replace("<image>", "<image>\n<image>", 1)  # two images, then the question
    batch = processor(images=images, text=[text], return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    stock = sum(anyres.stock_tokens(size, model.config) for size in batch["image_sizes"])
    visual = batch["input_ids"] == model.config.image_token_id
    crops, units = model.ivtp_state.units_per_row(visual)
    assert crops.tolist() == [7] and units.tolist() == [stock / N]
    assert model.ivtp_state.last_llm_trace.counts[0] == [stock, round(16 * stock / N)]


def test_missing_image_sizes_is_a_one_line_error():
    model, processor = pruned({"method": "topk", "topk": {"keep": 16}})
    batch = next_batch(processor, next_images()[:1], QUESTIONS[:1])
    del batch["image_sizes"]
    with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
        model(**batch)


def test_placeholders_of_the_wrong_image_are_refused():
    model, processor = pruned({"method": "topk", "topk": {"keep": 16}})
    batch = next_batch(processor, next_images()[:1], QUESTIONS[:1])
    batch["image_sizes"] = torch.tensor([[260, 90]])  # another grid: the prompt's run is not that image's
    with pytest.raises(PlaceholderError):
        model(**batch)


def test_a_pruned_next_checkpoint_loads_back_as_it_ran(tmp_path):
    from ivtp import load_pruned
    from ivtp.models import load_model

    model, processor = pruned({"method": "ivtp", **AT_16["ivtp"]})
    batch = next_batch(processor, next_images()[:2], QUESTIONS[:2])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_pruned(str(tmp_path), aligner=model.ivtp_state.aligner)
    assert type(loaded).__mro__[1].__name__ == "PrunedLlavaForConditionalGeneration"
    assert isinstance(loaded.ivtp_state.layout, anyres.AnyResLayout)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
    stock, _ = load_model(str(tmp_path))  # unpruned, as LLaVA-NeXT, with its processor
    assert type(stock).__name__ == "LlavaNextForConditionalGeneration"
    stock.save_pretrained(tmp_path / "stock")  # the pruned checkpoint holds llava-hf's keys, as the stock one does
    keys = lambda folder: set(load_file(str(folder / "model.safetensors")))  # noqa: E731
    assert keys(tmp_path) == keys(tmp_path / "stock")


# ---- reports and overlays: where each image's tokens came from ------------------------------------------------------
def _generate(model, processor, images, questions):
    from ivtp.inference import Sample, generate

    return generate(model, processor, [Sample(q, img) for q, img in zip(questions, images)], max_new_tokens=2,
                    batch_size=len(images))


def test_a_stage1_report_names_each_crops_kept_patches_crop_major():
    model, processor = pruned({"method": "topk", "topk": {"keep": 16}})
    image = next_images()[1]  # 3 x 1 tiles: 4 crops
    (result,) = _generate(model, processor, [image], QUESTIONS[:1])
    trace = model.ivtp_state.last_vision.trace  # (crops, 16) each crop's kept patches
    expected = sorted(c * N + p for c, crop in enumerate(trace.kept.tolist()) for p in crop)
    assert result.image_size == (image.height, image.width) and result.pixel_values.shape[0] == 4
    assert result.stage1_patches == result.kept_patches == expected and len(expected) == 4 * 16
    assert result.visual_tokens == [4 * N, 4 * 16]


def test_an_ivtp_report_is_the_same_batched_or_alone():
    model, processor = pruned({"method": "ivtp", **AT_16["ivtp"]})
    images = next_images()[:2] + [None]
    batched = _generate(model, processor, images, QUESTIONS)
    for image, question, got in zip(images, QUESTIONS, batched):
        (alone,) = _generate(model, processor, [image], [question])
        assert (got.kept_patches, got.stage1_patches, got.visual_tokens) == \
            (alone.kept_patches, alone.stage1_patches, alone.visual_tokens)
    for got in batched[:2]:
        crops = anyres.crop_count(got.image_size, model.config)
        assert len(got.stage1_patches) == 32 * crops and len(got.kept_patches) == 16 * crops
        assert set(got.kept_patches) <= set(got.stage1_patches)
        assert got.visual_tokens[-1] == 16 * crops


def test_an_unpruned_report_keeps_the_patches_the_stock_layout_reads():
    from ivtp.models import tiny_random_next

    model, processor = tiny_random_next(image_size=112)
    image = next_images()[0]
    (result,) = _generate(model, processor, [image], QUESTIONS[:1])
    places = anyres.stock_places(result.image_size, model.config)
    assert result.visual_tokens == [anyres.stock_tokens(result.image_size, model.config)]
    assert result.kept_patches == sorted(places[places >= 0].tolist())


def test_anyres_views_assemble_the_tiles_and_place_their_patches():
    from ivtp.viz import anyres_views

    model, _ = tiny_random_next(image_size=112)  # 8 x 8 patches per crop
    pixels = torch.randn(5, 3, 112, 112)  # a 2 x 2 grid: the base view and four tiles
    kept = [3, N + 0, 2 * N + 9, 3 * N + 63, 4 * N + 8]  # base 3; tile 0 patch 0; tile 1 (row 0, col 1) patch 9 ...
    (base_img, base, base_grid), (whole, tiles, grid) = anyres_views(pixels, kept, (224, 224), model.config)
    assert base == [3] and base_grid == (8, 8) and grid == (16, 16) and whole.size == (224, 224)
    # tile 1's patch 9 is row 1, col 1 of the tile: map row 1, col 8 + 1; tile 2's 63 (row 7, col 7): map row 15,
    # col 7; tile 3's 8 (row 1, col 0): map row 9, col 8.
    assert tiles == [0, 1 * 16 + 9, 15 * 16 + 7, 9 * 16 + 8]
    from ivtp.viz import denormalize

    assert np.array_equal(np.asarray(whole)[:112, 112:], np.asarray(denormalize(pixels[2])))  # tile 1: top right
    assert np.array_equal(np.asarray(whole)[112:, :112], np.asarray(denormalize(pixels[3])))  # tile 2: bottom left


# ---- VisPruner's own NeXT layout (anyres.layout: stock, its default): the kept patches in the stock layout -------
def _vispruner_merge(crops_features, masks, image_size, grid, newline):
    """A re-derivation of VisPruner's NeXT merge (llava_arch.prepare_inputs_labels_for_multimodal, spatial_unpad),
    on one image: crops_features (crops, N, D) and masks (crops, N) bool of the kept patches. The tiles' features
    and masks are laid out as the (rows n, cols n) map, both cut to the image by transformers' unpad_image, a
    newline column with mask True appended to both, and the map's entries where the mask holds are taken in raster
    order; the base view's kept features come first, in patch order."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rows, cols = grid
    n = int(crops_features.shape[1] ** 0.5)
    d = crops_features.shape[-1]
    tiles = crops_features[1:].view(rows, cols, n, n, d).permute(4, 0, 2, 1, 3).reshape(d, rows * n, cols * n)
    tile_mask = masks[1:].view(rows, cols, n, n).permute(0, 2, 1, 3).reshape(1, rows * n, cols * n)
    tiles, tile_mask = unpad_image(tiles, image_size), unpad_image(tile_mask, image_size)
    tiles = torch.cat([tiles, newline[:, None, None].expand(d, tiles.shape[1], 1)], dim=-1)
    tile_mask = torch.cat([tile_mask, torch.ones(1, tile_mask.shape[1], 1, dtype=torch.bool)], dim=-1)
    kept_tiles = tiles.flatten(1, 2).T[tile_mask.flatten()]
    return torch.cat([crops_features[0][masks[0]], kept_tiles])


def test_vispruner_on_next_hands_on_its_kept_patches_as_its_authors_code_lays_them_out():
    stock, processor = tiny_random_next(image_size=112)
    model, _ = pruned({"method": "vispruner", "vispruner": {"visual_token_num": 16}})
    assert model.ivtp_state.layout.variable  # auto: VisPruner's own layout
    batch = next_batch(processor, next_images()[:2], QUESTIONS[:2])
    with torch.no_grad():
        ours = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        crops = anyres.crop_counts(batch["image_sizes"], stock.config)
        pixels = anyres.flatten_crops(batch["pixel_values"], crops)
        hidden = stock.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = stock.model.multi_modal_projector(hidden).split(crops)  # per image (crops, N, D)
    kept = model.ivtp_state.last_vision.trace.kept.split(crops)  # per image (crops, 16)
    for image, (feats, k, size) in enumerate(zip(projected, kept, batch["image_sizes"])):
        masks = torch.zeros(crops[image], N, dtype=torch.bool).scatter_(1, k, True)
        grid = anyres.tile_grid(size, stock.config)
        expected = _vispruner_merge(feats, masks, size.tolist(), grid, stock.model.image_newline)
        torch.testing.assert_close(ours[image], expected, rtol=0, atol=1e-6)


def _count_tower_runs(model) -> list:
    """A list that grows by one each time the method's runner runs the tower."""
    calls, run = [], model.ivtp_state.vision.run
    model.ivtp_state.vision.run = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs)
    return calls


@pytest.mark.parametrize("config", [
    {"method": "vispruner", "vispruner": {"visual_token_num": 16}},
    {"method": "topk", "topk": {"keep": 16}, "anyres": {"layout": "stock"}},
    {"method": "ivtp", **AT_16["ivtp"], "anyres": {"layout": "stock"}},
])
def test_the_stock_layout_of_kept_patches_batches_as_its_rows_alone_and_decodes_as_recomputed(config):
    """Counts that follow the picks: the tower runs before the prompt is shrunk, once (its features wait for the
    prefill), in forward, generate and a batch of mixed crop counts and a text-only row."""
    model, processor = pruned(config)
    assert model.ivtp_state.layout.variable
    images = next_images()[:2] + [None]
    batch = next_batch(processor, images, QUESTIONS, "left")
    calls = _count_tower_runs(model)
    with torch.no_grad():
        logits = model(**batch).logits
        assert len(calls) == 1  # the tower ran once for the batch
        for row, (image, question) in enumerate(zip(images, QUESTIONS)):
            single = model(**next_batch(processor, [image], [question], "left")).logits[0]
            torch.testing.assert_close(logits[row, -1], single[-1], rtol=1e-4, atol=1e-4)
    assert_cache_matches_recompute(model, next_batch(processor, images[:2], QUESTIONS[:2]), new_tokens=3)


def test_generate_and_its_report_on_the_stock_layout_of_kept_patches():
    model, processor = pruned({"method": "vispruner", "vispruner": {"visual_token_num": 16}})
    image = next_images()[1]  # 3 x 1 tiles, cut to the image: kept patches in the letterbox vanish
    calls = _count_tower_runs(model)
    (result,) = _generate(model, processor, [image], QUESTIONS[:1])
    assert len(calls) == 1  # shrinking ran the tower; the prefill took its features
    places = model.ivtp_state.last_image_places[0]
    trace = model.ivtp_state.last_vision.trace
    kept = {c * N + p for c, crop in enumerate(trace.kept.tolist()) for p in crop}
    stock = anyres.stock_places(result.image_size, model.config)
    assert set(result.kept_patches) == kept & set(stock.tolist())  # the kept patches that survive the cut
    assert int((places == -1).sum()) == int((stock == -1).sum())  # every row's newline
    assert result.visual_tokens[-1] == len(places)


def test_a_prompt_shrunk_without_its_features_is_refused():
    model, processor = pruned({"method": "vispruner", "vispruner": {"visual_token_num": 16}})
    batch = next_batch(processor, next_images()[:1], QUESTIONS[:1])
    with pytest.raises(ValueError, match="without its features"):
        model(**batch, ivtp_shrunk=True)
