"""The 12 benchmark readers on the fixture folders (data/fixtures/eval, scripts/make_eval_fixtures.py): what they
read, the prompts LLaVA-1.5 uses, scoring of known predictions, submission files, and bad folders."""

import json
import os
import shutil

import pytest

from ivtp.eval.benchmarks import (BENCHMARKS, CHOICE_CN, CHOICE_EN, SHORT_ANSWER, BenchmarkDataError,
                                  get_benchmark)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "data", "fixtures", "eval")
EXPECTED_ITEMS = {"vqav2": 3, "gqa": 3, "vizwiz": 3, "sqa": 2, "textvqa": 3, "pope": 6, "mme": 28,
                  "mmbench": 7, "mmbench_cn": 7, "seed": 2, "llava_bench": 2, "mmvet": 2}


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_twelve_benchmarks_are_registered():
    assert sorted(BENCHMARKS) == sorted(EXPECTED_ITEMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ITEMS))
def test_fixture_loads_with_existing_images(name):
    items = get_benchmark(name).load(fixture(name))
    assert len(items) == EXPECTED_ITEMS[name]
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert "<image>" not in it.prompt
        assert callable(it.image) or os.path.isfile(it.image)


@pytest.mark.parametrize("name,suffix", [("vqav2", SHORT_ANSWER), ("gqa", SHORT_ANSWER), ("pope", SHORT_ANSWER),
                                         ("mme", SHORT_ANSWER), ("textvqa", SHORT_ANSWER), ("vizwiz", SHORT_ANSWER),
                                         ("sqa", CHOICE_EN), ("seed", CHOICE_EN), ("mmbench", CHOICE_EN),
                                         ("mmbench_cn", CHOICE_CN)])
def test_prompts_end_with_llava_instruction_once(name, suffix):
    for it in get_benchmark(name).load(fixture(name)):
        assert it.prompt.endswith("\n" + suffix)
        assert it.prompt.count(suffix) == 1


def test_vizwiz_prompt_has_unanswerable_instruction():
    item = get_benchmark("vizwiz").load(fixture("vizwiz"))[0]
    assert item.prompt == ("What is this?\nWhen the provided information is insufficient, respond with "
                           f"'Unanswerable'.\n{SHORT_ANSWER}")


def test_mmbench_rotates_options_and_answer():
    items = [it for it in get_benchmark("mmbench").load(fixture("mmbench")) if it.meta["index"] == "0"]
    assert [it.meta["round"] for it in items] == [0, 1, 2, 3]
    # Question 0: options red, green, blue, yellow; answer C (blue). Round r shifts the options left by r.
    assert [it.meta["answer"] for it in items] == ["C", "B", "A", "D"]
    assert items[1].prompt.split("\n")[1:5] == ["A. green", "B. blue", "C. yellow", "D. red"]
    three = [it for it in get_benchmark("mmbench").load(fixture("mmbench")) if it.meta["index"] == "1"]
    assert len(three) == 3 and three[0].prompt.startswith("Look at the shapes.\nWhich is bigger?\nA. circle")
    assert "D." not in three[0].prompt
    assert three[0].image().size == (56, 40)


def test_sqa_keeps_image_questions_with_letters():
    items = get_benchmark("sqa").load(fixture("sqa"))
    assert [it.id for it in items] == ["5", "9"]  # problem 12 has no image: not in SQA-IMG
    assert [it.meta["answer"] for it in items] == ["A", "A"]
    assert items[1].meta["letters"] == "AB"


def test_seed_takes_image_questions_only():
    items = get_benchmark("seed").load(fixture("seed"))
    assert [it.meta["question_type"] for it in items] == ["Instance Counting", "Scene Understanding"]


def test_mme_reads_both_folder_layouts():
    items = get_benchmark("mme").load(fixture("mme"))
    subtasks = {it.meta["subtask"] for it in items}
    assert {"artwork", "existence", "code_reasoning"} <= subtasks and len(subtasks) == 14
    art = [it for it in items if it.meta["subtask"] == "artwork"]
    assert [it.meta["answer"] for it in art] == ["Yes", "No"]
    assert art[0].image.endswith(os.path.join("artwork", "images", "0000.jpg"))


def _gold(name):
    """Predictions that equal the reference answers of a fixture, as free-form answers would phrase them."""
    bench = get_benchmark(name)
    items = bench.load(fixture(name))
    return bench, items


