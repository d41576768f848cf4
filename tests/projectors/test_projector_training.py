"""Training with a compressor in place of the projector: `--projector` on train/pretrain.py and train/finetune.py
(ivtp.training.run), a few steps each on tiny-random, the checkpoint loading back as trained."""

import json
import os

import pytest
import torch
from conftest import needs_deepspeed, run_deepspeed_zero3
from safetensors.torch import load_file

from ivtp import load_pruned
from ivtp.data.llava import Collator
from ivtp.projectors import PROJECTORS
from ivtp.training import build_trainer, load_for_training, main, parse_args, run, save_final

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "fixtures", "tiny_llava.json")
IMAGES = os.path.join(ROOT, "data", "fixtures", "images")


def args_for(out, *extra):
    return ["--data_path", DATA, "--image_folder", IMAGES, "--output_dir", str(out), "--report_to", "none",
            "--use_cpu", "True", "--seed", "0", "--logging_steps", "1", "--per_device_train_batch_size", "4",
            "--learning_rate", "2e-3", "--lr_scheduler_type", "constant", "--save_strategy", "no", *extra]


def train(argv, tune="projector+llm"):
    model_args, data_args, train_args = parse_args(argv, tune=tune)
    model, processor, _ = load_for_training(model_args)
    trainer = build_trainer(model, processor, model_args, data_args, train_args)
    trainer.train()
    save_final(trainer, model, processor)
    return trainer, model, processor


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_pretraining_trains_the_compressor_alone_and_the_checkpoint_loads_back(tmp_path, name):
    trainer, model, processor = train(args_for(tmp_path, "--projector", name, "--projector_tokens", "16",
                                               "--max_steps", "3", "--mm_projector_lr", "1e-3"), tune="projector")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.multi_modal_projector.") for n in trainable)
    assert sorted({g["lr"] for g in trainer.optimizer.param_groups}) == [1e-3]  # the projector's own lr
    saved = json.load(open(tmp_path / "config.json"))["ivtp_projector"]
    assert saved["name"] == name and saved["num_tokens"] == 16
    loaded = load_pruned(str(tmp_path)).eval()  # no ivtp_config.json: the compressor alone, unpruned
    assert type(loaded.model.multi_modal_projector) is PROJECTORS[name]
    assert not hasattr(loaded, "ivtp_state")
    model.eval()
    batch = Collator(processor.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in (0, 6)])  # 6: text only
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_finetuning_continues_the_checkpoints_compressor(tmp_path):
    """train/finetune.py from a pretrained compressor: it comes back with its weights and trains with the LLM;
    --projector, if given, must name it."""
    run(args_for(tmp_path / "pre", "--projector", "qwen_vl", "--projector_tokens", "16", "--max_steps", "1"),
        template="plain", tune="projector")
    argv = args_for(tmp_path / "ft", "--model_name_or_path", str(tmp_path / "pre"), "--max_steps", "2")
    trainer, model, _ = train(argv)
    assert model.config.ivtp_projector["name"] == "qwen_vl"
    trainable = {n.split(".")[1] if n.startswith("model.") else n for n, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"multi_modal_projector", "language_model", "lm_head.weight"}
    with pytest.raises(ValueError, match="trained with the qwen_vl projector at 16 tokens; --projector honeybee"):
        load_for_training(parse_args([*argv, "--projector", "honeybee", "--projector_tokens", "16"])[0])


@needs_deepspeed
@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_deepspeed_zero3_trains_the_compressor_and_saves_it_whole(tmp_path, name):
    """ZeRO-3 partitions every weight, the compressor's too: the checkpoint must hold each whole. Pretraining
    under ZeRO-3 saves the compressor at its full shapes; finetuning from that checkpoint under ZeRO-3 at a zero
    learning rate gives every weight back exactly."""
    run_deepspeed_zero3("pretrain.py", *args_for(tmp_path / "pre", "--projector", name, "--projector_tokens", "16",
                                       "--max_steps", "2"))
    reference, _, _ = load_for_training(parse_args(args_for(tmp_path / "ref", "--projector", name,
                                                            "--projector_tokens", "16"), tune="projector")[0])
    shapes = {k: v.shape for k, v in reference.model.multi_modal_projector.state_dict().items()}
    saved = load_file(str(tmp_path / "pre" / "model.safetensors"))  # keys in llava-hf's layout
    prefix = "multi_modal_projector."
    assert {k[len(prefix):]: v.shape for k, v in saved.items() if k.startswith(prefix)} == shapes
    run_deepspeed_zero3("finetune.py", *args_for(tmp_path / "ft", "--model_name_or_path", str(tmp_path / "pre"),
                                       "--max_steps", "1", "--learning_rate", "0", "--weight_decay", "0"))
    loaded = load_pruned(str(tmp_path / "ft"))
    assert type(loaded.model.multi_modal_projector) is PROJECTORS[name]
    before = load_pruned(str(tmp_path / "pre")).state_dict()
    after = loaded.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        assert torch.equal(value, before[key]), key


def test_default_projector_is_llavas_mlp_unchanged(tmp_path):
    model_args, _, _ = parse_args(args_for(tmp_path))
    assert model_args.projector is None
    model, _, _ = load_for_training(model_args)
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    assert getattr(model.config, "ivtp_projector", None) is None


@pytest.mark.parametrize("extra, message", [
    (["--projector", "perceiver"], "--projector 'perceiver': choose one of mlp, honeybee, llama_vid, qwen_vl"),
    (["--projector", "honeybee", "--prune-config", os.path.join(ROOT, "configs", "ivtp_64.yaml")],
     "does not combine with --prune-config"),
    (["--projector", "honeybee", "--projector_tokens", "50"], "num_tokens must be a square number"),
])
def test_bad_projector_arguments_are_one_line_errors_with_exit_code_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args_for(tmp_path, "--max_steps", "1", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
