"""Bad input as a new user gives it (issue 22): one line on stderr, exit code 2, and nothing loaded, computed or
written before the check. Each test feeds one case of the issue."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import ivtp.inference
import ivtp.models
from ivtp.cli import main
from ivtp.data.shapes import draw_scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "data", "fixtures")


def fails_in_one_line(capsys, argv, *fragments) -> str:
    """Run `ivtp argv`; assert exit code 2 and a single stderr line holding every fragment; return that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is an error: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ivtp.models, "load_model", refuse)


@pytest.fixture
def no_compute(monkeypatch):
    """Running the model is an error (generate's own checks still run: they come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("generation ran before the input was checked")

    monkeypatch.setattr(ivtp.inference, "_generate_batch", refuse)


@pytest.fixture
def scene(tmp_path):
    path = tmp_path / "scene.png"
    draw_scene(seed=1)[0].save(path)
    return str(path)


# ---- the model ------------------------------------------------------------------------------------------------
def test_a_misspelt_preset_lists_the_presets_and_suggests_one(capsys, no_model):
    line = fails_in_one_line(capsys, ["generate", "--model", "tiny-randon", "--prompt", "Hi", "--image", "none"],
                             "'tiny-randon' is neither a preset", "did you mean tiny-random?")
    for preset in ivtp.models.PRESETS:
        assert preset in line


def test_a_folder_that_does_not_exist_is_named(capsys, no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()  # its parent exists: a path, not a hub id (no hub round trip)
    for name in ("ckpts/llava-ft", str(tmp_path / "nowhere" / "model"), "./model"):
        fails_in_one_line(capsys, ["generate", "--model", name, "--prompt", "Hi", "--image", "none"],
                          f"model {name!r} is neither a preset", "nor a local llava-hf folder")


def test_a_hub_id_that_is_not_cached_offline(capsys, no_model, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fails_in_one_line(capsys, ["generate", "--model", "someone/llava-typo", "--prompt", "Hi", "--image", "none"],
                      "nor a hub id in the HF cache")
    fails_in_one_line(capsys, ["generate", "--model", "llava-1.5-7b", "--prompt", "Hi", "--image", "none"],
                      "preset llava-1.5-7b", "not in the HF cache", "--random-weights")


def test_a_checkpoint_folder_without_weights(capsys, no_model, tmp_path):
    model, processor = ivtp.models.tiny_random(image_size=112)
    model.config.save_pretrained(tmp_path)  # config.json only: an interrupted save
    fails_in_one_line(capsys, ["generate", "--model", str(tmp_path), "--prompt", "Hi", "--image", "none"],
                      "has config.json but no weights")


def test_budgets_are_checked_on_the_geometry_before_the_weights(capsys, no_model, tmp_path):
    """tiny-random has 576 patches; a stage-1 budget of 600 fails from config.json alone, before any load."""
    config = tmp_path / "big.yaml"
    config.write_text("vision:\n  keep: 600\nllm:\n  keep: 64\n")
    fails_in_one_line(capsys, ["generate", "--prune-config", str(config), "--prompt", "Hi", "--image", "none"],
                      "600")
    model, processor = ivtp.models.tiny_random(image_size=112)  # a folder: 64 patches, read from its config.json
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # transformers' progress bar while saving
    config.write_text("vision:\n  keep: 128\nllm:\n  keep: 64\n")
    fails_in_one_line(capsys, ["generate", "--model", str(tmp_path / "m"), "--prune-config", str(config),
                               "--prompt", "Hi", "--image", "none"], "128")


# ---- the prune config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ("", "is empty"),
    ("   \n# nothing set\n", "is empty"),
    ("llm:\n  keep: [1\n", "is not valid YAML at line"),
    ("vision: {keep: 64\n", "is not valid YAML"),
])
def test_an_empty_or_invalid_yaml_prune_config(capsys, no_model, tmp_path, text, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    fails_in_one_line(capsys, ["generate", "--prune-config", str(path), "--prompt", "Hi", "--image", "none"],
                      str(path), fragment)


@pytest.mark.parametrize("text, fragment", [("", "is empty"), ("{", "is not valid JSON")])
def test_an_empty_or_invalid_json_prune_config(capsys, no_model, tmp_path, text, fragment):
    path = tmp_path / "config.json"
    path.write_text(text)
    fails_in_one_line(capsys, ["generate", "--prune-config", str(path), "--prompt", "Hi", "--image", "none"],
                      fragment)


# ---- prompts and images ---------------------------------------------------------------------------------------
def test_image_placeholder_in_a_cli_prompt(capsys, no_model, scene):
    fails_in_one_line(capsys, ["generate", "--image", scene, "--prompt", "<image>\nWhat is this?"],
                      "--prompt 1 contains <image>")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_a_corrupt_image(capsys, no_model, scene, tmp_path, content):
    bad = tmp_path / "bad.png"
    data = open(scene, "rb").read()
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    fails_in_one_line(capsys, ["generate", "--image", str(bad), "--prompt", "What is this?"],
                      f"cannot read image {bad}")


def test_unpaired_images_and_prompts(capsys, no_model, scene):
    fails_in_one_line(capsys, ["generate", "--image", scene, "--prompt", "a", "--prompt", "b"], "in pairs")
    fails_in_one_line(capsys, ["generate", "--image", scene], "at least one --prompt")


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--prompt", "a", "--batch-size", "0"], "--batch-size"),
    (["visualize", "--prompt", "a", "--batch-size", "-2"], "--batch-size"),
    (["generate", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "a", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["eval", "--benchmark", "pope", "--data", "x", "--limit", "0"], "--limit"),
    (["eval", "--benchmark", "pope", "--data", "x", "--batch-size", "0"], "--batch-size"),
    (["eval", "--benchmark", "pope", "--data", "x", "--num-chunks", "0"], "--num-chunks"),
    (["eval", "--benchmark", "pope", "--data", "x", "--chunk-idx", "-1"], "--chunk-idx"),
    (["bench", "--batch-size", "0"], "--batch-size"),
    (["flops", "--visual-tokens", "zero"], "--visual-tokens"),
])
def test_counts_below_one_are_usage_errors(capsys, no_model, argv, fragment):
    line = fails_in_one_line(capsys, argv, fragment, "expected a whole number")
    assert line.startswith(f"ivtp {argv[0]}: error:")


def test_chunk_index_out_of_range(capsys, no_model, no_compute):
    data = os.path.join(FIXTURES, "eval", "pope")
    fails_in_one_line(capsys, ["eval", "--benchmark", "pope", "--data", data, "--num-chunks", "4", "--chunk-idx", "4"],
                      "--chunk-idx 4 is not a chunk of --num-chunks 4 (0 to 3)")
    fails_in_one_line(capsys, ["eval", "--benchmark", "pope", "--data", data, "--chunk-idx", "1"],
                      "--chunk-idx needs --num-chunks")


def test_a_prompt_longer_than_the_models_positions_is_refused(capsys, no_compute, scene):
    """tiny-random has 2,048 positions; 576 image tokens plus this question are 5,601 tokens."""
    question = "Describe " + "every shape " * 2500
    line = fails_in_one_line(capsys, ["generate", "--image", scene, "--prompt", question],
                             "prompt 1 is", "with its image, more than the model's 2048 positions")
    assert int(line.split(" is ")[1].split()[0]) > 2048


def test_on_llava_next_the_prompt_check_counts_what_the_llm_reads(capsys, no_compute, scene):
    """A 336 px square on tiny-random-next: 2 crops, the stock layout's 1,176 tokens unpruned (the base view's 576,
    24 rows of 24 + a newline); IVTP hands on 64 per crop. About 1,030 text tokens fit beside 128, not 1,176."""
    question = "Describe " + "every shape " * 200
    argv = ["generate", "--model", "tiny-random-next", "--image", scene, "--prompt", question]
    line = fails_in_one_line(capsys, argv + ["--prune-config", "none"], "prompt 1 is", "with its image")
    assert int(line.split(" is ")[1].split()[0]) > 2048
    with pytest.raises(AssertionError, match="generation ran"):  # pruned, it fits: generation is reached
        main(argv + ["--method", "ivtp"])


def test_a_long_thin_image_is_bounded_and_answers_as_the_stock_processor_would(monkeypatch):
    """A 10000x1 image took 9 GB in the processor (CLIP's shortest-edge resize makes it 3,360,000x336). The cut
    keeps the central crop the processor keeps: the pixels it outputs are unchanged."""
    import resource

    from ivtp.data.llava import MAX_CROP_ASPECT, MAX_IMAGE_SIDE, prepare_image

    processor = ivtp.models.build_processor(ivtp.models.tiny_tokenizer(), 336, 14).image_processor
    wide = Image.effect_noise((2400, 100), 60).convert("RGB")  # aspect 24: past the bound, still cheap stock
    cut = prepare_image(wide)
    assert cut.size == (MAX_CROP_ASPECT * 100, 100)
    stock = processor(images=wide, return_tensors="pt")["pixel_values"]
    assert (processor(images=cut, return_tensors="pt")["pixel_values"] == stock).all()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for size in ((10000, 1), (1, 10000)):
        pixels = processor(images=ivtp.inference.load_image(Image.new("RGB", size, (9, 99, 199))),
                           return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 336, 336)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6 < 0.5  # GB (kB units on Linux)
    padded = prepare_image(Image.new("RGB", (10000, 1)), pad_fill=(1, 2, 3))  # 'pad': the canvas is bounded
    assert padded.size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    photo = Image.effect_noise((640, 480), 60).convert("RGB")  # within both bounds: untouched
    assert prepare_image(photo).tobytes() == photo.tobytes()


# ---- data check and training data -----------------------------------------------------------------------------
def _records(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_data_check_on_invalid_json(capsys, tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": 1,')
    fails_in_one_line(capsys, ["data", "check", str(path)], "is not valid JSON")


def test_data_check_reports_placeholders_that_would_crash_training(capsys, tmp_path):
    shutil.copy(os.path.join(FIXTURES, "images", "scene0.png"), tmp_path / "scene0.png")
    later = {"id": "later", "image": "scene0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "blue"}]}
    answer = {"id": "answer", "image": "scene0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "<image> red"}]}
    fine = {"id": "fine", "image": "scene0.png", "conversations": [
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "blue"}]}  # one, later: LLaVA's way
    path = _records(tmp_path, [later, answer, fine])
    assert main(["data", "check", path, "--image-folder", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == {"extra_placeholder": 1, "placeholder_in_answer": 1}
    assert report["examples"]["extra_placeholder"] == ["later: 2 <image> placeholders (turn 0, turn 2) for one image"]
    assert report["examples"]["placeholder_in_answer"] == ["answer: <image> in the gpt answer of turn 1"]


def test_training_data_with_a_bad_placeholder_fails_before_training_naming_the_record(tmp_path):
    from ivtp.data.llava import LlavaDataset, load_records
    from ivtp.data.templates import ConversationError

    records = json.load(open(os.path.join(FIXTURES, "tiny_llava.json")))
    records[2]["conversations"][2]["value"] = "<image>\n" + records[2]["conversations"][2]["value"]
    model, processor = ivtp.models.tiny_random(image_size=112)
    with pytest.raises(ConversationError, match=r"1 sample\(s\) cannot train: record 2 \(id scene2\): 2 <image> "
                                                r"placeholders \(turn 0, turn 2\)"):
        LlavaDataset(load_records(_records(tmp_path, records)), processor.tokenizer, processor.image_processor,
                     "vicuna_v1", os.path.join(FIXTURES, "images"), image_tokens=64, model_max_length=2048)


def _train_argv(out, data, config):
    return ["--model_name_or_path", "tiny-random", "--prune-config", str(config), "--data_path", data,
            "--image_folder", os.path.join(FIXTURES, "images"), "--output_dir", str(out), "--report_to", "none",
            "--use_cpu", "True", "--max_steps", "1"]


def test_train_scripts_refuse_bad_data_and_configs_in_one_line_before_the_model_loads(capsys, no_model, tmp_path):
    """train/*.py call ivtp.training.main: a bad data file or prune config is one line and exit code 2, found
    before the model (minutes for a 7B) loads, with nothing written."""
    from ivtp.training import main as train_main

    def fails(argv, *fragments):
        with pytest.raises(SystemExit) as e:
            train_main(argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 2, lines
        assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines[-1]
        assert all("examples/s" in line for line in lines[:-1]), lines  # above it, only datasets' progress

    records = json.load(open(os.path.join(FIXTURES, "tiny_llava.json")))
    records[3]["conversations"][1]["value"] += " <image>"
    bad_data = _records(tmp_path, records)
    config = os.path.join(ROOT, "configs", "ivtp_64.yaml")
    out = tmp_path / "out"
    fails(_train_argv(out, bad_data, config), f"record 3 (id {records[3]['id']})", "in the gpt answer")
    torn = tmp_path / "torn.json"
    torn.write_text('[{"id": "a", "conversations": [')
    fails(_train_argv(out, str(torn), config), "cannot be read as LLaVA JSON")
    fails(_train_argv(out, str(tmp_path / "none.json"), config), "data file not found")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    fails(_train_argv(out, os.path.join(FIXTURES, "tiny_llava.json"), empty), "is empty")
    big = tmp_path / "big.yaml"
    big.write_text("vision:\n  keep: 600\n")
    fails(_train_argv(out, os.path.join(FIXTURES, "tiny_llava.json"), big), "600")
    assert not out.exists()


# ---- eval -----------------------------------------------------------------------------------------------------
def _copy_benchmark(tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, "eval", name), folder)
    return folder


def test_eval_checks_the_answer_files_before_the_first_question(capsys, no_model, no_compute, tmp_path):
    gqa = _copy_benchmark(tmp_path, "gqa")
    (gqa / "data" / "testdev_balanced_questions.json").write_text('{"201": {"answer": ')
    out = tmp_path / "out"
    fails_in_one_line(capsys, ["eval", "--benchmark", "gqa", "--data", str(gqa), "--out", str(out)],
                      "testdev_balanced_questions.json is not valid JSON")
    pope = _copy_benchmark(tmp_path, "pope")
    path = pope / "coco" / "coco_pope_random.json"
    rows = [json.loads(line) for line in open(path)]
    del rows[0]["label"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails_in_one_line(capsys, ["eval", "--benchmark", "pope", "--data", str(pope), "--out", str(out)],
                      "coco_pope_random.json line 1 lacks key(s)", "label")
    assert not out.exists()  # not even run.json


def test_eval_without_gqas_answer_file_writes_predictions_unscored(monkeypatch, tmp_path):
    """GQA's answers may be left out (its eval.py grades the submission): the run is not refused for it."""
    from ivtp.eval.benchmarks import get_benchmark
    from ivtp.eval.runner import check_scoring, load_items

    gqa = _copy_benchmark(tmp_path, "gqa")
    os.remove(gqa / "data" / "testdev_balanced_questions.json")
    items = load_items(get_benchmark("gqa"), str(gqa), None)
    check_scoring(get_benchmark("gqa"), str(gqa), items)
    assert get_benchmark("gqa").score(str(gqa), items, {it.id: "" for it in items}) is None


def _corrupt_first_image(folder, subdir):
    question = json.loads(open(next(folder.glob("llava_*.jsonl"))).readline())
    (folder / subdir / question["image"]).write_bytes(b"\x89PNG broken")
    return str(question["question_id"])


def test_eval_stops_at_a_corrupt_image_naming_its_question(capsys, tmp_path):
    pope = _copy_benchmark(tmp_path, "pope")
    qid = _corrupt_first_image(pope, "val2014")
    out = tmp_path / "out"
    fails_in_one_line(capsys, ["eval", "--benchmark", "pope", "--data", str(pope), "--out", str(out),
                               "--max-new-tokens", "2"], f"pope question {qid}: cannot read image",
                      "--on-bad-image skip")
    assert not (out / "predictions.jsonl").exists()  # found from its header, before any question


def test_eval_stops_at_an_image_cut_short_keeping_the_answers_before_it(capsys, tmp_path):
    """A JPEG whose header is intact but whose pixels are cut off passes the header check and fails only when
    decoded, mid-run: the batch before it is saved, and the error is the last line, after the progress bar."""
    pope = _copy_benchmark(tmp_path, "pope")
    questions = [json.loads(line) for line in open(pope / "llava_pope_test.jsonl")]
    image = pope / "val2014" / questions[2]["image"]
    Image.effect_noise((336, 336), 60).convert("RGB").save(image, quality=95)  # pixels well past the header
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert Image.open(image).size == (336, 336)  # the header still reads
    out = tmp_path / "out"
    code = main(["eval", "--benchmark", "pope", "--data", str(pope), "--out", str(out), "--max-new-tokens", "2",
                 "--batch-size", "2"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert lines[-1].startswith(f"error: pope question {questions[2]['question_id']}: cannot read image {image}")
    assert not any(line.startswith("error") or "Traceback" in line for line in lines[:-1])
    answered = [json.loads(line)["question_id"] for line in open(out / "predictions.jsonl")]
    assert answered == [str(q["question_id"]) for q in questions[:2]]


def test_eval_skips_a_corrupt_image_when_asked_and_says_so(capsys, tmp_path):
    pope = _copy_benchmark(tmp_path, "pope")
    qid = _corrupt_first_image(pope, "val2014")
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "pope", "--data", str(pope), "--out", str(out), "--max-new-tokens", "2",
            "--on-bad-image", "skip"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"skipped 1 question(s) with unreadable images, scored as wrong: {qid}" in printed
    result = json.load(open(out / "results.json"))
    assert result["skipped"] == {"questions": 1, "reason": "unreadable image", "scored_as": "wrong",
                                 "question_ids": [qid]}
    assert result["metrics"]["overall"]["n"] == result["questions"]  # in the denominator, as a wrong answer
    rows = {r["question_id"]: r for r in map(json.loads, open(out / "predictions.jsonl"))}
    assert rows[qid]["text"] == "" and "cannot read image" in rows[qid]["skipped"]


# ---- speed of the entry point ---------------------------------------------------------------------------------
def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    """`ivtp --help` took 11.6 s of CPU time importing torch and transformers before parsing."""
    code = ("import sys\nfrom ivtp.cli import build_parser\nbuild_parser()\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(m for m in sys.modules if "
            "m.split('.')[0] in ('torch', 'transformers'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv, fragments", [
    (["--method", "sparsevlm", "--compile"], ["sparsevlm", "data-dependent number of tokens"]),
    (["--prune-config", "none", "--compile"], ["--compile compiles the pruned prefill"]),
    (["--compile-mode", "reduce-overhead"], ["--compile-mode and --compile-bucket need --compile"]),
])
def test_compile_that_cannot_run_is_refused_before_the_model_loads(capsys, no_model, scene, argv, fragments):
    fails_in_one_line(capsys, ["generate", "--image", scene, "--prompt", "What is it?", *argv], *fragments)


def test_generate_with_compile_answers_as_eager(capsys, scene):
    """The CLI's --compile reaches the model: the same answer and kept tokens, traced as one graph."""
    runs = []
    for extra in ([], ["--compile", "eager", "--compile-bucket", "16"]):
        assert main(["generate", "--image", scene, "--prompt", "What is it?", "--max-new-tokens", "3", "--json",
                     "--method", "ivtp", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        runs.append((out["answers"], [s["kept_patches"] for s in out["samples"]]))
    assert runs[0] == runs[1]
