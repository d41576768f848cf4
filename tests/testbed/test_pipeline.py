"""ivtp.testbed.pipeline: the recipe's settings, the tokenizer corpus and the training command line."""

import dataclasses
import json
import os

import pytest

from ivtp.data.shapes import finetune_records, pretrain_records, scene_for
from ivtp.data.tokenizer import train_tokenizer
from ivtp.testbed import pipeline
from ivtp.testbed.pipeline import config_from_args, train_command, training_texts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A testbed data folder with only the two JSON files the tokenizer corpus reads."""
    out = tmp_path_factory.mktemp("data")
    scenes = [scene_for(0, "train", i) for i in range(40)]
    (out / "pretrain.json").write_text(json.dumps(pretrain_records(scenes, 0)))
    (out / "finetune.json").write_text(json.dumps(finetune_records(scenes, 0)))
    return out


def test_training_texts_are_the_rendered_sequences(data_dir):
    texts = list(training_texts(str(data_dir)))
    pre = json.loads((data_dir / "pretrain.json").read_text())
    ft = json.loads((data_dir / "finetune.json").read_text())
    assert len(texts) == len(pre) + len(ft)
    # plain: the caption and its newline; vicuna_v1: system prompt, USER/ASSISTANT tags, every turn
    assert texts[0] == pre[0]["conversations"][1]["value"] + "\n"
    chat = texts[len(pre)]
    turns = ft[0]["conversations"]
    assert chat.startswith("A chat between") and "<image>" not in chat and "</s>" not in chat
    assert chat.count("USER:") == chat.count("ASSISTANT:") == len(turns) // 2
    assert all(t["value"].replace("<image>\n", "") in chat for t in turns)


def test_testbed_texts_are_the_turns_and_the_template(data_dir):
    """The aligner's vocabulary: the chat template once, then every turn's own text without the placeholder."""
    texts = list(pipeline.testbed_texts(str(data_dir)))  # through the module: pytest would collect test*
    turns = [t["value"] for name in ("pretrain.json", "finetune.json")
             for record in json.loads((data_dir / name).read_text()) for t in record["conversations"]]
    assert texts[0].startswith("A chat between") and texts[0].endswith("USER: ASSISTANT:")
    assert texts[1:] == [t.replace("<image>", "") for t in turns]


def test_tokenizer_learns_the_chat_template(data_dir, tmp_path):
    """With the template in the corpus once, "ASSISTANT:" was split into 10 single-letter tokens. Punctuation and
    newlines stand alone, as in Llama's tokenizer: the question's last word is a token of its own (it was merged
    with the answer-format suffix, "▁square?\nAnswer")."""
    tok = train_tokenizer(training_texts(str(data_dir)), str(tmp_path / "tok"), vocab_size=400)
    assert tok.tokenize(" USER: ASSISTANT:") == ["▁USER", ":", "▁ASSISTANT", ":"]
    pieces = tok.tokenize(" What colour is the square?\nAnswer the question")
    assert pieces[pieces.index("▁square") + 1 : pieces.index("▁square") + 3] == ["?", "\n"]
    text = "What colour is the square?\nAnswer the question using a single word or phrase. ASSISTANT: red"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_recipe_settings_and_overrides():
    cfg = pipeline.TestbedConfig()
    assert cfg.clip_region_weights["shape"] > 0 and sum(cfg.finetune_counts.values()) == 12
    cfg = config_from_args(False, ["finetune_epochs=2", 'finetune_counts={"colour": 3}', "train_precision=fp32"])
    assert cfg.finetune_epochs == 2.0 and cfg.finetune_counts == {"colour": 3} and cfg.train_precision == "fp32"
    assert config_from_args(True, []).n_train == pipeline.TestbedConfig.smoke().n_train
    with pytest.raises(SystemExit, match="not a TestbedConfig field"):
        config_from_args(False, ["finetune_epoch=2"])
    with pytest.raises(SystemExit, match="train_precision"):
        config_from_args(False, ["train_precision=fp16"])
    with pytest.raises(SystemExit, match="finetune_epochs"):
        config_from_args(False, ["finetune_epochs=many"])
    with pytest.raises(ValueError, match="clip_precision"):
        pipeline.TestbedConfig(clip_precision="half")
    assert config_from_args(False, ['clip_region_weights={"shape": 2}']).clip_region_weights == {"shape": 2}
    with pytest.raises(SystemExit, match="clip_region_weights.*choose from shape, colour, position"):
        config_from_args(False, ['clip_region_weights={"size": 1}'])


def test_saved_recipe_reads_back_as_the_same(tmp_path, monkeypatch):
    """A rerun with the settings testbed.json holds goes on; other settings stop it."""
    monkeypatch.setattr(pipeline, "STAGE_FUNCS", {s: (lambda cfg, out: None) for s in pipeline.STAGES})
    cfg = pipeline.TestbedConfig.smoke()
    pipeline.run(str(tmp_path), cfg, stages=())
    pipeline.run(str(tmp_path), cfg, stages=())
    with pytest.raises(SystemExit, match="built with other settings"):
        pipeline.run(str(tmp_path), dataclasses.replace(cfg, clip_region_weights={"shape": 1.0}), stages=())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_command_precision(precision):
    argv = train_command(pipeline.TestbedConfig(train_precision=precision), "finetune", {"learning_rate": 1e-3})
    assert argv[argv.index("--bf16") + 1] == str(precision == "bf16")
    assert argv[argv.index("--per_device_train_batch_size") + 1] == str(pipeline.TestbedConfig().batch_size)
    assert argv[argv.index("--learning_rate") + 1] == "0.001"


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A stage saves a checkpoint every CHECKPOINT_STEPS; run again, it resumes from the latest one in its output
    folder, and once it has finished the checkpoints are removed (the model is in the folder itself)."""
    cfg, out = pipeline.TestbedConfig(), tmp_path / "pretrain"
    argv = train_command(cfg, "pretrain", {"output_dir": str(out)})
    assert "--resume_from_checkpoint" not in argv and argv[argv.index("--save_strategy") + 1] == "steps"
    assert argv[argv.index("--save_steps") + 1] == str(pipeline.CHECKPOINT_STEPS)
    for step in (250, 1000, 750):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    argv = train_command(cfg, "pretrain", {"output_dir": str(out)})
    assert argv[argv.index("--resume_from_checkpoint") + 1] == str(out / "checkpoint-1000")

    ran = []
    monkeypatch.setattr(pipeline, "_run", ran.append)
    (out / "config.json").write_text("{}")
    pipeline._train(cfg, "pretrain", {"output_dir": str(out)})
    assert len(ran) == 1 and sorted(os.listdir(out)) == ["config.json"]


