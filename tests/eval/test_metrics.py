"""The benchmark scorers against hand-computed cases of the official scorers' behaviour.

Each expected value is worked out by hand from the rule the official scorer applies (vqaEval.py and LLaVA's
EvalAI processor, GQA eval.py, LLaVA's eval_pope.py and eval_science_qa.py, MME's calculation.py, MMBench
circular evaluation); the comment beside a case shows the arithmetic.
"""

import pytest

from ivtp.eval.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    VQA_CONTRACTIONS,
    choice_accuracy,
    gqa_score,
    mmbench_circular,
    mme_parse,
    mme_score,
    normalize_vqa_answer,
    parse_choice,
    pope_parse,
    pope_score,
    vqa_accuracy,
    vqa_score,
)

# --------------------------------------------------------------------------------------------------------------
# VQA normalisation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes.", "yes"),  # a '.' not followed by a digit is deleted
        ("Yes", "yes"),
        ("1,000", "1000"),  # commas are deleted (and a digit-comma-digit text drops all punctuation)
        ("1.5", "1.5"),  # a '.' before a digit stays
        ("5.", "5"),
        ("e.g.", "eg"),
        ("a dog", "dog"),  # articles a / an / the go
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("two", "2"),  # number words become digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten (and none) are mapped
        ("dont", "don't"),  # contractions from the official table
        ("isnt", "isn't"),
        ("whats", "what's"),
        ("Im", "im"),  # lowercased before the lookup, so the table's key "Im" never matches (official too)
        ("a\tdog\n", "dog"),  # tab and newline to spaces, then whitespace collapsed
        ("  The  Cat  ", "cat"),
        ("black/white", "black white"),  # a mark not next to a space becomes a space
        ("black / white", "black white"),  # a mark next to a space is deleted
        ("t-shirt", "t shirt"),
        ("what?", "what"),
        ("The dog's bone", "dog 's bone"),  # EvalAI splits the possessive 's off
        ("." * 40 + "x", "." * 8 + "x"),  # the official sub() gets re.UNICODE (32) as its count: 32 go
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_contractions_table_is_the_full_official_one():
    assert len(VQA_CONTRACTIONS) == 120
    assert VQA_CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert VQA_CONTRACTIONS["somebody'd"] == "somebodyd"  # the official table's one reversed entry
    assert normalize_vqa_answer("couldnt've") == "couldn't've"


# --------------------------------------------------------------------------------------------------------------
# VQA accuracy: mean over the 10 leave-one-out subsets of min(#matching others / 3, 1)
# --------------------------------------------------------------------------------------------------------------


