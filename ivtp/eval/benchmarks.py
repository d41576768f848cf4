"""Readers and scorers for the 12 benchmarks of IVTP's Table 1, in the folder layouts of LLaVA-1.5's evaluation
setup (``playground/data/eval/<benchmark>``, docs/evaluation.md) and of the official releases.

Each benchmark turns its folder into a list of `Item`s (an id, an image, the prompt LLaVA-1.5 uses, and what
scoring needs), scores the predictions locally where the metric is public, and writes the files that the
official servers or judges take where it is not. A folder that lacks a file, a malformed file, or a file that
belongs to another benchmark raises `BenchmarkDataError` naming the file.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from ivtp.data.jsonio import dump_json, dump_jsonl
from ivtp.errors import InputError
from ivtp.eval import metrics

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_EN = "Answer with the option's letter from the given choices directly."
CHOICE_CN = "请直接回答选项字母。"
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
LETTERS = "ABCDEFGHIJ"


class BenchmarkDataError(InputError):
    """A benchmark folder or file that cannot be read as that benchmark."""


@dataclass
class Item:
    id: str
    image: "str | Callable[[], Image.Image] | None"  # a path, a loader (images embedded in a TSV), or None
    prompt: str  # the user turn without the <image> placeholder; the template adds it
    meta: dict = field(default_factory=dict)  # what scoring and submission files need


# --------------------------------------------------------------------------------------------- file reading
# Keys that identify a file of another benchmark, so that a wrong file gets a useful message.
_SIGNATURES = [
    ({"label", "question_id", "text"}, "a POPE annotation file (coco_pope_*.json)"),
    ({"conversations"}, "a LLaVA conversation file (training data or ScienceQA's llava_test_CQM-A.json)"),
    ({"questions", "question_type"}, "SEED-Bench.json"),
    ({"dataset_name", "data"}, "a TextVQA annotation file"),
    ({"imageId", "question", "answer"}, "a GQA question entry"),
    ({"imagename", "capability"}, "an MM-Vet entry (mm-vet.json)"),
    ({"question_id", "text", "answer_id"}, "a prediction/answer file"),
    ({"annotations"}, "a VQA annotation file"),
]


def _looks_like(keys) -> str:
    keys = set(keys)
    for sig, what in _SIGNATURES:
        if sig <= keys:
            return f"; it looks like {what}"
    return ""


def require(root: str, bench: str, *candidates: str) -> str:
    """The first of `candidates` (paths relative to `root`) that exists, or an error naming what is missing."""
    for c in candidates:
        path = os.path.join(root, c)
        if os.path.exists(path):
            return path
    if not os.path.isdir(root):
        raise BenchmarkDataError(f"{bench}: data folder {root} does not exist")
    wanted = " or ".join(os.path.join(root, c) for c in candidates)
    raise BenchmarkDataError(f"{bench}: missing {wanted} (layout: docs/evaluation.md)")


def read_json(path: str, bench: str, kind: type, keys: tuple[str, ...] = ()):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{bench}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise BenchmarkDataError(f"{bench}: {path} should hold a JSON {kind.__name__}, not {type(data).__name__}"
                                 + (_looks_like(data) if isinstance(data, dict) else ""))
    if keys and isinstance(data, dict):
        missing = [k for k in keys if k not in data]
        if missing:
            raise BenchmarkDataError(f"{bench}: {path} lacks key(s) {missing}{_looks_like(data)}")
    return data


def read_jsonl(path: str, bench: str, keys: tuple[str, ...]) -> list[dict]:
    """JSON lines, each an object with `keys`; the error names the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == 1:
                    _refuse_whole_json(path, bench)
                raise BenchmarkDataError(f"{bench}: {path} line {n} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise BenchmarkDataError(f"{bench}: {path} line {n} is not a JSON object")
            missing = [k for k in keys if k not in row]
            if missing:
                raise BenchmarkDataError(f"{bench}: {path} line {n} lacks key(s) {missing}{_looks_like(row)}")
            rows.append(row)
    if not rows:
        raise BenchmarkDataError(f"{bench}: {path} holds no questions")
    return rows


def _refuse_whole_json(path: str, bench: str) -> None:
    """A question file that is one JSON document rather than JSON lines: say so, and whose it looks like."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError:
        return
    first = next(iter(data.values() if isinstance(data, dict) else data), None) if data else None
    hint = (_looks_like(data) if isinstance(data, dict) else "") or (
        _looks_like(first) if isinstance(first, dict) else "")
    raise BenchmarkDataError(f"{bench}: {path} is one JSON document, not JSON lines{hint}")


def entries(data: dict, path: str, bench: str, keys: tuple[str, ...]) -> dict:
    """A dict of id -> entry (GQA, MM-Vet style); every entry must be an object with `keys`."""
    if _looks_like(data):  # the top level of another benchmark's file (SEED-Bench.json, a TextVQA file, ...)
        raise BenchmarkDataError(f"{bench}: {path} is not a file of {bench}{_looks_like(data)}")
    for k, v in data.items():
        if not isinstance(v, dict) or any(key not in v for key in keys):
            got = sorted(v) if isinstance(v, dict) else type(v).__name__
            raise BenchmarkDataError(f"{bench}: {path} entry {k!r} should have keys {list(keys)}, has {got}"
                                     + (_looks_like(v) if isinstance(v, dict) else ""))
    return data


def _strip_suffix(text: str, *suffixes: str) -> str:
    """The bare question of a LLaVA question line (its text ends with the answer-format instruction)."""
    for s in suffixes:
        text = text.replace("\n" + s, "")
    return text.strip()


# ------------------------------------------------------------------------------------------------ benchmarks
class Benchmark:
    """One benchmark: `load` a folder into items, `score` predictions, `write_outputs` for external graders."""

    name: str = ""
    title: str = ""
    max_new_tokens: int = 16  # short answers; open-ended benchmarks override

    def load(self, root: str) -> list[Item]:
        raise NotImplementedError

    def score(self, root: str, items: list[Item], predictions: dict[str, str]) -> dict | None:
        """Local metrics, or None where grading happens elsewhere."""
        return None

    def write_outputs(self, root: str, items: list[Item], predictions: dict[str, str], out_dir: str,
                      model_id: str) -> list[str]:
        """Submission or judge files; the paths written."""
        return []

    def selection_targets(self, root: str, items: list[Item]) -> dict[str, tuple[list[int], str]]:
        """{question id: (the patches the answer lies on, the question's type)} where the data says so; {} for
        benchmarks that do not (every public one)."""
        return {}

    def _llava_questions(self, root: str, question_file: str, image_folder: str, suffix: str = SHORT_ANSWER,
                         meta_keys: tuple[str, ...] = ()) -> list[Item]:
        """LLaVA-1.5's question jsonl: question_id, image, text (the question plus the answer instruction)."""
        path = require(root, self.name, question_file)
        folder = require(root, self.name, image_folder)
        rows = read_jsonl(path, self.name, ("question_id", "image", "text"))
        if "label" in rows[0] or "answer_id" in rows[0]:  # LLaVA question files carry neither
            raise BenchmarkDataError(f"{self.name}: {path} is not a question file{_looks_like(rows[0])}")
        return [Item(str(r["question_id"]), os.path.join(folder, r["image"]),
                     r["text"] if r["text"].rstrip().endswith(suffix) else f"{r['text']}\n{suffix}",
                     {"question_id": r["question_id"], "image": r["image"], "category": r.get("category"),
                      **{k: r.get(k) for k in meta_keys}})
                for r in rows]


class VQAv2(Benchmark):
    """VQAv2. LLaVA layout: llava_vqav2_mscoco_test-dev2015.jsonl + test2015/; scored locally when the official
    annotations (v2_mscoco_val2014_annotations.json) sit beside a val question file; test-dev is graded on EvalAI,
    so the submission JSON (every test2015 question, blanks for the unanswered) goes to answers_upload/."""

    name, title = "vqav2", "VQAv2"

    def load(self, root):
        if os.path.exists(os.path.join(root, "llava_vqav2_mscoco_test-dev2015.jsonl")):
            return self._llava_questions(root, "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015")
        # Official release: {"questions": [{image_id, question, question_id}]} and COCO images.
        qpath = require(root, self.name, "v2_OpenEnded_mscoco_val2014_questions.json",
                        "llava_vqav2_mscoco_test-dev2015.jsonl")
        questions = read_json(qpath, self.name, dict, ("questions",))["questions"]
        folder = require(root, self.name, "val2014")
        return [Item(str(q["question_id"]), os.path.join(folder, f"COCO_val2014_{int(q['image_id']):012d}.jpg"),
                     f"{q['question']}\n{SHORT_ANSWER}", {"question_id": q["question_id"]}) for q in questions]

    def score(self, root, items, predictions):
        path = os.path.join(root, "v2_mscoco_val2014_annotations.json")
        if not os.path.exists(path):
            return None
        ann = read_json(path, self.name, dict, ("annotations",))["annotations"]
        gt = {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in ann}
        return metrics.vqa_score(predictions, gt)

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        full = os.path.join(root, "llava_vqav2_mscoco_test2015.jsonl")  # EvalAI wants every test2015 question
        ids = ([r["question_id"] for r in read_jsonl(full, self.name, ("question_id",))] if os.path.exists(full)
               else [it.meta["question_id"] for it in items])
        rows = [{"question_id": q, "answer": metrics.normalize_vqa_answer(predictions.get(str(q), ""))} for q in ids]
        return [dump_json(rows, os.path.join(out_dir, "answers_upload", f"{model_id}.json"))]


class GQA(Benchmark):
    """GQA testdev-balanced. LLaVA layout: llava_gqa_testdev_balanced.jsonl + data/images/ and the official
    data/testdev_balanced_questions.json for the answers (data/ may be left out)."""

    name, title = "gqa", "GQA"

    def load(self, root):
        image_folder = "data/images" if os.path.isdir(os.path.join(root, "data", "images")) else "images"
        return self._llava_questions(root, "llava_gqa_testdev_balanced.jsonl", image_folder)

    ANSWERS = ("data/testdev_balanced_questions.json", "testdev_balanced_questions.json")

    def _answers(self, root) -> str | None:
        """The official questions file with the answers; None where it was left out (GQA's eval.py grades the
        submission file then)."""
        return next((p for c in self.ANSWERS if os.path.exists(p := os.path.join(root, c))), None)

    def score(self, root, items, predictions):
        path = self._answers(root)
        if path is None:
            return None
        questions = entries(read_json(path, self.name, dict), path, self.name, ("answer",))
        _check_ids(predictions, questions, path, self.name)
        return metrics.gqa_score(predictions, questions)

    def selection_targets(self, root, items):
        # The testbed's GQA layout adds "target_patches" to each official question (ivtp.data.shapes).
        path = self._answers(root)
        if path is None:
            return {}
        questions = read_json(path, self.name, dict)
        return {it.id: (q["target_patches"], q.get("types", {}).get("detailed", "all")) for it in items
                if (q := questions.get(it.id)) is not None and q.get("target_patches")}

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        # The input of GQA's eval.py: [{questionId, prediction}], as LLaVA's convert_gqa_for_eval writes it.
        rows = [{"questionId": k, "prediction": v.rstrip(".").lower()} for k, v in predictions.items()]
        return [dump_json(rows, os.path.join(out_dir, "testdev_balanced_predictions.json"))]


class VizWiz(Benchmark):
    """VizWiz-VQA. LLaVA layout: llava_test.jsonl + test/; the test split is graded on EvalAI: the upload is
    [{image, answer}]. A val.json with answers (official format) beside it is scored locally."""

    name, title = "vizwiz", "VizWiz"

    def load(self, root):
        items = self._llava_questions(root, "llava_test.jsonl", "test")
        for it in items:
            if VIZWIZ_UNANSWERABLE not in it.prompt:
                q = _strip_suffix(it.prompt, SHORT_ANSWER)
                it.prompt = f"{q}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
        return items

    def score(self, root, items, predictions):
        path = os.path.join(root, "val.json")
        if not os.path.exists(path):
            return None
        ann = read_json(path, self.name, list)
        gt_by_image = {a["image"]: [x["answer"] for x in a["answers"]] for a in ann}
        gt = {it.id: gt_by_image[it.meta["image"]] for it in items if it.meta["image"] in gt_by_image}
        return metrics.vqa_score({k: v for k, v in predictions.items() if k in gt}, gt) if gt else None

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        rows = [{"image": it.meta["image"], "answer": metrics.normalize_vqa_answer(predictions.get(it.id, ""))}
                for it in items]
        return [dump_json(rows, os.path.join(out_dir, "answers_upload", f"{model_id}.json"))]


class TextVQA(Benchmark):
    """TextVQA val with LLaVA-1.5's OCR-token prompt: llava_textvqa_val_v051_ocr.jsonl + train_images/, scored
    with VQA accuracy against TextVQA_0.5.1_val.json (matched on image and question, as LLaVA's eval_textvqa)."""

    name, title = "textvqa", "TextVQA"

    def load(self, root):
        return self._llava_questions(root, "llava_textvqa_val_v051_ocr.jsonl", "train_images")

    def score(self, root, items, predictions):
        path = require(root, self.name, "TextVQA_0.5.1_val.json")
        ann = read_json(path, self.name, dict, ("data",))["data"]
        by_key = {(a["image_id"], a["question"].lower()): a["answers"] for a in ann}
        by_qid = {str(a["question_id"]): a["answers"] for a in ann}
        gt = {}
        for it in items:
            key = (os.path.splitext(it.meta["image"])[0], it.prompt.split("\n")[0].strip().lower())
            answers = by_qid.get(it.id) or by_key.get(key)
            if answers is None:
                raise BenchmarkDataError(f"{self.name}: question {it.id} ({key[1]!r}) is not in {path}")
            gt[it.id] = answers
        return metrics.vqa_score(predictions, gt)


class POPE(Benchmark):
    """POPE on COCO val2014: llava_pope_test.jsonl + val2014/ + coco/coco_pope_{adversarial,popular,random}.json
    (the official JSON lines with labels). Accuracy, precision, recall, F1 and yes-ratio per category."""

    name, title = "pope", "POPE"
    CATEGORIES = ("adversarial", "popular", "random")

    def load(self, root):
        return self._llava_questions(root, "llava_pope_test.jsonl", "val2014")

    def score(self, root, items, predictions):
        labels, categories = {}, {}
        for cat in self.CATEGORIES:
            path = require(root, self.name, f"coco/coco_pope_{cat}.json")
            for row in read_jsonl(path, self.name, ("question_id", "label")):
                labels[str(row["question_id"])] = row["label"]
        for it in items:
            if it.id not in labels:
                raise BenchmarkDataError(f"{self.name}: question {it.id} has no label in {root}/coco/")
            categories[it.id] = it.meta["category"] or "all"
        return metrics.pope_score(predictions, {k: labels[k] for k in predictions},
                                  {k: categories[k] for k in predictions})


class MME(Benchmark):
    """MME, read from the official MME_Benchmark_release_version folder: per subtask, images with
    question/answer .txt files (tab-separated "question<TAB>Yes|No"), either side by side or in images/ and
    questions_answers_YN/. Perception and cognition totals of acc + acc+."""

    name, title = "mme", "MME"

    def load(self, root):
        base = require(root, self.name, "MME_Benchmark_release_version")
        items = []
        for subtask in metrics.MME_PERCEPTION + metrics.MME_COGNITION:
            sub = os.path.join(base, subtask)
            if not os.path.isdir(sub):
                raise BenchmarkDataError(f"{self.name}: missing subtask folder {sub}")
            qa_dir, img_dir = ((os.path.join(sub, "questions_answers_YN"), os.path.join(sub, "images"))
                               if os.path.isdir(os.path.join(sub, "questions_answers_YN")) else (sub, sub))
            images = {os.path.splitext(f)[0]: f for f in os.listdir(img_dir) if not f.endswith(".txt")}
            for txt in sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt")):
                image = images.get(txt[:-4])
                if image is None:
                    raise BenchmarkDataError(f"{self.name}: no image for {os.path.join(qa_dir, txt)}")
                for n, line in enumerate(open(os.path.join(qa_dir, txt), encoding="utf-8"), 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2:
                        raise BenchmarkDataError(f"{self.name}: {os.path.join(qa_dir, txt)} line {n} should be "
                                                 "'question<TAB>answer'")
                    question, answer = parts
                    items.append(Item(f"{subtask}/{image}/{n}", os.path.join(img_dir, image),
                                      f"{question.strip()}\n{SHORT_ANSWER}",
                                      {"subtask": subtask, "image": image, "question": question.strip(),
                                       "answer": answer.strip()}))
        return items

    def score(self, root, items, predictions):
        records = [{"subtask": it.meta["subtask"], "image": it.meta["image"], "answer": it.meta["answer"],
                    "prediction": predictions[it.id]} for it in items if it.id in predictions]
        return metrics.mme_score(records)

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        # eval_tool/calculation.py's input: one file per subtask, "image<TAB>question<TAB>gt<TAB>prediction".
        paths, by_subtask = [], {}
        for it in items:
            if it.id in predictions:
                m = it.meta
                by_subtask.setdefault(m["subtask"], []).append(
                    "\t".join([m["image"], m["question"], m["answer"], predictions[it.id].replace("\n", " ")]))
        for subtask, lines in by_subtask.items():
            path = os.path.join(out_dir, "mme_results", model_id, f"{subtask}.txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            paths.append(path)
        return paths


class MMBench(Benchmark):
    """MMBench dev (English) in its official TSV (index, question, hint, A-D, answer, category, image as
    base64). Every question runs once per rotation of its options; circular accuracy counts a question only if
    all rotations are right. Without an answer column (the test split), the predictions go to a TSV for upload."""

    name, title, tsv, instruction = "mmbench", "MMBench", "mmbench_dev_20230712.tsv", CHOICE_EN

    def load(self, root):
        path = require(root, self.name, self.tsv)
        csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's default field size
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or any(k not in rows[0] for k in ("index", "question", "A", "B", "image")):
            raise BenchmarkDataError(f"{self.name}: {path} is not an MMBench TSV (needs columns index, question, "
                                     f"A, B, ..., image; has {list(rows[0]) if rows else 'no rows'})")
        items = []
        for row in rows:
            options = [row[c] for c in LETTERS[:8] if _present(row.get(c))]
            image = _base64_loader(row["image"], path, row["index"])
            for r in range(len(options)):
                rotated = options[r:] + options[:r]
                letters = LETTERS[: len(options)]
                question = row["question"] if not _present(row.get("hint")) else f"{row['hint']}\n{row['question']}"
                prompt = "\n".join([question] + [f"{c}. {o}" for c, o in zip(letters, rotated)] + [self.instruction])
                answer = row.get("answer")
                rotated_answer = (letters[(LETTERS.index(answer) - r) % len(options)]
                                  if _present(answer) and answer in LETTERS else None)
                items.append(Item(f"{row['index']}/{r}", image, prompt,
                                  {"index": row["index"], "round": r, "answer": rotated_answer, "options": rotated,
                                   "category": row.get("category"), "letters": letters}))
        return items

    def score(self, root, items, predictions):
        if any(it.meta["answer"] is None for it in items):
            return None
        records = [{"index": it.meta["index"], "round": it.meta["round"], "answer": it.meta["answer"],
                    "category": it.meta["category"],
                    "prediction": metrics.parse_choice(predictions[it.id], list(it.meta["letters"]),
                                                       it.meta["options"])}
                   for it in items if it.id in predictions]
        return metrics.mmbench_circular(records)

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        path = os.path.join(out_dir, f"{model_id}.tsv")  # round-0 predictions, one row per question
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["index", "round", "prediction", "answer"])
            for it in items:
                if it.id in predictions:
                    w.writerow([it.meta["index"], it.meta["round"], predictions[it.id], it.meta["answer"] or ""])
        return [path]


class MMBenchCN(MMBench):
    name, title, tsv, instruction = "mmbench_cn", "MMBench-CN", "mmbench_dev_cn_20231003.tsv", CHOICE_CN


class ScienceQA(Benchmark):
    """ScienceQA-IMG: the image questions of the test split. LLaVA layout: llava_test_CQM-A.json (prompts),
    images/test/, problems.json and pid_splits.json (answers); accuracy as LLaVA's eval_science_qa."""

    name, title = "sqa", "SQA-IMG"

    def load(self, root):
        path = require(root, self.name, "llava_test_CQM-A.json")
        problems = self._problems(root)
        folder = require(root, self.name, "images/test")
        items = []
        for row in read_json(path, self.name, list):
            if not isinstance(row, dict) or "conversations" not in row or "id" not in row:
                raise BenchmarkDataError(f"{self.name}: {path} entries need id and conversations")
            if "image" not in row:
                continue  # SQA-IMG: image questions only
            pid = str(row["id"])
            if pid not in problems:
                raise BenchmarkDataError(f"{self.name}: problem {pid} of {path} is not in problems.json")
            p = problems[pid]
            question = row["conversations"][0]["value"].replace("<image>", "").strip()
            letters = LETTERS[: len(p["choices"])]
            items.append(Item(pid, os.path.join(folder, row["image"]), f"{question}\n{CHOICE_EN}",
                              {"answer": letters[p["answer"]], "letters": letters, "options": p["choices"],
                               "subject": p.get("subject")}))
        return items

    def _problems(self, root):
        path = require(root, self.name, "problems.json")
        return entries(read_json(path, self.name, dict), path, self.name, ("choices", "answer"))

    def score(self, root, items, predictions):
        records = [{"answer": it.meta["answer"], "subject": it.meta["subject"],
                    "prediction": metrics.parse_choice(predictions[it.id], list(it.meta["letters"]),
                                                       it.meta["options"])}
                   for it in items if it.id in predictions]
        return metrics.choice_accuracy(records, group_key="subject")


class SEED(Benchmark):
    """SEED-Bench image questions from the official SEED-Bench.json (questions with choice_a..d and
    data_type 'image') and SEED-Bench-image/; accuracy overall and per question type."""

    name, title = "seed", "SEED-Bench"

    def load(self, root):
        path = require(root, self.name, "SEED-Bench.json")
        data = read_json(path, self.name, dict, ("questions", "question_type"))
        folder = require(root, self.name, "SEED-Bench-image")
        type_names = {v: k for k, v in data["question_type"].items()}
        items = []
        for q in data["questions"]:
            if q.get("data_type") != "image":
                continue  # SEED-IMG, as LLaVA-1.5 reports
            options = [q[f"choice_{c}"] for c in "abcd"]
            prompt = "\n".join([q["question"]] + [f"{c}. {o}" for c, o in zip("ABCD", options)] + [CHOICE_EN])
            items.append(Item(str(q["question_id"]), os.path.join(folder, q["data_id"]), prompt,
                              {"answer": q["answer"], "options": options,
                               "question_type": type_names.get(q["question_type_id"], str(q["question_type_id"]))}))
        if not items:
            raise BenchmarkDataError(f"{self.name}: {path} has no image questions")
        return items

    def score(self, root, items, predictions):
        records = [{"answer": it.meta["answer"], "question_type": it.meta["question_type"],
                    "prediction": metrics.parse_choice(predictions[it.id], list("ABCD"), it.meta["options"])}
                   for it in items if it.id in predictions]
        return metrics.choice_accuracy(records, group_key="question_type")

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        rows = [{"question_id": it.id, "prediction": predictions[it.id]} for it in items if it.id in predictions]
        return [dump_jsonl(rows, os.path.join(out_dir, "answers_upload", f"{model_id}.jsonl"))]


class LLaVABench(Benchmark):
    """LLaVA-Bench (in the wild): questions.jsonl + images/; judged by GPT-4 with LLaVA's
    eval_gpt_review_bench.py, which reads the answers file written here (LLaVA's answer format)."""

    name, title, max_new_tokens = "llava_bench", "LLaVA-W", 1024

    def load(self, root):
        path = require(root, self.name, "questions.jsonl")
        folder = require(root, self.name, "images")
        rows = read_jsonl(path, self.name, ("question_id", "image", "text"))
        if "label" in rows[0] or "answer_id" in rows[0]:  # LLaVA question files carry neither
            raise BenchmarkDataError(f"{self.name}: {path} is not a question file{_looks_like(rows[0])}")
        return [Item(str(r["question_id"]), os.path.join(folder, r["image"]), r["text"],
                     {"question_id": r["question_id"], "category": r.get("category")}) for r in rows]

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        rows = [{"question_id": it.meta["question_id"], "prompt": it.prompt, "text": predictions[it.id],
                 "answer_id": f"{model_id}-{it.id}", "model_id": model_id, "metadata": {}}
                for it in items if it.id in predictions]
        return [dump_jsonl(rows, os.path.join(out_dir, "answers", f"{model_id}.jsonl"))]


class MMVet(Benchmark):
    """MM-Vet from the official mm-vet.json ({"v1_0": {imagename, question, answer, capability}}) and images/;
    graded by the GPT-4 evaluator, which takes {"v1_0": answer, ...}."""

    name, title, max_new_tokens = "mmvet", "MM-Vet", 1024

    def load(self, root):
        path = require(root, self.name, "mm-vet.json")
        data = entries(read_json(path, self.name, dict), path, self.name, ("imagename", "question"))
        folder = require(root, self.name, "images")
        return [Item(k, os.path.join(folder, v["imagename"]), v["question"], {}) for k, v in data.items()]

    def write_outputs(self, root, items, predictions, out_dir, model_id):
        result = {it.id: predictions[it.id] for it in items if it.id in predictions}
        return [dump_json(result, os.path.join(out_dir, "results", f"{model_id}.json"))]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    VQAv2(), GQA(), VizWiz(), ScienceQA(), TextVQA(), POPE(), MME(), MMBench(), MMBenchCN(), SEED(), LLaVABench(),
    MMVet())}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# --------------------------------------------------------------------------------------------------- helpers
def _present(value) -> bool:
    """MMBench marks an absent option or hint with an empty cell or 'nan'."""
    return value is not None and str(value).strip() != "" and str(value).strip().lower() not in ("nan", "none")


def _base64_loader(data: str, path: str, index: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        except (ValueError, OSError) as e:
            raise BenchmarkDataError(f"{path}: the image of question {index} cannot be decoded ({e})") from None

    return load


def _check_ids(predictions: dict, truth: dict, path: str, bench: str) -> None:
    missing = [k for k in predictions if k not in truth]
    if missing:
        raise BenchmarkDataError(f"{bench}: {len(missing)} predicted question(s) are not in {path}, e.g. "
                                 f"{missing[:3]}")
