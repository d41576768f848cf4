"""A compressor in a transformers LLaVA, in place of its projector: placeholders, logits, saving and loading back,
the instruction reaching LLaMA-VID's context token, generation, refusals."""

import json
import os

import pytest
import torch
from conftest import assert_cache_matches_recompute, batch_of
from safetensors.torch import load_file
from transformers import AutoProcessor

from ivtp import apply_pruning, load_pruned
from ivtp.cli import main
from ivtp.config import ConfigError
from ivtp.errors import InputError
from ivtp.models import load_model
from ivtp.projectors import PROJECTORS, ProjectorError, attach_projector
from ivtp.projectors.llava import tower_patches_features

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = os.path.join(ROOT, "data", "fixtures", "images", "scene0.png")
QUESTIONS = ["What is this?", "How many red things are here?", "Where is the cube?"]
SMALL = {"llama_vid": dict(layers=2)}  # a 2-layer Q-Former keeps the tests fast


def attached(small_llava, name, num_tokens=16, seed=0):
    model, processor = small_llava(seed)
    attach_projector(model, name, num_tokens, processor=processor, **SMALL.get(name, {}))
    return model.eval(), processor


def mixed_batch(processor, images, padding_side="left"):
    imgs = images(2)
    return batch_of(processor, [imgs[0], None, imgs[1]], QUESTIONS, padding_side=padding_side)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_logits_cover_the_processors_placeholders_one_run_per_image(small_llava, images, name):
    model, processor = attached(small_llava, name)
    per_image = model.model.multi_modal_projector.tokens_per_image
    assert per_image == (17 if name == "llama_vid" else 16)
    batch = mixed_batch(processor, images)
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts == [per_image, 0, per_image]  # the processor writes the compressor's count
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (2 * per_image, model.config.text_config.hidden_size)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_save_and_load_back_reproduce_the_logits_exactly(small_llava, images, tmp_path, name, capfd):
    model, processor = attached(small_llava, name)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["ivtp_projector"] == {
        "name": name, "num_tokens": 16, "tokens_per_image": model.model.multi_modal_projector.tokens_per_image,
        "options": SMALL.get(name, {})}
    batch = mixed_batch(processor, images)
    with torch.no_grad():
        expected = model(**batch).logits
    plain = AutoProcessor.from_pretrained(tmp_path)  # the saved processor alone writes the right count
    assert torch.equal(batch_of(plain, [images(2)[0], None, images(2)[1]], QUESTIONS)["input_ids"],
                       batch["input_ids"])
    for loaded in (load_model(str(tmp_path))[0], load_pruned(str(tmp_path))):
        assert type(loaded.model.multi_modal_projector) is PROJECTORS[name] and not hasattr(loaded, "ivtp_state")
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**batch).logits, expected)
    assert "LOAD REPORT" not in capfd.readouterr().err  # the stock projector's weights are missing by design


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_the_checkpoint_keeps_the_stock_key_layout(small_llava, tmp_path, name):
    """Outside the projector, a compressor's checkpoint holds the stock checkpoint's keys (llava-hf's layout:
    language_model.model.layers..., not transformers' internal model.language_model.layers...), LLaMA-VID's
    class-swapped model included, so that tools reading llava-hf checkpoints read it."""
    stock, _ = small_llava()
    stock.save_pretrained(tmp_path / "stock")
    model, _ = attached(small_llava, name)
    model.save_pretrained(tmp_path / name)
    outside = lambda folder: {k for k in load_file(str(folder / "model.safetensors"))  # noqa: E731
                              if not k.startswith("multi_modal_projector.")}
    assert outside(tmp_path / name) == outside(tmp_path / "stock")


def test_llama_vids_context_token_reads_the_instruction_and_nothing_else(small_llava, images):
    model, processor = attached(small_llava, "llama_vid")
    img = images(1)
    with torch.no_grad():
        a = model(**batch_of(processor, img * 2, ["What colour is the cube?", "How many spheres?"])).image_hidden_states
    assert not torch.allclose(a[0], a[17])  # the context tokens differ with the question
    assert torch.equal(a[1:17], a[18:34])  # the content tokens do not
    # In training, the answer (labels != -100) is not instruction: the context token does not see it.
    batch = batch_of(processor, img, ["What colour is the cube?"], padding_side="right")
    answer = processor.tokenizer(" red", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([batch["input_ids"], answer], dim=1)
    labels = torch.cat([torch.full_like(batch["input_ids"], -100), answer], dim=1)
    with torch.no_grad():
        with_answer = model(input_ids=ids, pixel_values=batch["pixel_values"], labels=labels).image_hidden_states
        without = model(**batch).image_hidden_states
    torch.testing.assert_close(with_answer, without)


def test_llama_vid_reads_the_same_patches_as_the_stock_projector_input(small_llava, images):
    model, processor = attached(small_llava, "llama_vid")
    pixels = batch_of(processor, images(2), QUESTIONS[:2])["pixel_values"]
    seen = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pixels)  # the stock path: no instruction
        ours = tower_patches_features(model, pixels)
    hook.remove()
    assert torch.equal(seen[0], ours)


def test_llama_vid_generates_the_same_with_and_without_the_cache(small_llava, images):
    """Without a cache every step recomputes the image features from the whole sequence; the instruction stays the
    prompt's, so each step's logits match the cached run's."""
    model, processor = attached(small_llava, "llama_vid")
    assert_cache_matches_recompute(model, mixed_batch(processor, images), new_tokens=3)


def test_attach_twice_or_with_pruning_is_refused(small_llava):
    model, processor = attached(small_llava, "honeybee")
    with pytest.raises(RuntimeError, match="already applied"):
        attach_projector(model, "qwen_vl", 16)
    with pytest.raises(ConfigError, match="trained compressor 'honeybee'.*does not combine"):
        apply_pruning(model, {"method": "topk"})
    pruned, _ = small_llava()
    apply_pruning(pruned, {"method": "topk", "topk": {"keep": 16}})
    with pytest.raises(RuntimeError, match="pruned"):
        attach_projector(pruned, "honeybee", 16)


@pytest.mark.parametrize("name, message", [
    ("perceiver", "unknown projector 'perceiver'; choose one of honeybee, llama_vid, qwen_vl"),
    ("mlp", "mlp is LLaVA's own projector: nothing to attach"),
])
def test_a_bad_name_is_a_one_line_input_error_and_changes_nothing(small_llava, name, message):
    model, _ = small_llava()
    with pytest.raises(ProjectorError, match=message) as info:
        attach_projector(model, name, 16)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    assert getattr(model.config, "ivtp_projector", None) is None


def test_ivtp_generate_runs_a_saved_compressor_unpruned(small_llava, tmp_path, capsys):
    model, processor = attached(small_llava, "llama_vid")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--image", IMAGE, "--prompt", "What is this?",
                 "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prune_config"] is None and out["visual_tokens"] == [[17]]


def test_the_cli_names_are_the_registry():
    from ivtp.names import PROJECTOR_NAMES

    assert PROJECTOR_NAMES == ("mlp", *PROJECTORS)