def _ten(k: int, answer: str = "dog", other: str = "cat") -> list[str]:
    return [answer] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 0.0),
        # 1 of 10 match: the matching human's subset has 0 others -> 0; the 9 others' subsets have 1 -> 1/3.
        # (1 * 0 + 9 * 1/3) / 10 = 0.3
        (1, 0.3),
        # 2 match: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        (2, 0.6),
        # 3 match: (3 * 2/3 + 7 * 1) / 10 = 0.9
        (3, 0.9),
        # 4 match: (4 * min(3/3, 1) + 6 * 1) / 10 = 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(k, expected):
    assert vqa_accuracy("dog", _ten(k)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    # "A dog." -> "dog"; the humans' "the dog" and "Dog" -> "dog": 3 of 10 match -> 0.9
    assert vqa_accuracy("A dog.", ["the dog", "Dog", "dog"] + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_other_answer_counts():
    # 5 answers, 2 match: (2 * 1/3 + 3 * 2/3) / 5 = (2/3 + 2) / 5 = 8/15
    assert vqa_accuracy("dog", ["dog", "dog", "cat", "cat", "cat"]) == pytest.approx(8 / 15)
    # one answer: its leave-one-out subset is empty, so even an exact match scores 0 (the official formula)
    assert vqa_accuracy("dog", ["dog"]) == 0.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


def test_vqa_score():
    gt = {"1": ["2"] * 10, "2": ["yes"] * 10, "3": _ten(2), "4": ["no"] * 10}
    # 1.0 + 0.0 + 0.6 = 1.6 over 3 -> 53.333 -> 53.33; "4" has no prediction and is ignored
    result = vqa_score({"1": "Two", "2": "no", "3": "dog"}, gt)
    assert result == {"accuracy": 53.33, "n": 3}


def test_vqa_score_names_missing_ids():
    gt = {"1": ["yes"] * 10}
    with pytest.raises(ValueError, match=r"'x'.*'y'"):
        vqa_score({"1": "yes", "x": "no", "y": "no"}, gt)
    with pytest.raises(ValueError, match=r"'m0', 'm1', 'm2', 'm3', 'm4' and 2 more"):
        vqa_score({f"m{i}": "no" for i in range(7)}, gt)
    with pytest.raises(ValueError):
        vqa_score({}, gt)


# --------------------------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------------------------


def _gqa_q(answer, structural=None, balanced=True):
    q = {"answer": answer, "isBalanced": balanced}
    if structural is not None:
        q["types"] = {"structural": structural, "semantic": "attr"}
    return q


def test_gqa_score_binary_and_open():
    questions = {
        "1": _gqa_q("yes", "verify"),
        "2": _gqa_q("no", "logical"),
        "3": _gqa_q("table", "query"),
        "4": _gqa_q("left", "choose"),  # binary for eval.py: only "query" is open
        "5": _gqa_q("red", "query", balanced=False),  # not balanced: not scored
        "6": _gqa_q("cat", "query"),  # no prediction: ignored
    }
    predictions = {"1": "Yes.", "2": "yes", "3": "Table", "4": "right", "5": "red"}
    # right: 1 and 3 of the 4 balanced -> 50; binary: 1 of (1, 2, 4) -> 33.33; open: 1 of (3) -> 100
    assert gqa_score(predictions, questions) == {"accuracy": 50.0, "n": 4, "binary": 33.33, "open": 100.0}


def test_gqa_score_without_types_and_bad_ids():
    questions = {"1": {"answer": "yes"}, "2": {"answer": "dog"}}
    assert gqa_score({"1": "yes", "2": "a dog"}, questions) == {"accuracy": 50.0, "n": 2}  # exact match only
    with pytest.raises(ValueError, match="'9'"):
        gqa_score({"9": "yes"}, questions)


# --------------------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No, there is not.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is no dog in the image.", "no"),
        ("I do not see one", "no"),
        ("Yes.", "yes"),
        ("No", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # case-sensitive words 'No', 'not', 'no' only
        ("Not really", "yes"),
        ("no!", "yes"),  # whole words after deleting commas only
        ("", "yes"),
    ],
)
def test_pope_parse(text, expected):
    assert pope_parse(text) == expected


def test_pope_score_per_category_and_overall():
    predictions = {
        "1": "Yes.",  # yes, label yes: tp
        "2": "No, there is not.",  # no, label yes: fn
        "3": "Yes, there is.",  # yes, label no: fp
        "4": "No.",  # no, label no: tn
        "5": "Yes",  # yes, label yes: tp
        "6": "There is no cat.",  # no, label no: tn
    }
    labels = {"1": "yes", "2": "yes", "3": "no", "4": "no", "5": "yes", "6": "no"}
    categories = {"1": "random", "2": "random", "3": "random", "4": "adversarial", "5": "adversarial",
                  "6": "adversarial"}
    result = pope_score(predictions, labels, categories)
    # overall: tp 2, fp 1, tn 2, fn 1; acc 4/6; precision 2/3; recall 2/3; f1 2/3; yes 3/6
    assert result["overall"] == {
        "accuracy": 66.67, "precision": 66.67, "recall": 66.67, "f1": 66.67, "yes_ratio": 50.0, "n": 6,
        "tp": 2, "fp": 1, "tn": 2, "fn": 1, "f1_category_mean": 75.0, "accuracy_category_mean": 66.67,
    }
    # random: tp 1, fn 1, fp 1 -> acc 1/3, precision 1/2, recall 1/2, f1 1/2, yes 2/3
    assert result["random"] == {
        "accuracy": 33.33, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 66.67, "n": 3,
        "tp": 1, "fp": 1, "tn": 0, "fn": 1,
    }
    # adversarial: tn 2, tp 1 -> everything 100, yes 1/3
    assert result["adversarial"] == {
        "accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 33.33, "n": 3,
        "tp": 1, "fp": 0, "tn": 2, "fn": 0,
    }
    assert set(result) == {"overall", "random", "adversarial"}


def test_pope_score_zero_division_gives_zero():
    # all "no" predicted and all labels "no": tp + fp = 0 and tp + fn = 0, where eval_pope.py would divide by 0
    result = pope_score({"a": "No.", "b": "There is not."}, {"a": "no", "b": "no"})
    assert result == {"overall": {
        "accuracy": 100.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 2,
        "tp": 0, "fp": 0, "tn": 2, "fn": 0,
    }}


def test_pope_score_bad_inputs():
    with pytest.raises(ValueError, match="'b'"):
        pope_score({"a": "yes", "b": "no"}, {"a": "yes"})
    with pytest.raises(ValueError, match="maybe"):
        pope_score({"a": "yes"}, {"a": "maybe"})
    with pytest.raises(ValueError, match="'a'"):
        pope_score({"a": "yes"}, {"a": "yes"}, {})
    with pytest.raises(ValueError):
        pope_score({}, {})


# --------------------------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        (" no \n", "no"),
        ("Yes, there is a dog.", "yes"),  # first 4 chars "yes,"
        ("No.", "no"),
        ("not sure", "no"),  # "no" in "not "
        ("Nope", "no"),
        ("nyes", "yes"),  # "yes" is looked for before "no"
        ("There is a dog", "other"),
        ("I think yes", "other"),  # "yes" is past the first 4 chars
        ("", "other"),
    ],
)
def test_mme_parse(text, expected):
    assert mme_parse(text) == expected


