"""apply_pruning on the real transformers LlavaForConditionalGeneration (tiny random configs)."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import batch_of
from ivtp import ConfigError, PruneConfig, apply_pruning, load_pruned
from ivtp.models import tiny_aligner
from ivtp.ops.sequence import PlaceholderError

N = 64  # patches of the 112 px test model


def vision_only(**vision):
    """Stage 1 alone (IVTP-V); stage 2 has tests of its own in test_llama.py."""
    return {"vision": vision, "llm": {"enabled": False}}


def test_keep_all_logits_and_loss_equal_the_stock_model(small_llava, images):
    stock, processor = small_llava()
    pruned, _ = small_llava()
    apply_pruning(pruned, "configs/keep_all.yaml", aligner=tiny_aligner(), tokenizer=processor.tokenizer)
    batch = batch_of(processor, images(2) + [None], ["What is it?", "Count the red shapes please", "Hello"],
                       padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = stock(**batch, labels=labels)
        out = pruned(**batch, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    assert pruned.ivtp_state.last_trace.counts == [N, N, N, N]  # scoring ran in every group
    assert pruned.ivtp_state.last_llm_trace.counts[0] == [N] * 5  # and in the LLM's four groups


def test_pruned_forward_shrinks_ids_mask_and_labels(small_llava, images):
    model, processor = small_llava()
    apply_pruning(model, vision_only(keep=8))
    batch = batch_of(processor, images(2) + [None], ["What is it?", "Where is the circle?", "Hi"],
                       padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    lengths = batch["attention_mask"].sum(1)
    # Image rows lose N - 8 tokens; the text-only row keeps its length, so the batch is as long as the longest.
    new_len = int(torch.stack([lengths[0] - (N - 8), lengths[1] - (N - 8), lengths[2]]).max())
    assert out.logits.shape[:2] == (3, new_len)
    assert model.ivtp_state.last_trace.counts == [N, 45, 27, 8]  # 7 layers feed layer -2: 3 groups
    # The loss is the stock causal-LM loss on the shrunk labels: recompute it from the logits and the text labels,
    # which shrinking must keep, in order, row by row.
    shrunk = model.ivtp_state.shrink(batch["input_ids"], 2, batch["attention_mask"], labels, "right")
    for b in range(3):
        assert shrunk.labels[b][shrunk.labels[b] != -100].tolist() == labels[b][labels[b] != -100].tolist()
    ref_loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), shrunk.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_greedy_generation_with_cache_equals_without(small_llava, images):
    model, processor = small_llava()
    apply_pruning(model, vision_only(keep=10, group_size=2))
    batch = batch_of(processor, images(2), ["What colour?", "Is there a square in the picture?"])
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=12, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == batch["input_ids"].shape[1] - (N - 10) + 12


def test_max_length_grants_the_new_tokens_the_stock_model_gets(small_llava, images):
    # max_length counts the prompt the caller built; the shrunk prompt is shorter, so the limit moves with it.
    stock, processor = small_llava()
    model, _ = small_llava()
    apply_pruning(model, vision_only(keep=10))
    batch = batch_of(processor, images(2), ["What colour?", "Is there a square in the picture?"])
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        ref = stock.generate(**batch, max_length=length + 5, min_length=length + 5, do_sample=False)
        out = model.generate(**batch, max_length=length + 5, min_length=length + 5, do_sample=False)
    assert ref.shape[1] - length == 5 and out.shape[1] - (length - (N - 10)) == 5
    with torch.no_grad():
        by_new_tokens = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, by_new_tokens)


def test_batched_generation_equals_per_sample(small_llava, images):
    model, processor = small_llava()
    apply_pruning(model, vision_only(keep=16))
    imgs = images(2) + [None]
    questions = ["What is it?", "Which shape is at the top left of the image?", "Say hello"]
    with torch.no_grad():
        batch = batch_of(processor, imgs, questions)
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, -8:]
        batch_logits = model(**batch).logits[:, -1]
        for i in range(3):
            single = batch_of(processor, [imgs[i]], [questions[i]])
            alone = model.generate(**single, max_new_tokens=8, do_sample=False)[:, -8:]
            assert torch.equal(together[i], alone[0]), f"sample {i}"
            torch.testing.assert_close(model(**single).logits[0, -1], batch_logits[i], rtol=1e-4, atol=1e-4)


def test_text_only_batches_pass_through(small_llava):
    stock, processor = small_llava()
    pruned, _ = small_llava()
    apply_pruning(pruned, vision_only(keep=4))
    batch = batch_of(processor, [None, None], ["Hello there", "What is a circle?"])
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).logits, stock(**batch).logits, rtol=0, atol=0)


def test_apply_refuses_twice_and_keeps_weights(small_llava):
    model, _ = small_llava()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_pruning(model, PruneConfig.from_dict(vision_only(keep=0.25)))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_pruning(model, PruneConfig.from_dict(vision_only(keep=0.25)))
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TypeError):
        apply_pruning(torch.nn.Linear(2, 2), PruneConfig())


class CountCalls:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_bad_input_fails_before_any_compute(small_llava, images):
    model, processor = small_llava()
    apply_pruning(model, vision_only(keep=8))
    calls = CountCalls(model.model.vision_tower.embeddings)
    good = batch_of(processor, images(1), ["What is it?"])
    text_only = batch_of(processor, [None], ["What is it?"])
    # An image without an <image> placeholder.
    with pytest.raises(PlaceholderError, match="1 image"):
        model(input_ids=text_only["input_ids"], pixel_values=good["pixel_values"])
    with pytest.raises(PlaceholderError):
        model.generate(input_ids=text_only["input_ids"], pixel_values=good["pixel_values"], max_new_tokens=2)
    # A placeholder without an image.
    with pytest.raises(PlaceholderError, match="no pixel_values"):
        model(input_ids=good["input_ids"])
    with pytest.raises(PlaceholderError, match="no pixel_values"):
        model.generate(input_ids=good["input_ids"], max_new_tokens=2)
    # Two images for one placeholder run.
    with pytest.raises(PlaceholderError):
        model(input_ids=good["input_ids"], pixel_values=good["pixel_values"].repeat(2, 1, 1, 1))
    assert calls.calls == 0


def test_impossible_configs_fail_at_apply_or_load(small_llava):
    model, _ = small_llava()
    with pytest.raises(ConfigError, match="vision.keep.*larger than the 64"):
        apply_pruning(model, vision_only(keep=65))
    with pytest.raises(ConfigError, match="group_size"):
        apply_pruning(model, vision_only(group_size=0))
    with pytest.raises(ConfigError, match="unknown method"):
        apply_pruning(model, {"method": "magic"})
    with pytest.raises(ConfigError, match="llm.keep.*larger than the 16"):
        apply_pruning(model, {"vision": {"keep": 16}, "llm": {"keep": 17, "layers": 4}})
    with pytest.raises(ConfigError, match="llm.layers: 40 is deeper than the model's 32"):
        apply_pruning(model, {"vision": {"keep": 16}, "llm": {"keep": 8, "layers": 40}})
    assert not hasattr(model, "ivtp_state")  # nothing was half-applied


def test_vision_stage_off_is_the_stock_model(small_llava, images):
    stock, processor = small_llava()
    model, _ = small_llava()
    apply_pruning(model, vision_only(enabled=False))
    batch = batch_of(processor, images(1), ["What is it?"])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, stock(**batch).logits, rtol=0, atol=0)
    assert model.ivtp_state.last_trace.counts == [N]


def test_save_and_load_pruned_round_trip(small_llava, images, tmp_path):
    model, processor = small_llava()
    apply_pruning(model, vision_only(keep=12, group_size=2))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "ivtp_config.json").exists()
    assert "LlavaForConditionalGeneration" in (tmp_path / "config.json").read_text()
    loaded = load_pruned(str(tmp_path)).eval()
    assert loaded.ivtp_state.config == model.ivtp_state.config
    batch = batch_of(processor, images(1), ["What is it?"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_a_pruned_checkpoint_keeps_the_stock_key_layout(small_llava, tmp_path):
    """apply_pruning swaps classes; save_pretrained must still write the stock checkpoint's keys (llava-hf's
    layout), which transformers maps only for its own classes."""
    stock, _ = small_llava()
    stock.save_pretrained(tmp_path / "stock")
    model, _ = small_llava()
    apply_pruning(model, vision_only(keep=12, group_size=2))
    model.save_pretrained(tmp_path / "pruned")
    keys = lambda name: set(load_file(str(tmp_path / name / "model.safetensors")))  # noqa: E731
    assert keys("pruned") == keys("stock")


def test_load_pruned_asks_for_no_tokenizer_when_stage_2_does_not_run(small_llava, images, tmp_path):
    """topk's config keeps a default `llm` section (CLIP guidance) that never runs: the folder needs no tokenizer."""
    model, processor = small_llava()
    cfg = PruneConfig.for_method("topk", 16)
    assert cfg.llm.needs_aligner and not cfg.needs_aligner
    apply_pruning(model, cfg)
    model.save_pretrained(tmp_path)  # no tokenizer files in the folder
    loaded = load_pruned(str(tmp_path)).eval()
    batch = batch_of(processor, images(1), ["What is it?"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