def test_scores_of_perfect_and_wrong_answers():
    bench, items = _gold("pope")
    labels = {}
    for cat in ("adversarial", "popular", "random"):
        for line in open(fixture(f"pope/coco/coco_pope_{cat}.json")):
            row = json.loads(line)
            labels[str(row["question_id"])] = row["label"]
    right = {it.id: ("Yes, there is." if labels[it.id] == "yes" else "No, there is not.") for it in items}
    scores = bench.score(fixture("pope"), items, right)
    assert scores["overall"]["accuracy"] == 100.0 and scores["overall"]["yes_ratio"] == 50.0
    always_yes = {it.id: "Yes" for it in items}
    scores = bench.score(fixture("pope"), items, always_yes)
    assert scores["random"]["accuracy"] == 50.0 and scores["random"]["recall"] == 100.0
    assert scores["random"]["precision"] == 50.0

    bench, items = _gold("gqa")
    scores = bench.score(fixture("gqa"), items, {"201": "Yes.", "202": "cup", "203": "blue"})
    assert scores["accuracy"] == pytest.approx(66.67, abs=0.01)

    bench, items = _gold("textvqa")
    # Leave-one-out over the 10 answers: "copenhagen" (3 of 10) scores (3 * 2/3 + 7 * 1) / 10 = 0.9;
    # "dakota digital" (2 of 10) scores (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    scores = bench.score(fixture("textvqa"), items, {"34602": "Dakota Digital", "34603": "copenhagen",
                                                      "34604": "22"})
    assert scores["accuracy"] == pytest.approx(100 * (0.6 + 0.9 + 1) / 3, abs=0.01)

    bench = get_benchmark("vqav2")  # the official val release: "two" -> "2" (8 of 10), "red" 2 of 10
    items = bench.load(fixture("vqav2_val"))
    scores = bench.score(fixture("vqav2_val"), items, {"10": "two", "20": "red", "30": "No"})
    assert scores["accuracy"] == pytest.approx(100 * (1 + 0.6 + 1) / 3, abs=0.01)


def test_choice_benchmarks_score_letters_and_circular():
    bench, items = _gold("mmbench")
    right = {it.id: it.meta["answer"] for it in items}
    assert bench.score(fixture("mmbench"), items, right)["accuracy"] == 100.0
    one_wrong = dict(right, **{"0/3": "A"})  # question 0 fails one rotation: circular counts it wrong
    scores = bench.score(fixture("mmbench"), items, one_wrong)
    assert scores["accuracy"] == 50.0 and scores["vanilla"] == 100.0

    bench, items = _gold("sqa")
    assert bench.score(fixture("sqa"), items, {"5": "A", "9": "B. cat"})["accuracy"] == 50.0
    bench, items = _gold("seed")
    assert bench.score(fixture("seed"), items, {"101669": "A", "101670": "D"})["accuracy"] == 100.0


def test_mme_perception_and_cognition():
    bench, items = _gold("mme")
    right = {it.id: it.meta["answer"] for it in items}
    scores = bench.score(fixture("mme"), items, right)
    assert scores["perception"] == 2000.0 and scores["cognition"] == 800.0
    art = [it.id for it in items if it.meta["subtask"] == "artwork"]
    scores = bench.score(fixture("mme"), items, dict(right, **{art[0]: "No"}))
    assert scores["subtasks"]["artwork"]["acc"] == 50.0 and scores["subtasks"]["artwork"]["acc_plus"] == 0.0
    assert scores["perception"] == 2000.0 - 150.0


