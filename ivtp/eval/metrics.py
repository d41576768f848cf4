"""Benchmark scorers, written to give the numbers that LLaVA-1.5 and the official evaluation tools print.

Each function names the official scorer whose rule it follows, and the docstring states that rule, including the
odd parts. Where we depart from a scorer, the docstring says where and why. All functions are pure: they take
predictions and ground truth as plain Python values and return plain dicts. Question ids are strings.
Percentages are in [0, 100] and rounded to 2 decimals. Bad input raises ValueError.

Sources:
  * VQA accuracy and answer normalisation: `vqaEval.py` (GT-Vision-Lab/VQA) and the EvalAI answer processor
    that LLaVA ships as `llava/eval/m4c_evaluator.py`.
  * GQA: LLaVA's `scripts/convert_gqa_for_eval.py` and GQA's `eval.py`.
  * POPE: LLaVA's `llava/eval/eval_pope.py`.
  * MME: MME's `eval_tool/calculation.py`.
  * Multiple choice: LLaVA's `llava/eval/eval_science_qa.py`, and the rule-based matching and circular
    evaluation of MMBench (VLMEvalKit).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Hashable, Iterable, Mapping

# ---------------------------------------------------------------------------------------------------------------
# VQA answer normalisation tables, as in vqaEval.py and the EvalAI processor (the two tables are the same).
# ---------------------------------------------------------------------------------------------------------------

VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

VQA_ARTICLES: tuple[str, ...] = ("a", "an", "the")

VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group was meant as a look-behind but is a look-ahead
# that can never fail in front of a ".", so the rule is "delete every '.' that is not followed by a digit".
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official code calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in the `count` argument,
# so at most 32 periods are deleted. Kept for exactness.
_VQA_PERIOD_COUNT = int(re.UNICODE)

# ---------------------------------------------------------------------------------------------------------------
# MME subtasks, as listed in MME's eval_tool/calculation.py.
# ---------------------------------------------------------------------------------------------------------------

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)

POPE_NEGATIVE_WORDS: tuple[str, ...] = ("No", "not", "no")

_MISSING_IDS_SHOWN = 5


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------


def _percent(numerator: float, denominator: float) -> float:
    """100 * numerator / denominator rounded to 2 decimals; 0.0 when the denominator is 0."""
    return round(100.0 * numerator / denominator, 2) if denominator else 0.0


def _require_nonempty(items: Collection, what: str) -> None:
    if not items:
        raise ValueError(f"nothing to score: {what} is empty")


def _check_ids_known(ids: Iterable[str], known: Mapping, what: str) -> None:
    """Raise ValueError naming (up to 5 of) the ids in `ids` that are not keys of `known`."""
    missing = [i for i in ids if i not in known]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:_MISSING_IDS_SHOWN])
        more = f" and {len(missing) - _MISSING_IDS_SHOWN} more" if len(missing) > _MISSING_IDS_SHOWN else ""
        raise ValueError(f"{len(missing)} prediction(s) have no {what}: {shown}{more}")


def _require_keys(record: Mapping, keys: Iterable[str], where: str) -> None:
    for key in keys:
        if key not in record:
            raise ValueError(f"{where}: record {dict(record)!r} has no {key!r}")


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2, VizWiz, TextVQA)
# ---------------------------------------------------------------------------------------------------------------


def _evalai_pre_tokenize(text: str) -> str:
    """The EvalAI processor's first step (m4c_evaluator `word_tokenize`): lowercase, delete ',' and '?', split
    the possessive "'s" off its word ("dog's" -> "dog 's"), strip."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def _process_punctuation(text: str) -> str:
    """vqaEval.py `processPunctuation`.

    Each punctuation mark is deleted if, anywhere in the input, it stands next to a space or the input has a
    comma between two digits; otherwise every occurrence becomes a space. Then every '.' not followed by a digit
    is deleted (at most 32 of them, as the official call does).
    """
    has_number_comma = _VQA_COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        beside_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if beside_space or has_number_comma else " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: lowercase, split on whitespace, number words to digits, drop the
    articles a/an/the, then expand contractions word by word ("dont" -> "don't"), join with single spaces.

    The table's capitalised keys ("Im", "Ive", "Id've") can never match, since the words are already lowercase;
    that is the official behaviour too.
    """
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a VQA answer as the EvalAI answer processor does (LLaVA's `m4c_evaluator.EvalAIAnswerProcessor`).

    LLaVA-1.5 runs this processor on every VQAv2 and VizWiz prediction before upload, and on predictions and
    ground truth alike for TextVQA. In order:
      1. lowercase; delete ',' and '?'; "'s" -> " 's"; strip (the EvalAI pre-tokenisation);
      2. newlines and tabs to spaces; strip;
      3. vqaEval.py punctuation rule: each mark of VQA_PUNCTUATION is deleted when it stands next to a space
         (or the text has a comma between digits), else replaced by a space; then each '.' not followed by a
         digit is deleted ("yes." -> "yes", "1.5" stays);
      4. vqaEval.py digit/article rule: number words to digits ("two" -> "2", "none" -> "0"), articles a/an/the
         dropped, contractions fixed ("dont" -> "don't"), words joined by single spaces.
    Steps 2-4 are vqaEval.py's processing exactly; step 1 is the EvalAI addition (it is why "1,000" -> "1000").
    """
    text = _evalai_pre_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    Rule (vqaEval.py; LLaVA's TextVQAAccuracyEvaluator): normalise the prediction and every human answer with
    `normalize_vqa_answer`; for each human answer in turn, count how many of the *other* humans gave the
    prediction and score min(count / 3, 1); return the mean of these leave-one-out scores. With 10 answers of
    which k match: k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9, k>=4 -> 1.0. Any number of answers is accepted; note that
    fewer than 4 answers cannot reach 1.0 (a single answer always scores 0), as in the official formula.

    Departure: vqaEval.py normalises nothing when all humans gave the same string; we (like LLaVA's TextVQA
    scorer, and like LLaVA's VQAv2 upload which pre-normalises predictions) always normalise both sides.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got none")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in gt_answers]
    total = sum(matches)
    scores = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return sum(scores) / len(scores)


def vqa_score(predictions: dict[str, str], gt: dict[str, list[str]]) -> dict:
    """Mean VQA accuracy over the predictions: {"accuracy": percent (2 decimals), "n": number scored}.

    Every prediction id must be in `gt` (ValueError naming up to 5 missing ids); ground truth without a
    prediction is ignored, so a subset can be scored. The percent is 100 * mean, rounded like vqaEval.py's
    `setAccuracy` (2 decimals).
    """
    _require_nonempty(predictions, "predictions")
    _check_ids_known(predictions, gt, "ground truth")
    total = sum(vqa_accuracy(text, gt[qid]) for qid, text in predictions.items())
    return {"accuracy": _percent(total, len(predictions)), "n": len(predictions)}


# ---------------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------------


def _gqa_prediction(text: str) -> str:
    """LLaVA's convert_gqa_for_eval: rstrip('.') and lowercase (plus strip, which LLaVA's generation does)."""
    return text.strip().rstrip(".").lower().strip()


def _gqa_answer_type(question: Mapping) -> str | None:
    """GQA eval.py: "open" if the structural type is "query", else "binary" (verify, logical, choose, compare).
    None when the question has no types."""
    types = question.get("types")
    if not isinstance(types, Mapping) or "structural" not in types:
        return None
    return "open" if types["structural"] == "query" else "binary"


def gqa_score(predictions: dict[str, str], questions: dict[str, dict]) -> dict:
    """GQA accuracy as LLaVA-1.5 reports it (testdev-balanced).

    Each prediction is post-processed like LLaVA's convert_gqa_for_eval (strip, rstrip('.'), lowercase) and
    compared exactly with `questions[qid]["answer"]`, as GQA's eval.py does. As in eval.py, a question whose
    "isBalanced" is False is not scored. When questions carry `types`, also "binary" and "open" accuracies:
    eval.py counts a question as open iff types["structural"] == "query" and as binary otherwise (so "choose"
    questions, whose answers are not yes/no, are binary). An empty binary/open group scores 0.0.

    Returns {"accuracy", "n"} plus {"binary", "open"} when any scored question has types; percents rounded to 2.
    Every prediction id must be a question (ValueError naming the missing ids); questions without a
    prediction are ignored.
    """
    _require_nonempty(predictions, "predictions")
    _check_ids_known(predictions, questions, "GQA question")
    buckets: dict[str, list[bool]] = defaultdict(list)
    for qid, text in predictions.items():
        question = questions[qid]
        if question.get("isBalanced") is False:
            continue
        _require_keys(question, ("answer",), f"GQA question {qid!r}")
        correct = _gqa_prediction(text) == question["answer"]
        buckets["all"].append(correct)
        answer_type = _gqa_answer_type(question)
        if answer_type is not None:
            buckets[answer_type].append(correct)
    _require_nonempty(buckets["all"], "the set of balanced questions among the predictions")
    result = {"accuracy": _percent(sum(buckets["all"]), len(buckets["all"])), "n": len(buckets["all"])}
    if "binary" in buckets or "open" in buckets:
        for kind in ("binary", "open"):
            result[kind] = _percent(sum(buckets[kind]), len(buckets[kind]))
    return result


# ---------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """"yes" or "no" from a free-form answer, exactly as LLaVA's eval_pope.py.

    Keep the text before the first '.', delete commas, split on single spaces, and answer "no" iff one of the
    words is exactly 'No', 'not' or 'no'; anything else is "yes". The match is case-sensitive and whole-word:
    "NO", "Nope" and "no!" all count as "yes", as in the official script.
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(w in POPE_NEGATIVE_WORDS for w in words) else "yes"


def _binary_counts(pairs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """tp/fp/tn/fn of (prediction, label) pairs with "yes" as the positive class."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for pred, label in pairs:
        key = ("t" if pred == label else "f") + ("p" if pred == "yes" else "n")
        counts[key] += 1
    return counts


def _pope_rates(c: Mapping[str, int]) -> dict[str, float]:
    """eval_pope.py's rates in [0, 1] from tp/fp/tn/fn, with 0.0 where it would divide by 0."""
    n = c["tp"] + c["fp"] + c["tn"] + c["fn"]
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    return {
        "accuracy": (c["tp"] + c["tn"]) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (c["tp"] + c["fp"]) / n if n else 0.0,
    }


def _pope_metrics(counts: Mapping[str, int]) -> dict:
    """One group's rates as percents rounded to 2, with n and the counts."""
    rates = {k: round(100.0 * v, 2) for k, v in _pope_rates(counts).items()}
    return {**rates, "n": sum(counts.values()), **counts}


def _pope_label(label: str, qid: str) -> str:
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"POPE label of {qid!r} must be 'yes' or 'no', got {label!r}")
    return value


def pope_score(
    predictions: dict[str, str], labels: dict[str, str], categories: dict[str, str] | None = None
) -> dict:
    """POPE metrics as LLaVA's eval_pope.py computes them, per category and "overall".

    Predictions are free text parsed with `pope_parse`; labels are "yes"/"no"; "yes" is the positive class.
    Each group gets accuracy, precision, recall, f1 and yes_ratio (share of "yes" predictions) as percents
    rounded to 2, plus n, tp, fp, tn, fn. Where eval_pope.py would divide by zero (no "yes" predicted, or no
    "yes" label) the rate is 0.0. "overall" pools all predictions. When categories are given, "overall" also
    has "f1_category_mean" and "accuracy_category_mean", the unweighted means over categories, which is how the
    single POPE number is usually quoted (LLaVA-1.5's 85.9 is the mean F1 of random, popular and adversarial).
    Every prediction id needs a label (and a category, when categories are given): ValueError otherwise.
    """
    _require_nonempty(predictions, "predictions")
    _check_ids_known(predictions, labels, "label")
    pairs = {qid: (pope_parse(text), _pope_label(labels[qid], qid)) for qid, text in predictions.items()}
    result = {"overall": _pope_metrics(_binary_counts(pairs.values()))}
    if categories is None:
        return result
    _check_ids_known(predictions, categories, "category")
    grouped: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for qid, pair in pairs.items():
        grouped[categories[qid]].append(pair)
    if "overall" in grouped:
        raise ValueError("'overall' cannot be a POPE category name: it is the key of the pooled metrics")
    counts = {name: _binary_counts(grouped[name]) for name in sorted(grouped)}
    result.update({name: _pope_metrics(c) for name, c in counts.items()})
    rates = [_pope_rates(c) for c in counts.values()]
    for key in ("f1", "accuracy"):
        result["overall"][f"{key}_category_mean"] = round(100.0 * sum(r[key] for r in rates) / len(rates), 2)
    return result


# ---------------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------------


def mme_parse(text: str) -> str:
    """"yes", "no" or "other", as MME's calculation.py `parse_pred_ans`.

    Lowercase and strip; an exact "yes"/"no" is that answer; otherwise look at the first 4 characters: "yes"
    among them -> "yes", else "no" among them -> "no" (so "not sure" and "none" are "no"), else "other".
    """
    answer = text.lower().strip()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _mme_subtask_metrics(records: list[Mapping]) -> dict:
    """acc (percent of questions right), acc_plus (percent of images with every question right), their sum."""
    per_image: dict[Hashable, list[bool]] = defaultdict(list)
    for r in records:
        per_image[r["image"]].append(mme_parse(r["prediction"]) == str(r["answer"]).strip().lower())
    right = sum(sum(v) for v in per_image.values())
    images_right = sum(all(v) for v in per_image.values())
    acc = 100.0 * right / len(records)
    acc_plus = 100.0 * images_right / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(records)}


def _check_mme_record(record: Mapping) -> None:
    _require_keys(record, ("subtask", "image", "prediction", "answer"), "mme_score")
    if record["subtask"] not in MME_PERCEPTION + MME_COGNITION:
        raise ValueError(f"unknown MME subtask {record['subtask']!r}")
    if str(record["answer"]).strip().lower() not in ("yes", "no"):
        raise ValueError(f"MME answer must be 'Yes' or 'No', got {record['answer']!r}")


def mme_score(records: list[dict]) -> dict:
    """MME scores as MME's calculation.py computes them.

    Records: {subtask, image, prediction (free text), answer ("Yes"/"No")}. Predictions are parsed with
    `mme_parse` ("other" is always wrong). Per subtask: acc = percent of questions right; acc_plus = percent of
    images all of whose questions (normally 2) are right; score = acc + acc_plus (0-200). "perception" and
    "cognition" sum the scores of the subtasks present in each group (0.0 when none is). Sums use unrounded
    subtask values; every reported number is then rounded to 2. Unknown subtask names raise ValueError.
    Returns {"perception", "cognition", "subtasks": {name: {"acc", "acc_plus", "score", "n"}}}.
    """
    _require_nonempty(records, "records")
    grouped: dict[str, list[Mapping]] = defaultdict(list)
    for record in records:
        _check_mme_record(record)
        grouped[record["subtask"]].append(record)
    subtasks = {name: _mme_subtask_metrics(grouped[name]) for name in MME_PERCEPTION + MME_COGNITION
                if name in grouped}
    perception = sum(m["score"] for name, m in subtasks.items() if name in MME_PERCEPTION)
    cognition = sum(m["score"] for name, m in subtasks.items() if name in MME_COGNITION)
    rounded = {name: {k: (round(v, 2) if k != "n" else v) for k, v in m.items()} for name, m in subtasks.items()}
    return {"perception": round(perception, 2), "cognition": round(cognition, 2), "subtasks": rounded}


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, SEED-Bench, MMBench)
# ---------------------------------------------------------------------------------------------------------------

