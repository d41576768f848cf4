"""Write data/fixtures/eval/<benchmark>/: a few questions of each of the 12 benchmarks in the folder layout and
file formats that `ivtp eval` reads (LLaVA-1.5's playground/data/eval and the official releases), with small
generated images. Deterministic; used by tests/eval and as a picture of the layouts in docs/evaluation.md.

    python scripts/make_eval_fixtures.py
"""

import base64
import csv
import io
import json
import os
import shutil

import numpy as np
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fixtures", "eval")
SHORT = "Answer the question using a single word or phrase."
MME_SUBTASKS_SPLIT = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
MME_SUBTASKS_FLAT = ("existence", "count", "position", "color", "OCR", "commonsense_reasoning",
                     "numerical_calculation", "text_translation", "code_reasoning")


def image(seed: int) -> Image.Image:
    """A small non-square picture, so the evaluation's pad-to-square is exercised."""
    rng = np.random.RandomState(seed)
    coarse = Image.fromarray((rng.rand(5, 7, 3) * 255).astype("uint8"))  # smooth blobs: small files
    return coarse.resize((56, 40), Image.BILINEAR)


def save(img: Image.Image, *parts: str) -> None:
    path = os.path.join(ROOT, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def dump(obj, *parts: str, lines: bool = False) -> None:
    path = os.path.join(ROOT, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in obj)
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)


def vqav2() -> None:
    qs = [(1, "How many dogs are there?"), (2, "What colour is the bus?"), (3, "Is it raining?")]
    dump([{"question_id": i * 1000 + 7, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"{q}\n{SHORT}",
           "category": "default"} for i, q in qs], "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", lines=True)
    # The full test2015 list: the EvalAI upload must hold every question, blank where unanswered.
    dump([{"question_id": i * 1000 + 7, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"q{i}\n{SHORT}",
           "category": "default"} for i in range(1, 5)], "vqav2", "llava_vqav2_mscoco_test2015.jsonl", lines=True)
    for i, _ in qs:
        save(image(i), "vqav2", "test2015", f"COCO_test2015_{i:012d}.jpg")
    # The official val release, scored locally.
    dump({"questions": [{"image_id": i, "question": q, "question_id": i * 10} for i, q in qs]},
         "vqav2_val", "v2_OpenEnded_mscoco_val2014_questions.json")
    answers = {1: ["2"] * 6 + ["two"] * 2 + ["3"] * 2, 2: ["red"] * 2 + ["orange"] * 8, 3: ["no"] * 10}
    dump({"annotations": [{"question_id": i * 10, "image_id": i, "answers": [
        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers[i])]}
        for i, _ in qs]}, "vqav2_val", "v2_mscoco_val2014_annotations.json")
    for i, _ in qs:
        save(image(i), "vqav2_val", "val2014", f"COCO_val2014_{i:012d}.jpg")


def gqa() -> None:
    qs = [("201", "n1", "Is the cup on the left?", "yes", "verify"), ("202", "n1", "What is on the table?", "cup",
                                                                        "query"),
          ("203", "n2", "Which color is the car?", "red", "query")]
    dump([{"question_id": q, "image": f"{img}.jpg", "text": f"{t}\n{SHORT}", "category": "default"}
          for q, img, t, _, _ in qs], "gqa", "llava_gqa_testdev_balanced.jsonl", lines=True)
    dump({q: {"imageId": img, "question": t, "answer": a, "fullAnswer": a, "isBalanced": True,
              "types": {"structural": s, "semantic": "rel", "detailed": "x"}} for q, img, t, a, s in qs},
         "gqa", "data", "testdev_balanced_questions.json")
    for n, img in enumerate(("n1", "n2")):
        save(image(10 + n), "gqa", "data", "images", f"{img}.jpg")