def test_mme_subtask_names():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    assert MME_PERCEPTION[0] == "existence" and MME_PERCEPTION[-1] == "OCR"
    assert MME_COGNITION == ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _mme(subtask, image, prediction, answer):
    return {"subtask": subtask, "image": image, "prediction": prediction, "answer": answer}


def test_mme_score_acc_plus_per_image():
    records = [
        _mme("existence", "a.jpg", "Yes", "Yes"),  # right
        _mme("existence", "a.jpg", "No", "No"),  # right: image a all right
        _mme("existence", "b.jpg", "yes, there is", "Yes"),  # right
        _mme("existence", "b.jpg", "Yes", "No"),  # wrong: image b half right
        _mme("code_reasoning", "c.png", "I cannot tell", "Yes"),  # "other": wrong
        _mme("code_reasoning", "c.png", "not sure", "No"),  # parsed "no": right
        _mme("OCR", "d.jpg", "yes", "yes"),
        _mme("OCR", "d.jpg", "no", "No"),
    ]
    result = mme_score(records)
    # existence: acc 3/4 = 75, acc_plus 1/2 = 50, score 125
    assert result["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4}
    # code_reasoning: acc 1/2 = 50, acc_plus 0/1 = 0, score 50
    assert result["subtasks"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "n": 2}
    assert result["subtasks"]["OCR"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "n": 2}
    assert result["perception"] == 325.0  # 125 + 200
    assert result["cognition"] == 50.0
    assert list(result["subtasks"]) == ["existence", "OCR", "code_reasoning"]  # official order


def test_mme_score_rounds_after_summing():
    # 3 images x 1 question, 2 right: acc 66.666..., acc_plus 66.666..., score 133.33
    records = [_mme("count", f"{i}.jpg", "Yes", ans) for i, ans in enumerate(["Yes", "Yes", "No"])]
    result = mme_score(records)
    assert result["subtasks"]["count"] == {"acc": 66.67, "acc_plus": 66.67, "score": 133.33, "n": 3}
    assert result["perception"] == 133.33 and result["cognition"] == 0.0


def test_mme_score_bad_inputs():
    with pytest.raises(ValueError, match="'existance'"):
        mme_score([_mme("existance", "a.jpg", "Yes", "Yes")])
    with pytest.raises(ValueError, match="Maybe"):
        mme_score([_mme("existence", "a.jpg", "Yes", "Maybe")])
    with pytest.raises(ValueError, match="'image'"):
        mme_score([{"subtask": "existence", "prediction": "Yes", "answer": "Yes"}])
    with pytest.raises(ValueError):
        mme_score([])


# --------------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------------

ABCD = ["A", "B", "C", "D"]


@pytest.mark.parametrize(
    "text, options, expected",
    [
        ("B", None, "B"),
        (" C\n", None, "C"),
        ("B.", None, "B"),
        ("C. red", None, "C"),  # eval_science_qa's "C. " form
        ("D)", None, "D"),
        ("(A)", None, "A"),
        ("(A) the dog", None, "A"),
        ("B: red", None, "B"),
        ("A the dog", None, "A"),
        ("The answer is D.", None, "D"),
        ("I think the answer is (C)", None, "C"),
        ("The answer is A. The answer is B.", None, None),  # two different letters: no answer
        ("E", None, None),  # not one of the letters
        ("E. red", None, None),
        ("b", None, None),  # letters are case-sensitive, as in eval_science_qa
        ("Apple", None, None),  # a word starting with a capital is not a letter
        ("red", ["blue", "red", "green", "cat"], "B"),
        ("Red.", ["blue", "red", "green", "cat"], "B"),
        ("A cat", ["a dog", "a cat", "red", "blue"], "B"),  # the option text wins over the leading "A "
        ("It is red", ["blue", "red", "green", "cat"], None),  # no containment rule
        ("red", ["red", "red", "green", "cat"], None),  # two options match: ambiguous
        ("", ["blue", "red", "green", "cat"], None),
    ],
)
def test_parse_choice(text, options, expected):
    assert parse_choice(text, ABCD, options) == expected


def test_parse_choice_respects_letters_and_option_count():
    assert parse_choice("C", ["A", "B"]) is None
    assert parse_choice("The answer is C.", ["A", "B"]) is None
    with pytest.raises(ValueError):
        parse_choice("A", ABCD, ["only one option"])


def test_choice_accuracy_with_groups():
    records = [
        {"prediction": "A", "answer": "A", "subject": "NAT"},
        {"prediction": "D", "answer": "D", "subject": "NAT"},
        {"prediction": "B", "answer": "C", "subject": "SOC"},
        {"prediction": None, "answer": "D", "subject": "SOC"},  # unparseable counts as wrong
        {"prediction": "B", "answer": "B", "subject": "LAN"},
    ]
    # 3 of 5 right -> 60; NAT 2/2, SOC 0/2, LAN 1/1
    assert choice_accuracy(records, group_key="subject") == {
        "accuracy": 60.0, "n": 5, "groups": {"NAT": 100.0, "SOC": 0.0, "LAN": 100.0},
    }
    assert choice_accuracy(records) == {"accuracy": 60.0, "n": 5}


def test_choice_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="'subject'"):
        choice_accuracy([{"prediction": "A", "answer": "A"}], group_key="subject")
    with pytest.raises(ValueError, match="'answer'"):
        choice_accuracy([{"prediction": "A"}])
    with pytest.raises(ValueError):
        choice_accuracy([])