_LEADING_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.):]|\s))")
_ANSWER_IS = re.compile(r"[Tt]he answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])")


def _match_option_text(text: str, letters: list[str], options: list[str]) -> str | None:
    """The letter of the one option whose text equals the answer (case-insensitive, trailing '.' ignored)."""
    def clean(s: str) -> str:
        return s.strip().rstrip(".").strip().lower()

    answer = clean(text)
    hits = [letter for letter, option in zip(letters, options) if clean(str(option)) == answer]
    return hits[0] if len(hits) == 1 else None


def _leading_letter(text: str, letters: list[str]) -> str | None:
    """The letter of a leading "B.", "B)", "B:", "(B)" or "B ", if it is one of `letters`."""
    lead = _LEADING_LETTER.match(text)
    letter = lead and (lead.group(1) or lead.group(2))
    return letter if letter in letters else None


def _stated_letter(text: str, letters: list[str]) -> str | None:
    """The letter of "The answer is B", if every such phrase names the same letter and it is one of `letters`."""
    stated = set(_ANSWER_IS.findall(text))
    letter = stated.pop() if len(stated) == 1 else None
    return letter if letter in letters else None


def parse_choice(text: str, letters: list[str], options: list[str] | None = None) -> str | None:
    """The option letter a free-form answer picks, or None. Rule-based, after LLaVA's eval_science_qa.py and
    MMBench's rule-based matching (VLMEvalKit `can_infer_option` / `can_infer_text`). Tried in order, on the
    stripped text; a letter is only returned if it is in `letters` (letters are matched case-sensitively):
      1. the text is exactly a letter ("B");
      2. options given and the text equals exactly one option's text, case-insensitively and ignoring a
         trailing '.' ("Red." -> the letter of "red");
      3. the text starts with "B.", "B)", "B:", "(B)" or "B " (eval_science_qa accepts "B. ...");
      4. "The answer is B" appears, once or always with the same letter (eval_science_qa's pattern, which also
         needed one more character after the letter; we do not).
    The first rule that yields one of `letters` wins ("I think the answer is C" is not read as a leading "I").
    Anything else is None (eval_science_qa's "FAILED"; VLMEvalKit would then ask a GPT judge, which we do not).
    ValueError if `options` and `letters` differ in length.

    Step 2 comes before step 3 so that an option text starting with a capital letter ("A cat") is not read as
    the letter A; VLMEvalKit guards against that same article ambiguity.
    """
    if options is not None and len(options) != len(letters):
        raise ValueError(f"parse_choice got {len(letters)} letters but {len(options)} options")
    answer = text.strip()
    candidates = (
        answer if answer in letters else None,
        _match_option_text(answer, letters, options) if options is not None else None,
        _leading_letter(answer, letters),
        _stated_letter(answer, letters),
    )
    return next((c for c in candidates if c is not None), None)


