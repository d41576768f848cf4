"""The testbed's configs and ablation runner: layer scaling, the oracle baseline, the POPE subset, reports."""

import json
import os

import pytest
import torch

from ivtp import PruneConfig, apply_pruning
from ivtp.testbed.ablate import (
    SUITES,
    OracleRunner,
    Row,
    key_word_hits,
    kept_jaccard,
    markdown,
    plan_rows,
    pope_subset,
    write_reports,
)
from ivtp.testbed.configs import TESTBED_METHODS, scale_layer, fit_prune_config


def test_layers_scale_to_the_testbed_llm():
    assert [scale_layer(layer, 6) for layer in (2, 8, 12, 16, 24, 31)] == [1, 2, 2, 3, 4, 5]
    vd = fit_prune_config("visiondrop", 7, 6).visiondrop.llm
    assert [stage[0] for stage in vd] == [2, 3, 4]  # 8/16/24 of 32 -> strictly increasing layers of 6
    ivtp = fit_prune_config("ivtp", 7, 6, aligner="/x/aligner.safetensors")
    assert (ivtp.vision.keep, ivtp.llm.keep, ivtp.llm.layers, ivtp.llm.group_size) == (14, 7, 3, 3)
    assert ivtp.llm.aligner.pretrained == "/x/aligner.safetensors"
    assert fit_prune_config("ivtp", 7, 6, vision={"group_size": 2}).vision.group_size == 2
    assert "sparsevlm" not in TESTBED_METHODS
    with pytest.raises(ValueError, match="sparsevlm: not run on the testbed"):
        fit_prune_config("sparsevlm", 7, 6)


def test_plan_covers_every_suite_with_valid_configs():
    rows = plan_rows(SUITES, (4, 7), "/x/a.safetensors", 6, retrained=True)
    names = {(r.suite, r.name, r.model, r.tokens) for r in rows}
    assert ("methods", "ivtp", "retrained", 7) in names and ("methods", "oracle", "finetuned", 4) in names
    assert {n for s, n, _, _ in names if s == "group"} == {f"group_size={g}" for g in (1, 2, 3, 4, 6)}
    for r in rows:
        if r.config is not None:
            PruneConfig.from_dict(r.config)  # every config is valid
    stages = {r.name: PruneConfig.from_dict(r.config) for r in rows if r.suite == "stages"}
    assert not stages["vision_only"].llm.enabled and stages["vision_only"].vision.keep == 7
    assert not stages["llm_only"].vision.enabled and stages["two_stage"].llm.enabled
    ext = {r.name: r for r in rows if r.suite == "extensions"}
    paper, early = PruneConfig.from_dict(ext["paper:clip"].config), PruneConfig.from_dict(ext["early:question"].config)
    assert paper.to_dict() == stages["two_stage"].to_dict()  # the paper's form, unchanged, is the reference row
    assert (early.vision.keep, early.llm.layers, early.llm.group_size) == (28, 1, 1)
    assert (early.llm.instruction, early.llm.relevance) == ("question", "standardised")
    # Visual tokens x LLM layers are the same for both geometries: 14 x 3 + 7 x 3 and 28 + 7 x 5.
    assert ext["early:question"].compare == "early:random" and ext["paper:random"].compare is None
    assert {r.name.split()[-1] for r in rows if r.suite == "tau_extended"} >= {"tau=0.0", "tau=1.0"}


def test_oracle_keeps_the_target_patches_then_tops_up(small_llava):
    model, processor = small_llava()  # 112 px: 64 patches
    config = PruneConfig.for_method("topk", 5)
    apply_pruning(model, config)
    mc = model.config
    oracle = OracleRunner(config.topk, mc.vision_config, mc.vision_feature_layer)
    model.ivtp_state.vision = oracle
    oracle.targets = [[9, 10, 17], list(range(20, 30))]
    pixels = torch.randn(2, 3, 112, 112)
    out = oracle.run(model.model.vision_tower, pixels, want_final_cls=False)
    kept = out.trace.kept.tolist()
    assert {9, 10, 17} <= set(kept[0]) and len(kept[0]) == 5 and kept[0] == sorted(kept[0])
    assert kept[1] == [20, 21, 22, 23, 24]  # more targets than budget: the first five


def test_pope_subset_keeps_all_three_settings(tmp_path):
    pope = tmp_path / "data" / "pope"
    (pope / "coco").mkdir(parents=True)
    (pope / "val2014").mkdir()
    qid, lines = 0, []
    for cat in ("adversarial", "popular", "random"):  # the settings one after another, as the generator writes
        for image in ("p0.png", "p1.png", "p2.png"):
            qid += 1
            lines.append(json.dumps({"question_id": qid, "image": image, "text": "q", "category": cat}))
    (pope / "llava_pope_test.jsonl").write_text("\n".join(lines) + "\n")
    dst = pope_subset(str(tmp_path / "data"), str(tmp_path / "out"), images=2)
    rows = [json.loads(line) for line in open(os.path.join(dst, "llava_pope_test.jsonl"))]
    assert [(r["category"], r["image"]) for r in rows] == [(c, i) for c in ("adversarial", "popular", "random")
                                                           for i in ("p0.png", "p1.png")]
    assert os.path.isdir(os.path.join(dst, "coco")) and os.path.isdir(os.path.join(dst, "val2014"))


