"""Training with pruning active: masking is tested in tests/data; here the loop, saving, resuming, LoRA,
DeepSpeed ZeRO-3 and bad data."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import needs_deepspeed, run_deepspeed_zero3
from safetensors.torch import load_file

from ivtp import load_pruned
from ivtp.cli import main
from ivtp.data.llava import Collator, LlavaDataset, MissingImageError, load_records
from ivtp.data.templates import ConversationError
from ivtp.models import ModelNotFoundError
from ivtp.models import tiny_aligner, tiny_random
from ivtp.training import (ModelArguments, build_trainer, detach_frozen_tower, load_for_training, parse_args,
                           save_final, set_trainable)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "fixtures", "tiny_llava.json")
IMAGES = os.path.join(ROOT, "data", "fixtures", "images")
CONFIG = os.path.join(ROOT, "configs", "ivtp_64.yaml")


def args_for(out, *extra):
    return ["--prune-config", CONFIG, "--data_path", DATA, "--image_folder", IMAGES, "--output_dir", str(out),
            "--report_to", "none", "--use_cpu", "True", "--seed", "0", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant",
            "--save_strategy", "no", *extra]


def train(argv, watch=None):
    """Train as train/finetune.py does; `watch(module, args, kwargs)` sees every training forward's inputs."""
    model_args, data_args, train_args = parse_args(argv)
    model, processor, config = load_for_training(model_args)
    if watch is not None:
        model.register_forward_pre_hook(watch, with_kwargs=True)
    trainer = build_trainer(model, processor, model_args, data_args, train_args)
    resume = train_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, model, processor)
    return trainer, model, processor


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_overfit_with_pruning_halves_the_loss_on_mixed_batches(tmp_path):
    trainer, model, _ = train(args_for(tmp_path, "--max_steps", "30"))
    got = losses(trainer)
    assert len(got) == 30 and got[-1] <= got[0] / 2, got
    assert model.ivtp_state.last_llm_trace is not None  # pruning ran in the training forward