def test_submission_files(tmp_path):
    bench, items = _gold("vqav2")
    paths = bench.write_outputs(fixture("vqav2"), items, {"1007": "Two.", "2007": "red", "3007": "no"},
                                str(tmp_path), "m")
    upload = json.load(open(paths[0]))
    assert upload == [{"question_id": 1007, "answer": "2"}, {"question_id": 2007, "answer": "red"},
                      {"question_id": 3007, "answer": "no"}, {"question_id": 4007, "answer": ""}]
    bench, items = _gold("vizwiz")
    upload = json.load(open(bench.write_outputs(fixture("vizwiz"), items, {it.id: "unanswerable" for it in items},
                                                str(tmp_path), "m")[0]))
    assert upload[0] == {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"}
    bench, items = _gold("mmvet")
    result = json.load(open(bench.write_outputs(fixture("mmvet"), items, {"v1_0": "hello", "v1_1": "3"},
                                                str(tmp_path), "m")[0]))
    assert result == {"v1_0": "hello", "v1_1": "3"}
    bench, items = _gold("llava_bench")
    path = bench.write_outputs(fixture("llava_bench"), items, {"0": "a photo", "1": "nothing"}, str(tmp_path), "m")[0]
    rows = [json.loads(line) for line in open(path)]
    assert [r["question_id"] for r in rows] == [0, 1] and rows[0]["text"] == "a photo" and rows[0]["model_id"] == "m"
    bench, items = _gold("mme")
    paths = bench.write_outputs(fixture("mme"), items, {it.id: "Yes" for it in items}, str(tmp_path), "m")
    assert len(paths) == 14
    line = open([p for p in paths if p.endswith("artwork.txt")][0]).readline().rstrip("\n").split("\t")
    assert line[0] == "0000.jpg" and line[2:] == ["Yes", "Yes"]


# ---------------------------------------------------------------------------------------------------- bad input
def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture(name), dst)
    return dst


def test_missing_file_is_named(tmp_path):
    root = copy_fixture("gqa", tmp_path)
    os.remove(root / "llava_gqa_testdev_balanced.jsonl")
    with pytest.raises(BenchmarkDataError, match="gqa: missing .*llava_gqa_testdev_balanced.jsonl"):
        get_benchmark("gqa").load(str(root))
    with pytest.raises(BenchmarkDataError, match="does not exist"):
        get_benchmark("pope").load(str(tmp_path / "nowhere"))
    root = copy_fixture("mme", tmp_path)
    shutil.rmtree(root / "MME_Benchmark_release_version" / "OCR")
    with pytest.raises(BenchmarkDataError, match="missing subtask folder .*OCR"):
        get_benchmark("mme").load(str(root))


def test_malformed_question_file_names_file_and_line(tmp_path):
    root = copy_fixture("pope", tmp_path)
    path = root / "llava_pope_test.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"llava_pope_test.jsonl line 3 is not valid JSON"):
        get_benchmark("pope").load(str(root))
    root = copy_fixture("mmvet", tmp_path)
    (root / "mm-vet.json").write_text('{"v1_0": {"question": "q"}}')
    with pytest.raises(BenchmarkDataError, match=r"mm-vet.json entry 'v1_0' should have keys"):
        get_benchmark("mmvet").load(str(root))


def test_file_of_another_benchmark_is_recognised(tmp_path):
    root = copy_fixture("gqa", tmp_path)
    shutil.copy(fixture("pope/coco/coco_pope_random.json"), root / "llava_gqa_testdev_balanced.jsonl")
    with pytest.raises(BenchmarkDataError, match=r"llava_gqa_testdev_balanced.jsonl is not a question file; it "
                                                 r"looks like a POPE annotation file"):
        get_benchmark("gqa").load(str(root))
    shutil.copy(fixture("seed/SEED-Bench.json"), root / "data" / "testdev_balanced_questions.json")
    with pytest.raises(BenchmarkDataError, match=r"testdev_balanced_questions.json is not a file of gqa; it looks like SEED-Bench.json"):
        get_benchmark("gqa").score(str(root), [], {})
    root = copy_fixture("textvqa", tmp_path)
    items = get_benchmark("textvqa").load(str(root))
    shutil.copy(fixture("seed/SEED-Bench.json"), root / "TextVQA_0.5.1_val.json")
    with pytest.raises(BenchmarkDataError, match=r"TextVQA_0.5.1_val.json lacks key\(s\) \['data'\].*SEED"):
        get_benchmark("textvqa").score(str(root), items, {})
    root = copy_fixture("llava_bench", tmp_path)
    shutil.copy(fixture("mmvet/mm-vet.json"), root / "questions.jsonl")
    with pytest.raises(BenchmarkDataError, match=r"questions.jsonl is one JSON document, not JSON lines; it looks like an MM-Vet entry"):
        get_benchmark("llava_bench").load(str(root))


def test_not_an_mmbench_tsv(tmp_path):
    root = tmp_path / "mmbench"
    root.mkdir()
    (root / "mmbench_dev_20230712.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(BenchmarkDataError, match="is not an MMBench TSV"):
        get_benchmark("mmbench").load(str(root))


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark 'vqa3'; benchmarks: vqav2"):
        get_benchmark("vqa3")