def vizwiz() -> None:
    names = [f"VizWiz_test_{i:08d}.jpg" for i in range(3)]
    unans = "When the provided information is insufficient, respond with 'Unanswerable'."
    qs = ["What is this?", "What colour is this shirt?", "Can you read the label?"]
    dump([{"question_id": i, "image": n, "text": f"{q}\n{unans}\n{SHORT}"} for i, (n, q) in enumerate(zip(names, qs))],
         "vizwiz", "llava_test.jsonl", lines=True)
    for i, n in enumerate(names):
        save(image(20 + i), "vizwiz", "test", n)


def sqa() -> None:
    problems = {
        "5": {"question": "Which of these states is farthest north?", "choices": ["Maine", "Ohio", "Texas"],
              "answer": 0, "hint": "", "image": "image.png", "subject": "social science", "split": "test"},
        "9": {"question": "Which animal's feet are adapted for swimming?", "choices": ["duck", "cat"], "answer": 0,
              "hint": "Ducks live near water.", "image": "image.png", "subject": "natural science", "split": "test"},
        "12": {"question": "What is 2 + 2?", "choices": ["3", "4"], "answer": 1, "hint": "", "image": None,
               "subject": "language science", "split": "test"},
    }
    dump(problems, "sqa", "problems.json")
    dump({"train": [], "val": [], "test": sorted(problems, key=int)}, "sqa", "pid_splits.json")
    rows = []
    for pid, p in problems.items():
        options = " ".join(f"({c}) {o}" for c, o in zip("ABC", p["choices"]))
        text = f"Context: {p['hint'] or 'N/A'}\nQuestion: {p['question']}\nOptions: {options}"
        row = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if p["image"] else "") + text},
                                            {"from": "gpt", "value": "ABC"[p["answer"]]}]}
        if p["image"]:
            row["image"] = f"{pid}/image.png"
            save(image(30 + int(pid)), "sqa", "images", "test", pid, "image.png")
        rows.append(row)
    dump(rows, "sqa", "llava_test_CQM-A.json")


def textvqa() -> None:
    qs = [(34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["dakota"] * 8 + ["dakota digital"] * 2),
          (34603, "003a8ae2ef43b901", "what does the small white text say?", ["copenhagen"] * 3 + ["cph"] * 7),
          (34604, "00685bc495504d61", "what number is on the player's jersey?", ["22"] * 10)]
    dump([{"question_id": q, "image": f"{img}.jpg", "text": f"{t}\nReference OCR token: dakota, 22\n{SHORT}",
           "category": "default"} for q, img, t, _ in qs], "textvqa", "llava_textvqa_val_v051_ocr.jsonl", lines=True)
    dump({"dataset_name": "textvqa", "dataset_version": "0.5.1", "dataset_type": "val",
          "data": [{"question_id": q, "image_id": img, "question": t, "answers": a} for q, img, t, a in qs]},
         "textvqa", "TextVQA_0.5.1_val.json")
    for n, img in enumerate(("003a8ae2ef43b901", "00685bc495504d61")):
        save(image(40 + n), "textvqa", "train_images", f"{img}.jpg")


def pope() -> None:
    qs, qid = [], 1
    for cat in ("adversarial", "popular", "random"):
        rows = []
        for obj, label in (("dog", "yes"), ("fork", "no")):
            rows.append({"question_id": qid, "image": f"COCO_val2014_{qid:012d}.jpg",
                         "text": f"Is there a {obj} in the image?", "label": label})
            qs.append({"question_id": qid, "image": rows[-1]["image"], "text": f"{rows[-1]['text']}\n{SHORT}",
                       "category": cat})
            save(image(50 + qid), "pope", "val2014", rows[-1]["image"])
            qid += 1
        dump(rows, "pope", "coco", f"coco_pope_{cat}.json", lines=True)
    dump(qs, "pope", "llava_pope_test.jsonl", lines=True)