def test_checkpoint_reloads_for_pure_inference_with_identical_logits(tmp_path, capsys):
    """The tiny-random preset trains with its own small aligner, not the config's CLIP-L: the checkpoint carries
    that aligner and its config names it, so it loads back with no argument and no download (issue 22)."""
    trainer, model, processor = train(args_for(tmp_path, "--max_steps", "2"))
    saved = json.load(open(tmp_path / "ivtp_config.json"))
    assert saved["llm"]["keep"] == 64
    assert saved["llm"]["aligner"] == {**saved["llm"]["aligner"], "model": "ivtp-tiny-clip",
                                       "pretrained": "aligner.safetensors"}
    assert json.load(open(tmp_path / "aligner.json")) == {"model": "ivtp-tiny-clip"}
    loaded = load_pruned(str(tmp_path)).eval()
    model.eval()
    batch = Collator(processor.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in (0, 6)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
    # The CLI loads it the same way, with the carried aligner's relevance (not a random or downloaded one).
    capsys.readouterr()  # the trainer's log lines
    assert main(["generate", "--model", str(tmp_path), "--image", os.path.join(IMAGES, os.listdir(IMAGES)[0]),
                 "--prompt", "What is this?", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["aligner"].startswith("ivtp-tiny-clip") and out["aligner"].endswith("aligner.safetensors)")
    assert out["visual_tokens"][0][-1] == 64


def test_resume_continues_from_the_saved_step(tmp_path):
    full, _, _ = train(args_for(tmp_path / "a", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"))
    for name in ("ivtp_config.json", "aligner.json", "aligner.safetensors"):  # checkpoints load as they are
        assert os.path.isfile(tmp_path / "a" / "checkpoint-2" / name), name
    resumed, _, _ = train(args_for(tmp_path / "b", "--max_steps", "4",
                                   "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2")))
    assert resumed.state.global_step == 4
    # Steps 1-2 come from the checkpoint's state, 3-4 from this run: none is logged twice.
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_trains_adapters_and_the_projector_and_merges(tmp_path):
    trainer, model, processor = train(args_for(tmp_path, "--max_steps", "2", "--lora_enable", "True",
                                               "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "1e-3"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [1e-3, 2e-3]  # the projector has its own learning rate
    with pytest.raises(ModelNotFoundError, match=r"holds LoRA adapters, not a llava-hf model: load .*merged"):
        load_pruned(str(tmp_path), aligner=tiny_aligner())  # the adapters alone: a pointer to the merged model
    merged = load_pruned(str(tmp_path / "merged"), aligner=tiny_aligner()).eval()
    model.eval()
    batch = Collator(processor.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in (0, 1)])
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_bad_samples_fail_clearly_or_are_skipped(tmp_path):
    records = json.load(open(DATA))
    records[1]["image"] = "missing.png"
    records[3]["conversations"] = records[3]["conversations"][::-1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    _, processor = tiny_random(image_size=112)
    make = lambda **kw: LlavaDataset(load_records(str(path)), processor.tokenizer, processor.image_processor,
                                     "vicuna_v1", IMAGES, 64, 2048, **kw)
    with pytest.raises(MissingImageError, match="sample scene1: image not found"):
        make()[1]
    skipping = make(skip_missing=True)
    assert skipping[1]["id"] != "scene1" and skipping.skipped == {"scene1"}
    with pytest.raises(ConversationError, match="sample scene3: turn 0 is from 'gpt'"):
        make()[3]
    short = LlavaDataset(load_records(DATA), processor.tokenizer, processor.image_processor, "vicuna_v1", IMAGES,
                         64, 60)  # its 64 image tokens sit at 35-98
    with pytest.raises(ConversationError, match="cut through its image"):
        short[0]
    text_only = short[6]
    long = LlavaDataset(load_records(DATA), processor.tokenizer, processor.image_processor, "vicuna_v1", IMAGES,
                        64, len(text_only["input_ids"]) - 2)
    with pytest.warns(UserWarning, match="truncated"):
        assert len(long[6]["input_ids"]) == len(text_only["input_ids"]) - 2


@needs_deepspeed
def test_deepspeed_zero3_saves_gathered_weights_that_load(tmp_path):
    """ZeRO-3 partitions every weight; the saved checkpoint must hold them whole. Starting from a saved
    checkpoint with a zero learning rate, the weights must come back exactly as they went in."""
    init = tmp_path / "init"
    model, processor = tiny_random()
    model.save_pretrained(init)
    processor.save_pretrained(init)
    config = tmp_path / "ivtp_tiny.yaml"  # a folder model brings no aligner: name the tiny one
    config.write_text(open(CONFIG).read().replace("model: ViT-L-14-336", "model: ivtp-tiny-clip")
                      .replace("pretrained: openai", "pretrained: null"))
    argv = args_for(tmp_path / "out", "--max_steps", "2", "--learning_rate", "0", "--weight_decay", "0",
                    "--model_name_or_path", str(init))
    argv[argv.index(CONFIG)] = str(config)
    run_deepspeed_zero3("finetune.py", *argv)
    loaded = load_pruned(str(tmp_path / "out"), aligner=tiny_aligner())
    assert loaded.ivtp_state.config.llm.keep == 64
    ref, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(ref)
    for key, value in got.items():
        assert torch.equal(value, ref[key]), key


def test_pretraining_assembles_llava_from_an_llm_and_a_clip_tower(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from test_models import _original_tokenizer
    from ivtp.training import build_from_parts

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=100)).eval()
    llm.save_pretrained(tmp_path / "llm")
    _original_tokenizer(tmp_path / "llm")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=56, patch_size=14)).eval()
    clip.save_pretrained(tmp_path / "clip")
    model, processor = build_from_parts(str(tmp_path / "llm"), str(tmp_path / "clip"))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == 100
    ids = torch.tensor([[1, 7, 42, 99]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits[..., :100], llm(input_ids=ids).logits)
        torch.testing.assert_close(model.model.vision_tower(pixels).pooler_output, clip(pixels).pooler_output)


@pytest.mark.parametrize("script", ["pretrain.sh", "finetune.sh", "finetune_lora.sh"])
def test_launcher_flags_are_training_arguments(script):
    """Every --flag in scripts/v1_5/*.sh is an argument of train/*.py (transformers 5 dropped --warmup_ratio,
    for one: a launcher with such a flag would fail only on the cluster)."""
    import dataclasses
    import re

    from ivtp.training import DataArguments, ModelArguments, TrainingArguments

    known = {f.name for cls in (ModelArguments, DataArguments, TrainingArguments) for f in dataclasses.fields(cls)}
    known |= {"prune-config", "deepspeed", "hostfile"}
    text = open(os.path.join(os.path.dirname(__file__), "..", "scripts", "v1_5", script)).read()
    body = text.split("train/", 1)[-1] if "train/" in text else text  # the flags given to the training script
    flags = re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", body)
    assert len(flags) >= 4
    unknown = sorted(set(flags) - known)
    assert unknown == [], f"{script}: not training arguments: {unknown}"


def _step(model, batch):
    """One forward and backward pass; the loss and every gradient, by parameter name."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_a_frozen_tower_records_no_graph_under_activation_checkpointing():
    """Checkpointing makes the tower's patch embeddings require grad; the frozen tower must still record no graph
    (LLaVA runs it under no_grad), with the same loss and gradients. A tower that trains keeps its gradients."""
    import numpy as np
    from PIL import Image

    from conftest import batch_of
    from ivtp import apply_pruning

    rng = np.random.RandomState(0)
    pictures = [Image.fromarray((rng.rand(112, 112, 3) * 255).astype("uint8")) for _ in range(2)]
    runs = []
    for detach in (False, True):
        model, processor = tiny_random(0, image_size=112)
        apply_pruning(model, {"vision": {"keep": 32}, "llm": {"keep": 8, "layers": 6}}, aligner=tiny_aligner(),
                      tokenizer=processor.tokenizer)
        model = set_trainable(model, ModelArguments(tune="projector+llm")).train()  # the tower frozen
        model.activation_checkpointing_enable()
        if detach:
            detach_frozen_tower(model)
            detach_frozen_tower(model)  # a second call adds nothing
        seen = []
        model.model.vision_tower.encoder.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(args[0].requires_grad), with_kwargs=True)
        batch = batch_of(processor, pictures, ["What colour is it?", "Is there a square?"], padding_side="right")
        runs.append((_step(model, batch), seen[0]))
    ((loss, grads), graph), ((loss_cut, grads_cut), graph_cut) = runs
    assert graph and not graph_cut  # without the hook the frozen tower's first layer sees a graph
    torch.testing.assert_close(loss_cut, loss, rtol=0, atol=0)
    assert grads_cut.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_cut[name], grads[name], rtol=0, atol=0, msg=name)
    model.model.vision_tower.requires_grad_(True)  # unfrozen: the hook steps aside
    _, grads = _step(model, batch)
    assert any("vision_tower.encoder" in n for n in grads)


def test_train_step_bench_script_runs_and_both_ways_agree():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_train_step.py"), "--preset",
                          "tiny-random", "--visual-tokens", "16", "--steps", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()
    lines = [line for line in out if line.startswith("tiny-random ivtp:")]
    assert len(lines) == 2 and "with a graph" in lines[0] and "without a graph" in lines[1]
    assert lines[0].split("loss ")[1] == lines[1].split("loss ")[1]


# ---- LLaVA-NeXT --------------------------------------------------------------------------------------------------
NEXT_SIZES = [(224, 112), (112, 224), (224, 224), (336, 112), (112, 336)]  # (width, height) at 112 px: grids 1x2,
# 2x1, 2x2, 3x1, 1x3, so 3, 3, 5, 4 and 4 crops
NEXT_COLOURS = ["red", "green", "blue", "yellow", "purple"]


@pytest.fixture(scope="module")
def next_setup(tmp_path_factory):
    """A saved tiny random LLaVA-NeXT (112 px crops), five images of LLaVA-1.6's five grids and a text-only record,
    and an IVTP config at 32 -> 16 tokens per crop with the tiny aligner."""
    import numpy as np
    from PIL import Image

    from ivtp.models import tiny_random_next

    root = tmp_path_factory.mktemp("next")
    model, processor = tiny_random_next(image_size=112)
    model.save_pretrained(root / "init")
    processor.save_pretrained(root / "init")
    rng = np.random.RandomState(0)
    records = []
    for i, ((w, h), colour) in enumerate(zip(NEXT_SIZES, NEXT_COLOURS)):
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(root / "images" / f"{i}.png")
        records.append({"id": f"next{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]})
    records.append({"id": "text0", "conversations": [{"from": "human", "value": "Name a colour."},
                                                      {"from": "gpt", "value": "red"}]})
    (root / "data.json").write_text(json.dumps(records))
    (root / "prune.json").write_text(json.dumps({"method": "ivtp", "vision": {"keep": 32}, "llm": {
        "keep": 16, "layers": 6, "aligner": {"model": "ivtp-tiny-clip", "pretrained": None}}}))
    return root, model.config, processor


def next_args(root, out, *extra):
    return ["--model_name_or_path", str(root / "init"), "--prune-config", str(root / "prune.json"),
            "--data_path", str(root / "data.json"), "--image_folder", str(root / "images"), "--output_dir", str(out),
            "--report_to", "none", "--use_cpu", "True", "--seed", "0", "--logging_steps", "1",
            "--per_device_train_batch_size", "3", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant",
            "--save_strategy", "no", *extra]


def test_next_collator_writes_what_the_stock_processor_writes(next_setup):
    """Placeholders per image size, crops zero-padded to the batch's most, image_sizes: the same tensors as
    transformers' LlavaNextProcessor gives for the same images and text, with a text-only row in the batch."""
    from PIL import Image

    from ivtp.data.llava import placeholders_per_image
    from ivtp.data.templates import place_image, render

    root, config, processor = next_setup
    records = json.load(open(root / "data.json"))
    dataset = LlavaDataset(records, processor.tokenizer, processor.image_processor, "vicuna_v1",
                           str(root / "images"), placeholders_per_image(config), 2048)
    rows = [0, 5, 2, 3]  # 3, 0 (text only), 5 and 4 crops
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in rows])
    texts = [render("vicuna_v1", place_image(records[i]["conversations"], "image" in records[i]),
                    processor.tokenizer.eos_token).text for i in rows]
    images = [Image.open(root / "images" / records[i]["image"]) for i in rows if "image" in records[i]]
    processor.tokenizer.padding_side = "right"
    stock = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 5, 3, 112, 112)
    assert (batch["input_ids"] == config.image_token_id).sum(1).tolist() == [200, 0, 336, 264]
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(batch[key], stock[key]), key


def test_next_image_aspect_ratio_must_fit_the_processor(next_setup):
    from ivtp.errors import InputError

    _, _, processor = next_setup
    make = lambda proc, ratio: LlavaDataset([], proc.tokenizer, proc.image_processor, "vicuna_v1", None, 64, 2048,
                                            image_aspect_ratio=ratio)
    assert make(processor, None).image_aspect_ratio == "anyres"
    with pytest.raises(InputError, match="LLaVA-NeXT tiles each image at its own aspect; pass anyres"):
        make(processor, "pad")
    _, processor15 = tiny_random(image_size=112)
    assert make(processor15, None).image_aspect_ratio == "pad"
    with pytest.raises(InputError, match="'anyres' needs a LLaVA-NeXT model"):
        make(processor15, "anyres")


def test_next_overfit_with_pruning_halves_the_loss_on_batches_of_mixed_crops(next_setup, tmp_path):
    from ivtp import anyres

    root, config, _ = next_setup
    seen = []  # per training forward: each image's crops, and the rows without an image

    def watch(module, args, kwargs):
        sizes = kwargs.get("image_sizes")
        crops = [] if sizes is None else anyres.crop_counts(sizes, config)
        seen.append((crops, len(kwargs["input_ids"]) - len(crops)))

    trainer, model, _ = train(next_args(root, tmp_path, "--max_steps", "20"), watch)
    got = losses(trainer)
    assert len(got) == 20 and got[-1] <= got[0] / 2, got
    assert model.ivtp_state.last_llm_trace is not None  # stage 2 ran in the training forward
    assert any(len(set(crops)) > 1 and text_rows for crops, text_rows in seen), seen
    assert not model.model.image_newline.requires_grad  # the pruned layout has no newlines to train


def test_next_checkpoint_reloads_for_pure_inference_with_identical_logits(next_setup, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    root, _, _ = next_setup
    trainer, model, processor = train(next_args(root, tmp_path, "--max_steps", "2"))
    loaded = load_pruned(str(tmp_path)).eval()
    assert isinstance(loaded, LlavaNextForConditionalGeneration) and loaded.ivtp_state.config.llm.keep == 16
    model.eval()
    batch = Collator(processor.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in (0, 5, 2)])  # 3, 0, 5 crops
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_next_trains_and_reloads_with_budgets_per_image(next_setup, tmp_path):
    """`anyres.budget: per_image`: 40 tokens per image from stage 1 (14/13/13 of a 3-crop image, 8 x 5 of a 5-crop
    one), 20 after stage 2, in a training forward of mixed crops; the checkpoint reloads with the setting and the
    same logits."""
    root, _, _ = next_setup
    config = tmp_path / "prune.json"
    config.write_text(json.dumps({"method": "ivtp", "vision": {"keep": 40}, "llm": {
        "keep": 20, "layers": 6, "aligner": {"model": "ivtp-tiny-clip", "pretrained": None}},
        "anyres": {"budget": "per_image"}}))
    argv = next_args(root, tmp_path / "out", "--max_steps", "2")
    argv[argv.index("--prune-config") + 1] = str(config)
    trainer, model, processor = train(argv)
    assert all(math.isfinite(x) for x in losses(trainer))
    rows = [c for c in model.ivtp_state.last_llm_trace.counts if c]  # the rows with an image
    assert rows and all(c[0] == 40 and c[-1] == 20 for c in rows), rows
    loaded = load_pruned(str(tmp_path / "out")).eval()
    assert loaded.ivtp_state.config.anyres.budget == "per_image" and loaded.ivtp_state.tokens_per_image == 40
    model.eval()
    batch = Collator(processor.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in (0, 5, 2)])  # 3, 0, 5 crops
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
