"""ivtp.testbed.projectors: the trained compressors on a smoke-sized testbed (the pipeline's pretrain and finetune
arguments with --projector), and their rows in `ivtp ablate`'s methods suite."""

import json
import os

import pytest
import torch
from conftest import needs_deepspeed

from ivtp.testbed import ablate as ablate_mod
from ivtp.testbed import pipeline
from ivtp.testbed import projectors as tp

EXPECTED = {"honeybee": 9, "llama_vid": 5, "qwen_vl": 9}  # tokens per image: 3 x 3, 1 + 2 x 2, 3 x 3


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """A smoke testbed whose data, CLIP and LLM-init stages are done (about 15 s)."""
    out = str(tmp_path_factory.mktemp("testbed"))
    pipeline.run(out, pipeline.TestbedConfig.smoke(), stages=("data", "clip", "llm_init"))
    return out


def in_process(argv: list[str]) -> None:
    """pipeline._run without the DeepSpeed launcher: the same train/*.py arguments, run here (seconds, not a
    launch per stage; `make testbed-smoke` and test_deepspeed_stage run the launcher)."""
    from ivtp.training import run

    script = next(a for a in argv if a.endswith(".py"))
    args = argv[argv.index(script) + 1:]
    del args[args.index("--deepspeed"):args.index("--deepspeed") + 2]
    template, tune = ("plain", "projector") if script.endswith("pretrain.py") else ("vicuna_v1", "projector+llm")
    run(args, template=template, tune=tune)