def test_shipped_reports_name_paths_relative_to_the_testbed_folder(tmp_path):
    from ivtp.testbed.pipeline import relative_to

    out = str(tmp_path / "testbed")
    rows = [{"config": {"llm": {"aligner": {"pretrained": os.path.join(out, "clip", "aligner.safetensors")}}},
             "name": "ivtp", "tokens": 7, "other": [os.path.join(str(tmp_path), "elsewhere.json"), out + "-smoke/x"]}]
    shipped = relative_to(rows, out + os.sep)  # a trailing separator names the same folder
    assert shipped[0]["config"]["llm"]["aligner"]["pretrained"] == os.path.join("clip", "aligner.safetensors")
    # paths outside the folder, including a sibling whose name only starts the same, stay as they were
    assert shipped[0]["other"] == rows[0]["other"] and shipped[0]["name"] == "ivtp" and shipped[0]["tokens"] == 7


def test_retraining_as_an_extension_goes_to_its_own_folder(tmp_path, monkeypatch):
    """`--retrain-as early:clip` retrains into llava-ivtp-early_clip with that extension's config at the recipe's
    budget, beside (not over) the paper's llava-ivtp; a form that is not an extension stops before any work."""
    from ivtp.testbed.configs import extension_config

    cfg = pipeline.TestbedConfig.smoke()
    trained = []
    monkeypatch.setattr(pipeline, "_train", lambda cfg, script, args: trained.append(args))
    monkeypatch.setattr(pipeline, "attach_aligner", lambda out, model_dir: os.makedirs(os.path.join(out, model_dir)))
    pipeline.stage_retrain(cfg, str(tmp_path), "early:clip")
    pipeline.stage_retrain(cfg, str(tmp_path))
    assert [os.path.basename(a["output_dir"]) for a in trained] == ["llava-ivtp-early_clip", "llava-ivtp"]
    import yaml

    with open(trained[0]["prune_config"]) as f:
        written = yaml.safe_load(f)
    aligner = os.path.join(str(tmp_path), "clip", "aligner.safetensors")
    assert written == extension_config("early:clip", cfg.retrain_tokens, cfg.llm_layers, aligner).to_dict()
    assert written["llm"]["layers"] == 1 and written["vision"]["keep"] == 28 and written["llm"]["keep"] == 7
    with open(trained[1]["prune_config"]) as f:
        assert yaml.safe_load(f)["llm"]["layers"] == 3  # the paper's form

    with pytest.raises(SystemExit) as e:
        pipeline.main(["--out", str(tmp_path / "x"), "--retrain-as", "early:clever"])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "x")
    with pytest.raises(SystemExit, match="is not trained"):
        pipeline.ship(str(tmp_path / "x"), str(tmp_path / "dest"), retrained="early:question")


def test_retrain_as_best_names_the_best_extension(tmp_path, monkeypatch):
    """`--retrain-as best` (make testbed) is BEST_EXTENSION, for the stage and for --ship; folder names are safe."""
    from ivtp.testbed.configs import BEST_EXTENSION

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda out, cfg, stages, force, retrain_as: seen.update(run=retrain_as))
    monkeypatch.setattr(pipeline, "ship", lambda out, dest, retrained: seen.update(ship=retrained) or {})
    pipeline.main(["--out", str(tmp_path / "a"), "--stages", "retrain", "--retrain-as", "best"])
    pipeline.main(["--out", str(tmp_path / "a"), "--ship", str(tmp_path / "d"), "--retrain-as", "best"])
    assert seen == {"run": BEST_EXTENSION, "ship": BEST_EXTENSION}
    assert pipeline.retrain_dir("llm_only@1:clip") == "llava-ivtp-llm_only_1_clip"
    assert pipeline.retrain_dir("paper:question+own_rows") == "llava-ivtp-paper_question_own_rows"
