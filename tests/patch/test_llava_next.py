"""apply_pruning on transformers' LlavaNextForConditionalGeneration (tiny random LLaVA-1.6 at 112 px: 8 x 8 patches
per crop, LLaVA-1.6's grids): the stock model for keep-all, each image's crops pruned on their own, the KV cache
against recomputation, a batch against its rows alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_cache_matches_recompute, prompt
from ivtp import ConfigError, apply_pruning
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
REFUSED = {"fastv": {}, "sparsevlm": {"sparsevlm": {"budget": 64}}}  # they prune only inside the LLM


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
        # each row: its real tokens, less the stock layout's placeholders, plus 16 per crop; padded to the longest
        rows = [int(real) - anyres.stock_tokens(size, model.config) + 16 * n
                for real, size, n in zip(batch["attention_mask"].sum(1), batch["image_sizes"], crops)]
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


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_methods_that_prune_only_inside_the_llm_are_refused(method):
    model, processor = tiny_random_next(image_size=112)
    with pytest.raises(ConfigError, match="prunes each crop before the LLM"):
        apply_pruning(model, {"method": method, **REFUSED[method]}, tokenizer=processor.tokenizer)
    assert not hasattr(model, "ivtp_state")  # refused before anything changed


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