def test_reports_write_tables_and_plots(tmp_path):
    def row(suite, name, tokens, acc, model="finetuned"):
        return Row(suite, name, model, tokens, metrics={"gqa": {"accuracy": acc}, "gqa_by_type": {"colour": acc},
                                                        "pope": {"overall": {"f1": 70.0, "f1_category_mean": 71.0}}})

    rows = [row("methods", "unpruned", None, 80.0), row("methods", "no_image", 0, 30.0),
            row("methods", "ivtp", 7, 60.0), row("methods", "ivtp", 14, 70.0), row("methods", "topk", 7, 50.0),
            row("methods", "ivtp", 7, 65.0, "retrained"), row("group", "group_size=2", 7, 55.0)]
    paths = write_reports(rows, str(tmp_path))
    text = open(paths["md"]).read()
    assert "| finetuned | ivtp | 7 | 60.0 | 75% | 60.0 |" in text  # 60 / 80 of the unpruned accuracy retained
    assert "| retrained | ivtp | 7 | 65.0 | 81% |" in text and "## group" in text
    assert os.path.getsize(paths["methods_png"]) > 10000 and os.path.exists(paths["ablations_png"])
    assert json.load(open(paths["json"]))[2]["name"] == "ivtp"
    assert markdown(rows).count("## ") == 2


def test_selection_columns_key_words_and_jaccard(tmp_path):
    data = tmp_path / "data" / "gqa"
    data.mkdir(parents=True)
    questions = {"0": {"question": "What colour is the square?", "types": {"detailed": "colour"}},
                 "1": {"question": "What shape is the red object?", "types": {"detailed": "shape"}},
                 "2": {"question": "How many objects are there?", "types": {"detailed": "count"}}}
    (data / "testdev_balanced_questions.json").write_text(json.dumps(questions))

    def run(name, selected, kept):
        d = tmp_path / name
        d.mkdir()
        with open(d / "predictions.jsonl", "w") as f:
            for qid in questions:
                f.write(json.dumps({"question_id": qid, "selected_tokens": selected[qid], "kept_patches": kept[qid]})
                        + "\n")
        return str(d)

    a = run("a", {"0": [" square", "?"], "1": [" What"], "2": [" objects"]}, {"0": [1, 2], "1": [3, 4], "2": [5]})
    b = run("b", {"0": [], "1": [], "2": []}, {"0": [1, 2], "1": [4, 6], "2": [7]})
    assert key_word_hits(str(tmp_path / "data"), a) == {"all": 50.0, "colour": 100.0, "shape": 0.0}
    assert kept_jaccard(a, b) == pytest.approx((1 + 1 / 3 + 0) / 3)
    row = Row("extensions", "early:question", "finetuned", 7, compare="early:random",
              metrics={"gqa": {"accuracy": 60.0}, "gqa_by_type": {"colour": 60.0},
                       "selection": {"kept_on_target_share": {"colour": 0.5, "shape": 0.25, "position": 0.75},
                                     "stage1_on_target_share": {"colour": 0.2, "shape": 0.2, "position": 0.2},
                                     "aligner_fallback_rate": 0.1},
                       "key_word_hit": {"all": 80.0}, "jaccard_to_compare": 0.4})
    line = next(ln for ln in markdown([row]).splitlines() if "early:question" in ln)
    assert line.endswith("| 50.0 | 50.0 | 25.0 | 75.0 | 20.0 | 10.0 | 80.0 | 0.40 (early:random) |")
    paths = write_reports([row, Row("extensions", "early:random", "finetuned", 7, metrics={
        "gqa": {"accuracy": 55.0}, "gqa_by_type": {}})], str(tmp_path / "out"))
    assert os.path.exists(paths["ablations_png"])


def test_fresh_split_is_new_written_once_and_keeps_the_testbeds_pope(tmp_path):
    from ivtp.testbed.ablate import fresh_split

    testbed = tmp_path / "tb"
    (testbed / "data" / "eval" / "pope").mkdir(parents=True)
    (testbed / "testbed.json").write_text(json.dumps({"seed": 0, "image_size": 112}))
    folder = fresh_split(str(testbed), str(tmp_path / "out"), 3)
    questions = json.load(open(os.path.join(folder, "gqa", "testdev_balanced_questions.json")))
    assert questions and all(q["imageId"].startswith("fresh_") and "target_patches" in q for q in questions.values())
    assert os.path.realpath(os.path.join(folder, "pope")) == str(testbed / "data" / "eval" / "pope")
    before = os.path.getmtime(os.path.join(folder, "gqa", "testdev_balanced_questions.json"))
    assert fresh_split(str(testbed), str(tmp_path / "out"), 3) == folder  # a second call reuses it
    assert os.path.getmtime(os.path.join(folder, "gqa", "testdev_balanced_questions.json")) == before


def test_ablate_cli_refuses_bad_input_in_one_line_before_any_compute(tmp_path, capsys):
    from ivtp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ablate", "--testbed", str(tmp_path), "--fresh", "0"])
    assert e.value.code == 2 and "--fresh: expected a whole number of at least 1, got '0'" in capsys.readouterr().err
    assert main(["ablate", "--testbed", str(tmp_path), "--finetuned", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "nope: no trained testbed model" in err
    assert not os.path.exists(tmp_path / "ablate")  # nothing written


def test_every_line_of_the_methods_plot_has_its_own_colour():
    from ivtp.testbed.ablate import line_colours

    rows = plan_rows(("methods",), (4, 7), "/x/a.safetensors", 6, retrained=True)
    keys = list(dict.fromkeys((r.model, r.name) for r in rows if r.tokens))
    assert len(keys) > 10  # more than the default cycle, where random and tome+ came out the same
    colours = line_colours(len(keys))
    assert len(set(colours)) == len(keys)