def check_checkpoint(folder: str, name: str, tokens: int) -> None:
    """The folder loads back with its compressor, its processor writes `tokens` placeholders, and it answers."""
    from PIL import Image

    from ivtp.data.templates import vicuna_v1_prompt
    from ivtp.models import load_model
    from ivtp.projectors import PROJECTORS, image_tokens

    model, processor = load_model(folder)
    assert type(model.model.multi_modal_projector) is PROJECTORS[name]
    assert image_tokens(model.config) == tokens == model.config.ivtp_projector["tokens_per_image"]
    inputs = processor(text=[vicuna_v1_prompt("What colour is the square?", has_image=True)],
                       images=[Image.new("RGB", (112, 112), (200, 30, 30))], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", tp.PROJECTORS)
def test_stages_train_a_checkpoint_with_the_testbed_token_count(testbed, monkeypatch, name):
    ran = []
    monkeypatch.setattr(pipeline, "_run", lambda argv: (ran.append(argv), in_process(argv)))
    cfg = tp.load_recipe(testbed, [])
    assert cfg == pipeline.TestbedConfig.smoke()  # testbed.json, read back
    timings = tp.run(testbed, cfg, {name: tp.TOKENS[name]}, progress=False)
    assert list(timings) == [f"{name}/pretrain", f"{name}/finetune"]
    # the pipeline's own stage arguments, with the compressor added
    pre, fine = ran
    assert pre[pre.index("--projector") + 1] == name == fine[fine.index("--projector") + 1]
    assert pre[pre.index("--learning_rate") + 1] == str(cfg.pretrain_lr)
    assert fine[fine.index("--model_name_or_path") + 1] == os.path.join(testbed, f"pretrain-{name}")
    assert fine[fine.index("--group_by_modality_length") + 1] == "True"
    folder = os.path.join(testbed, f"llava-{name}")
    assert tp.is_done(testbed, name) and not any(n.startswith("checkpoint-") for n in os.listdir(folder))
    record = json.load(open(os.path.join(folder, tp.RECORD)))
    assert record["tokens_per_image"] == EXPECTED[name] and record["recipe"]["batch_size"] == cfg.batch_size
    check_checkpoint(folder, name, EXPECTED[name])
    assert tp.run(testbed, cfg, {name: tp.TOKENS[name]}, progress=False) == {}  # done: skipped
    assert len(ran) == 2


def test_ablate_reports_the_trained_projectors_beside_the_methods(testbed, tmp_path, monkeypatch, capsys):
    """Rows for the trained compressors (after IVTP retrained at 7 tokens), in the table and the plot; the real
    evaluation of one of them; a projector not trained is a one-line note, not a failure."""
    found, missing = tp.trained_projectors(testbed)
    if len(found) < len(tp.PROJECTORS):
        pytest.skip("needs the three trained by test_stages_train_a_checkpoint_with_the_testbed_token_count")
    assert {n: t for n, (_, t) in found.items()} == EXPECTED and missing == []
    rows = ablate_mod.plan_rows(("methods",), (4, 7, 14), "/x/a.safetensors", 6, retrained=True,
                                projectors={n: t for n, (_, t) in found.items()})
    names = [(r.model, r.name, r.tokens) for r in rows]
    at = names.index(("retrained", "ivtp", 7))
    assert names[at + 1:at + 4] == [(f"llava-{n}", n, EXPECTED[n]) for n in tp.PROJECTORS]
    assert all(r.config is None for r in rows[at + 1:at + 4])  # unpruned: the compressor sets the tokens
    keys = list(dict.fromkeys((r.model, r.name) for r in rows if r.tokens))
    assert len(set(ablate_mod.line_colours(len(keys)))) == len(keys)  # every point and line its own colour

    # the real evaluation of one row: unpruned, its own token count, every question type
    data = os.path.join(testbed, "data", "eval")
    row = rows[at + 3]
    metrics = ablate_mod.run_row(row, found[row.name][0], data, str(tmp_path / "eval"), limit=6, batch_size=4,
                                 pope_images=2)
    assert metrics["mean_final_visual_tokens"] == EXPECTED["qwen_vl"]
    assert "accuracy" in metrics["gqa"] and metrics["gqa_by_type"] and "overall" in metrics["pope"]

    # the whole sweep, with the evaluation stubbed, in a copy of the testbed missing one projector
    copy = tmp_path / "tb"
    copy.mkdir()
    for item in ("testbed.json", "data", "clip", "llava-honeybee", "llava-qwen_vl"):
        os.symlink(os.path.join(testbed, item), copy / item)
    (copy / "llava").mkdir()
    (copy / "llava" / "config.json").write_text("{}")
    seen = {}

    def fake_run_row(row, model_dir, *args, **kwargs):
        seen[(row.model, row.name, row.tokens)] = model_dir
        acc = 50.0 + len(seen)
        return {"gqa": {"accuracy": acc}, "gqa_by_type": {q: acc for q in ablate_mod.QTYPES},
                "pope": {"overall": {"f1": 60.0}}, "mean_final_visual_tokens": row.tokens}

    monkeypatch.setattr(ablate_mod, "run_row", fake_run_row)
    capsys.readouterr()
    rows = ablate_mod.ablate(str(copy), str(tmp_path / "out"), suites=("methods",), budgets=(7,), progress=False)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no trained llama_vid" in err and "make testbed-projectors" in err
    assert seen[("llava-honeybee", "honeybee", 9)] == str(copy / "llava-honeybee")
    assert not any(name == "llama_vid" for _, name, _ in seen)
    text = open(tmp_path / "out" / "ablate.md").read()
    assert "| llava-qwen_vl | qwen_vl | 9 |" in text and f"llava-honeybee = {copy / 'llava-honeybee'}" in text
    assert os.path.getsize(tmp_path / "out" / "ablate_methods.png") > 10000
    assert [r.name for r in rows][-2:] == ["honeybee", "qwen_vl"]  # after the methods at 7 (no retrained model)


@needs_deepspeed
def test_deepspeed_stage_through_the_cli(testbed, tmp_path):
    """The command itself, through the DeepSpeed launcher as the pipeline's stages run (about 40 s)."""
    out = tmp_path / "tb"
    out.mkdir()
    for item in ("testbed.json", "data", "clip", "llm-init"):
        os.symlink(os.path.join(testbed, item), out / item)
    assert tp.main(["--out", str(out), "--projectors", "llama_vid", "--set", "pretrain_epochs=0.25",
                    "--set", "finetune_epochs=0.25", "--tokens", "llama_vid=1"]) == 0
    record = json.load(open(out / "llava-llama_vid" / tp.RECORD))
    assert record["recipe"]["pretrain_epochs"] == 0.25 and record["tokens_per_image"] == 2
    check_checkpoint(str(out / "llava-llama_vid"), "llama_vid", 2)


@pytest.mark.parametrize("argv, message", [
    (["--projectors", "perceiver"], "--projectors perceiver: choose from honeybee, llama_vid, qwen_vl"),
    (["--set", "llm_hidden=64"], "--set llm_hidden: fixed by the stages that built"),
    (["--set", "finetune_epoch=2"], "--set finetune_epoch: not a TestbedConfig field"),
    (["--set", "finetune_epochs=many"], "--set finetune_epochs=many"),
    (["--tokens", "honeybee=7"], "--tokens honeybee=7: honeybee: honeybee's num_tokens must be a square number"),
    (["--tokens", "llama_vid=6"], "llama_vid's num_tokens (content tokens) must be a square number"),
    (["--tokens", "qwen_vl=x"], "--tokens qwen_vl=x: expected NAME=N"),
    (["--projectors", "honeybee", "--tokens", "qwen_vl=4"], "'qwen_vl' is not one of the projectors trained here"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(testbed, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        tp.main(["--out", testbed, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err[-1]


def test_an_unbuilt_testbed_or_a_folder_at_another_count_is_refused(testbed, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tp.main(["--out", str(tmp_path)])
    assert e.value.code == 2 and "data stage is not done" in capsys.readouterr().err
    out = tmp_path / "tb"
    out.mkdir()
    for item in ("testbed.json", "data", "clip", "llm-init"):
        os.symlink(os.path.join(testbed, item), out / item)
    (out / "pretrain-qwen_vl").mkdir()
    (out / "pretrain-qwen_vl" / "config.json").write_text(json.dumps({"ivtp_projector": {"num_tokens": 4}}))
    with pytest.raises(SystemExit) as e:
        tp.main(["--out", str(out), "--projectors", "qwen_vl"])
    assert e.value.code == 2 and "holds qwen_vl at 4 tokens, not 9; --force" in capsys.readouterr().err