def _is_right(record: Mapping) -> bool:
    """A multiple-choice record is right iff its prediction is a letter equal to its answer (None is wrong)."""
    return record["prediction"] is not None and record["prediction"] == record["answer"]


def choice_accuracy(records: list[dict], group_key: str | None = None) -> dict:
    """Multiple-choice accuracy: {"accuracy": percent, "n"} plus, with `group_key`, {"groups": {value: percent}}.

    Records: {"prediction": letter or None, "answer": letter, and group_key when given}. A prediction is right
    iff it equals the answer; None (unparseable) is wrong, like eval_science_qa's "FAILED". Group percents are
    over the records of that group (ScienceQA subject/grade, SEED-Bench question type). Percents rounded to 2.
    """
    _require_nonempty(records, "records")
    keys = ("prediction", "answer") + ((group_key,) if group_key is not None else ())
    groups: dict[Hashable, list[bool]] = defaultdict(list)
    right = 0
    for record in records:
        _require_keys(record, keys, "choice_accuracy")
        correct = _is_right(record)
        right += correct
        if group_key is not None:
            groups[record[group_key]].append(correct)
    result = {"accuracy": _percent(right, len(records)), "n": len(records)}
    if group_key is not None:
        result["groups"] = {g: _percent(sum(v), len(v)) for g, v in groups.items()}
    return result


