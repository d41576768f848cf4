"""`ivtp eval` runs: append-and-resume, interrupted writes, sharding and merging, run settings, and one run end to
end with the tiny pruned model."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest

import ivtp.inference
from ivtp.cli import main
from ivtp.eval.benchmarks import BenchmarkDataError, get_benchmark
from ivtp.eval.runner import chunk_of, evaluate, prediction_path, read_predictions
from ivtp.inference import Result

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "data", "fixtures", "eval")
PROCESSOR = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5, 0.5, 0.5]))
RUN = {"benchmark": "pope", "model": "fake", "model_id": "fake", "prune_config": None, "max_new_tokens": 4,
       "image_aspect_ratio": "pad"}


@pytest.fixture(autouse=True)
def no_prompt_check_without_a_model(monkeypatch):
    """These runs fake the model (None) and generate; check_prompts needs a real model's tokenizer and config."""
    real = ivtp.inference.check_prompts
    monkeypatch.setattr(ivtp.inference, "check_prompts", lambda model, *a, **k: model and real(model, *a, **k))


class FakeGenerate:
    """Stands in for ivtp.inference.generate: answers 'yes' to even question ids and records what it was asked;
    raises after `fail_after` calls, as a killed job would stop."""

    def __init__(self, fail_after=None):
        self.prompts, self.sizes, self.fail_after = [], [], fail_after

    def __call__(self, model, processor, samples, max_new_tokens, batch_size):
        if self.fail_after is not None and len(self.sizes) >= self.fail_after:
            raise KeyboardInterrupt
        self.sizes.append(tuple(s.image.size for s in samples))
        self.prompts.extend(s.prompt for s in samples)
        return [Result(s.prompt, None, "Yes" if "dog" in s.prompt else "No", [576, 128, 64]) for s in samples]


def run(monkeypatch, out, fake, **kw):
    monkeypatch.setattr(ivtp.inference, "generate", fake)
    bench = get_benchmark("pope")
    return evaluate(None, PROCESSOR, bench, os.path.join(FIXTURES, "pope"), str(out), dict(RUN), progress=False,
                    **kw)


def lines(path):
    return [json.loads(line) for line in open(path)]