def mme() -> None:
    base = ("mme", "MME_Benchmark_release_version")
    for k, sub in enumerate(MME_SUBTASKS_SPLIT + MME_SUBTASKS_FLAT):
        img_parts, qa_parts = ((sub, "images"), (sub, "questions_answers_YN")) if sub in MME_SUBTASKS_SPLIT \
            else ((sub,), (sub,))
        name = f"{k:04d}"
        save(image(60 + k), *base, *img_parts, f"{name}.jpg" if sub != "code_reasoning" else f"{name}.png")
        path = os.path.join(ROOT, *base, *qa_parts, f"{name}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"Is there a {sub} cue in this image? Please answer yes or no.\tYes\n"
                    f"Is there no {sub} cue in this image? Please answer yes or no.\tNo\n")


def mmbench(folder: str, tsv: str, cn: bool) -> None:
    def b64(seed):
        buf = io.BytesIO()
        image(seed).save(buf, format="JPEG")
        return base64.b64encode(buf.getvalue()).decode()

    rows = [
        {"index": 0, "question": "这是什么颜色?" if cn else "What colour is the square?", "hint": "nan",
         "A": "red", "B": "green", "C": "blue", "D": "yellow", "answer": "C", "category": "attribute_recognition",
         "l2-category": "finegrained_perception", "source": "fixture", "split": "dev", "image": b64(70)},
        {"index": 1, "question": "Which is bigger?", "hint": "Look at the shapes.", "A": "circle", "B": "square",
         "C": "triangle", "D": "nan", "answer": "A", "category": "spatial_relationship", "l2-category": "relation",
         "source": "fixture", "split": "dev", "image": b64(71)},
    ]
    path = os.path.join(ROOT, folder, tsv)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def seed() -> None:
    qs = [{"question_id": "101669", "question": "How many towels are in the image?", "choice_a": "One",
           "choice_b": "Two", "choice_c": "Three", "choice_d": "Four", "answer": "A", "data_type": "image",
           "data_id": "1454426_2591111986.jpg", "question_type_id": 5},
          {"question_id": "101670", "question": "What is the main object?", "choice_a": "A cup", "choice_b": "A car",
           "choice_c": "A tree", "choice_d": "A dog", "answer": "D", "data_type": "image",
           "data_id": "1454426_2591111987.jpg", "question_type_id": 1},
          {"question_id": "v1", "question": "What happens next?", "choice_a": "a", "choice_b": "b", "choice_c": "c",
           "choice_d": "d", "answer": "B", "data_type": "video", "data_id": "v1.mp4", "question_type_id": 10}]
    dump({"questions": qs, "question_type": {"Scene Understanding": 1, "Instance Counting": 5,
                                             "Action Recognition": 10}}, "seed", "SEED-Bench.json")
    for n, q in enumerate(qs[:2]):
        save(image(80 + n), "seed", "SEED-Bench-image", q["data_id"])


def llava_bench() -> None:
    qs = [{"question_id": 0, "image": "001.jpg", "text": "Describe this photo in detail.", "category": "detail"},
          {"question_id": 1, "image": "001.jpg", "text": "What is unusual here?", "category": "complex"}]
    dump(qs, "llava_bench", "questions.jsonl", lines=True)
    dump([{"id": "001", "image": "001.jpg", "caption": "Noise."}], "llava_bench", "context.jsonl", lines=True)
    dump([{"question_id": q["question_id"], "text": "reference", "answer_id": "gpt4", "model_id": "gpt4",
           "metadata": {}} for q in qs], "llava_bench", "answers_gpt4.jsonl", lines=True)
    save(image(90), "llava_bench", "images", "001.jpg")


def mmvet() -> None:
    dump({f"v1_{i}": {"imagename": f"v1_{i}.png", "question": q, "answer": a, "capability": ["rec"]}
          for i, (q, a) in enumerate([("What is written here?", "hello"), ("How many apples?", "3")])},
         "mmvet", "mm-vet.json")
    for i in range(2):
        save(image(95 + i), "mmvet", "images", f"v1_{i}.png")


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    vqav2(), gqa(), vizwiz(), sqa(), textvqa(), pope(), mme(), seed(), llava_bench(), mmvet()
    mmbench("mmbench", "mmbench_dev_20230712.tsv", cn=False)
    mmbench("mmbench_cn", "mmbench_dev_cn_20231003.tsv", cn=True)
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