def _circular_rounds(records: list[Mapping]) -> dict[Hashable, dict[int, Mapping]]:
    """Records grouped by question and round; ValueError unless each question has rounds 0..k-1 exactly once."""
    by_question: dict[Hashable, dict[int, Mapping]] = defaultdict(dict)
    for record in records:
        _require_keys(record, ("index", "round", "prediction", "answer"), "mmbench_circular")
        rounds = by_question[record["index"]]
        if record["round"] in rounds:
            raise ValueError(f"MMBench question {record['index']!r} has round {record['round']!r} twice")
        rounds[record["round"]] = record
    for index, rounds in by_question.items():
        if sorted(rounds) != list(range(len(rounds))):
            raise ValueError(f"MMBench question {index!r} has rounds {sorted(rounds)}, expected 0..{len(rounds) - 1}")
    return by_question


def mmbench_circular(records: list[dict]) -> dict:
    """MMBench circular evaluation (MMBench / VLMEvalKit CircularEval).

    Records: {index (the original question), round (0..k-1, the rotation of the options), prediction (letter or
    None), answer (the right letter in that round), optional category}. A question counts as right only if
    every one of its rounds is right (a question right in 3 of 4 rounds is wrong). Returns, as percents rounded
    to 2: "accuracy" (the circular accuracy; "circular" is the same number), "vanilla" (round 0 alone, the
    single-pass accuracy), "categories" ({category: circular accuracy}, over questions whose round-0 record has
    a category that is not None), and "n" (the number of questions).
    """
    _require_nonempty(records, "records")
    by_question = _circular_rounds(records)
    circular: dict[Hashable, bool] = {}
    categories: dict[Hashable, list[bool]] = defaultdict(list)
    for index, rounds in by_question.items():
        circular[index] = all(_is_right(r) for r in rounds.values())
        category = rounds[0].get("category")
        if category is not None:
            categories[category].append(circular[index])
    vanilla = sum(_is_right(rounds[0]) for rounds in by_question.values())
    accuracy = _percent(sum(circular.values()), len(circular))
    return {
        "accuracy": accuracy,
        "circular": accuracy,
        "vanilla": _percent(vanilla, len(by_question)),
        "categories": {c: _percent(sum(v), len(v)) for c, v in categories.items()},
        "n": len(by_question),
    }