def test_chunks_cover_items_like_llava():
    items = list(range(10))
    assert [chunk_of(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_of(items, 1, 0) == items
    with pytest.raises(ValueError, match="chunk index 3 is not in"):
        chunk_of(items, 3, 3)


def test_run_scores_and_pads_images(monkeypatch, tmp_path):
    fake = FakeGenerate()
    summary = run(monkeypatch, tmp_path, fake, batch_size=4)
    assert fake.sizes == [((56, 56),) * 4, ((56, 56),) * 2]  # 56x40 images padded to squares
    result = summary["result"]
    # The fake says yes exactly to the dog questions, which are the positives: a perfect score.
    assert result["metrics"]["overall"]["accuracy"] == 100.0
    assert result["mean_final_visual_tokens"] == 64
    assert json.load(open(tmp_path / "results.json"))["metrics"] == result["metrics"]


def test_resume_after_interruption_loses_and_repeats_nothing(monkeypatch, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(monkeypatch, tmp_path, FakeGenerate(fail_after=1), batch_size=2)
    path = prediction_path(str(tmp_path), 1, 0)
    assert [r["question_id"] for r in lines(path)] == ["1", "2"]  # the finished batch was kept
    assert not (tmp_path / "results.json").exists()
    with open(path, "a") as f:  # a write cut off mid-line by the kill
        f.write('{"benchmark": "pope", "question_id": "3", "te')
    fake = FakeGenerate()
    summary = run(monkeypatch, tmp_path, fake, batch_size=2)
    assert len(fake.prompts) == 4 and summary["answered_now"] == 4  # only the unanswered questions
    assert [r["question_id"] for r in lines(path)] == ["1", "2", "3", "4", "5", "6"]
    assert summary["result"]["metrics"]["overall"]["n"] == 6
    again = FakeGenerate()
    assert run(monkeypatch, tmp_path, again)["answered_now"] == 0 and again.prompts == []


def test_shards_merge_into_one_result(monkeypatch, tmp_path):
    first = run(monkeypatch, tmp_path / "sharded", FakeGenerate(), num_chunks=2, chunk_idx=1)
    assert first["result"] is None  # chunk 0 still missing
    second = run(monkeypatch, tmp_path / "sharded", FakeGenerate(), num_chunks=2, chunk_idx=0)
    single = run(monkeypatch, tmp_path / "single", FakeGenerate())
    assert second["result"]["metrics"] == single["result"]["metrics"]
    merged = lines(tmp_path / "sharded" / "predictions.jsonl")
    assert [r["question_id"] for r in merged] == [r["question_id"] for r in lines(tmp_path / "single" /
                                                                                    "predictions.jsonl")]
    assert os.path.exists(tmp_path / "sharded" / "chunks" / "2_0.jsonl")


def test_other_settings_or_benchmark_in_the_same_folder_refused(monkeypatch, tmp_path):
    run(monkeypatch, tmp_path, FakeGenerate())
    monkeypatch.setattr(ivtp.inference, "generate", FakeGenerate())
    other = dict(RUN, prune_config={"method": "topk"})
    with pytest.raises(BenchmarkDataError, match="holds a run with other settings \\(prune_config differ"):
        evaluate(None, PROCESSOR, get_benchmark("pope"), os.path.join(FIXTURES, "pope"), str(tmp_path), other)
    with pytest.raises(BenchmarkDataError, match="predictions.jsonl holds predictions for benchmark 'pope', not "
                                                 "'gqa'"):
        read_predictions(str(tmp_path / "predictions.jsonl"), "gqa")


def test_corrupt_middle_line_is_an_error_not_a_loss(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"benchmark": "pope", "question_id": "1", "text": "yes"}\nnot json\n'
                    '{"benchmark": "pope", "question_id": "2", "text": "no"}\n')
    with pytest.raises(BenchmarkDataError, match="predictions.jsonl line 2 is not valid JSON"):
        read_predictions(str(path), "pope", repair=True)
    assert path.read_text().count("\n") == 3  # nothing was cut


def test_missing_image_fails_before_generation(monkeypatch, tmp_path):
    root = tmp_path / "pope"
    shutil.copytree(os.path.join(FIXTURES, "pope"), root)
    os.remove(root / "val2014" / "COCO_val2014_000000000004.jpg")
    fake = FakeGenerate()
    monkeypatch.setattr(ivtp.inference, "generate", fake)
    with pytest.raises(BenchmarkDataError, match="1 image\\(s\\) missing, e.g. .*COCO_val2014_000000000004.jpg"):
        evaluate(None, PROCESSOR, get_benchmark("pope"), str(root), str(tmp_path / "out"), dict(RUN))
    assert fake.prompts == []


def test_cli_eval_end_to_end_with_pruned_model(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "mmbench", "--data", os.path.join(FIXTURES, "mmbench"), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "4", "--limit", "5", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    result = summary["result"]
    assert result["questions"] == 5 and summary["answered_now"] == 5
    assert set(result["metrics"]) >= {"accuracy", "circular", "vanilla"}
    rows = lines(out / "predictions.jsonl")
    assert all(r["visual_tokens"][0] == 576 and r["visual_tokens"][-1] == 64 for r in rows)  # pruned 576 -> 64
    run_info = json.load(open(out / "run.json"))
    assert run_info["prune_config"]["method"] == "ivtp" and run_info["max_new_tokens"] == 2
    assert main(argv[:-1] + ["--score-only", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["metrics"] == result["metrics"]
    # Run again on the finished folder: nothing left to answer (the prompt checks run on an empty list).
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["answered_now"] == 0 and again["result"]["metrics"] == result["metrics"]
    # A resumed run with another budget is refused before the model loads.
    assert main(argv + ["--method", "topk"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_cli_eval_on_llava_next_tiles_each_image_and_refuses_padding(tmp_path, capsys):
    """tiny-random-next: anyres is the default (each image at its own aspect, its crops' count in the records);
    --image-aspect-ratio pad is refused before the model loads."""
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "pope", "--data", os.path.join(FIXTURES, "pope"), "--model", "tiny-random-next",
            "--out", str(out), "--max-new-tokens", "2", "--batch-size", "3", "--limit", "3", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["result"]["questions"] == 3
    assert json.load(open(out / "run.json"))["image_aspect_ratio"] == "anyres"
    rows = lines(out / "predictions.jsonl")
    assert all(r["visual_tokens"][-1] % 64 == 0 and r["visual_tokens"][-1] >= 3 * 64 for r in rows)  # 64 per crop
    assert main(argv[:-1] + ["--out", str(tmp_path / "pad"), "--image-aspect-ratio", "pad"]) == 2
    assert "LLaVA-NeXT tiles each image at its own aspect" in capsys.readouterr().err


def test_benchmark_script_runs_under_torchrun(tmp_path):
    """scripts/v1_5/eval/pope.sh TOKENS: torchrun, the method's config at that budget, merged results."""
    import subprocess
    import sys

    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               MODEL="tiny-random", EVAL_DIR=FIXTURES, OUT=str(tmp_path), DTYPE="float32", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", "scripts/v1_5/eval/pope.sh", "128", "--max-new-tokens", "1", "--device", "cpu"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.load(open(tmp_path / "pope" / "tiny-random-ivtp_128" / "results.json"))
    assert result["metrics"]["overall"]["n"] == 6 and result["mean_final_visual_tokens"] == 128
    bad = subprocess.run(["bash", "scripts/v1_5/eval/run.sh", "vqa3", "64"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark vqa3" in bad.stderr


def test_a_split_with_target_patches_reports_where_the_kept_tokens_lie(monkeypatch, tmp_path):
    """The testbed's GQA layout carries each question's target patches: results.json then has `selection`."""
    root = tmp_path / "gqa"
    shutil.copytree(os.path.join(FIXTURES, "gqa"), root)
    path = root / "data" / "testdev_balanced_questions.json"
    questions = json.load(open(path))
    ids = sorted(questions)
    for k, qid in enumerate(ids):
        questions[qid]["target_patches"] = [k, 10]
        questions[qid]["types"] = {"detailed": "colour"}
    json.dump(questions, open(path, "w"))

    def fake(model, processor, samples, max_new_tokens, batch_size):
        return [Result(s.prompt, None, "no", [64, 14, 7], kept_patches=[10, 11], stage1_patches=[10, 11, 12, 13],
                       guidance={"pseudo_cls_source": "text", "selected_tokens": [{"token": " red"}]})
                for s in samples]

    monkeypatch.setattr(ivtp.inference, "generate", fake)
    bench = get_benchmark("gqa")
    summary = evaluate(None, PROCESSOR, bench, str(root), str(tmp_path / "out"), dict(RUN, benchmark="gqa"),
                       progress=False)
    sel = summary["result"]["selection"]
    assert sel["questions"] == len(ids) and sel["aligner_fallback_rate"] == 0.0
    assert sel["kept_on_target_share"] == {"all": 0.5, "colour": 0.5}  # patch 10 of [10, 11]
    assert sel["stage1_on_target_share"]["all"] == 0.25
    line = lines(tmp_path / "out" / "predictions.jsonl")[0]
    assert line["kept_patches"] == [10, 11] and line["selected_tokens"] == [" red"]
    # A split without targets (every public one) reports none.
    assert "selection" not in run(monkeypatch, tmp_path / "pope", FakeGenerate())["result"]