def _rounds(index, answers, predictions, category=None):
    return [{"index": index, "round": r, "answer": a, "prediction": p, "category": category}
            for r, (a, p) in enumerate(zip(answers, predictions))]


def test_mmbench_circular():
    records = (
        _rounds("1", "ABCD", "ABCD", "ocr")  # right in all 4 rounds
        + _rounds("2", "BCDA", "BCAA", "ocr")  # right in 3 of 4 (round 2 wrong): wrong; round 0 right
        + _rounds("3", "AB", [None, "B"], "attr")  # 2 options, round 0 unparseable: wrong in both counts
    )
    result = mmbench_circular(records)
    # circular: 1 of 3 -> 33.33; vanilla (round 0): questions 1 and 2 -> 66.67; ocr 1/2 -> 50; attr 0/1 -> 0
    assert result == {
        "accuracy": 33.33, "circular": 33.33, "vanilla": 66.67, "categories": {"ocr": 50.0, "attr": 0.0}, "n": 3,
    }


def test_mmbench_circular_order_and_missing_category():
    records = list(reversed(_rounds(7, "CD", "CD"))) + _rounds(8, "AB", "AA")
    assert mmbench_circular(records) == {
        "accuracy": 50.0, "circular": 50.0, "vanilla": 100.0, "categories": {}, "n": 2,
    }


def test_mmbench_circular_bad_rounds():
    with pytest.raises(ValueError, match="twice"):
        mmbench_circular(_rounds("1", "AB", "AB") + _rounds("1", "A", "A"))
    with pytest.raises(ValueError, match="expected 0..1"):
        mmbench_circular([r for r in _rounds("1", "ABC", "ABC") if r["round"] != 0])
    with pytest.raises(ValueError, match="'round'"):
        mmbench_circular([{"index": "1", "prediction": "A", "answer": "A"}])
    with pytest.raises(ValueError):
        mmbench_circular([])


def test_selection_shares_by_hand():
    from ivtp.eval.metrics import selection_metrics

    rows = [{"question_id": "1", "stage1_patches": [1, 2, 3, 4], "kept_patches": [1, 2], "pseudo_cls_source": "text"},
            {"question_id": "2", "stage1_patches": [5, 6], "kept_patches": [6], "pseudo_cls_source": "visual"},
            {"question_id": "3", "stage1_patches": [], "kept_patches": [], "pseudo_cls_source": "visual"},  # merged
            {"question_id": "4", "stage1_patches": [1], "kept_patches": [1]}]  # no target known
    targets = {"1": ([2, 3, 9], "colour"), "2": ([5], "shape"), "3": ([1], "shape")}
    out = selection_metrics(rows, targets)
    assert out["questions"] == 2
    assert out["kept_on_target_share"] == {"all": 0.25, "colour": 0.5, "shape": 0.0}  # 1/2 and 0/1
    assert out["stage1_on_target_share"] == {"all": 0.5, "colour": 0.5, "shape": 0.5}  # 2/4 and 1/2
    assert out["aligner_fallback_rate"] == round(2 / 3, 4)
    assert selection_metrics(rows[3:], targets)["aligner_fallback_rate"] is None