# ------------------------------------------------------------------------------------------------ selection
def _share(kept, target: set) -> float | None:
    return sum(p in target for p in kept) / len(kept) if kept else None


def selection_metrics(rows: Iterable[Mapping], targets: Mapping[str, tuple[list[int], str]]) -> dict:
    """Whether the kept visual tokens lie where the answer is, for questions whose target patches are known.

    rows: prediction lines (question_id, stage1_patches, kept_patches, optionally pseudo_cls_source).
    targets: {question id: (target patches, question type)}. Per question, a share is the part of the kept
    patches that lie on the targets; `kept_on_target_share` averages the final one, `stage1_on_target_share`
    the one after the tokens reached the LLM, over questions with targets and kept patches (merged tokens have
    none), overall and per type. `aligner_fallback_rate`: the share of rows whose pseudo-CLS fell back to the
    visual [CLS] (stage-2 methods only)."""
    final: dict[str, list[float]] = defaultdict(list)
    stage1: dict[str, list[float]] = defaultdict(list)
    sources = []
    for row in rows:
        if "pseudo_cls_source" in row:
            sources.append(row["pseudo_cls_source"])
        found = targets.get(str(row["question_id"]))
        if found is None:
            continue
        target, qtype = set(found[0]), found[1]
        for key, into in (("kept_patches", final), ("stage1_patches", stage1)):
            share = _share(row.get(key) or [], target)
            if share is not None:
                into[qtype].append(share)
                into["all"].append(share)

    def means(d):
        return {k: round(sum(v) / len(v), 4) for k, v in sorted(d.items()) if v}

    return {"questions": len(final.get("all", [])), "kept_on_target_share": means(final),
            "stage1_on_target_share": means(stage1),
            "aligner_fallback_rate": round(sources.count("visual") / len(sources), 4) if sources else None}
