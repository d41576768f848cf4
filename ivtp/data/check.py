"""`ivtp data check`: find what would stop a 10-hour run before it starts.

Reads a LLaVA JSON file and reports, per sample id: missing images, unreadable images, malformed conversations
(empty, wrong turn order, an <image> without an image file, in an answer, or twice) and samples longer than model_max_length once each
image is expanded to its visual tokens.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from ivtp.data.templates import ConversationError, placeholder_problem, place_image, render, tokenize


@dataclass
class CheckReport:
    samples: int = 0
    with_image: int = 0
    text_only: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # problem -> up to 10 "id: detail"

    def add(self, kind: str, detail: str) -> None:
        self.problems[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 10:
            self.examples[kind].append(detail)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"samples": self.samples, "with_image": self.with_image, "text_only": self.text_only,
                "problems": dict(self.problems), "examples": self.examples, "ok": self.ok}


def check_file(data_path: str, image_folder: str | None, tokenizer=None, template: str = "vicuna_v1",
               image_tokens: "int | Callable" = 576, model_max_length: int = 2048, progress: bool = True) -> CheckReport:
    """image_tokens: placeholders per image, or (LLaVA-NeXT: ivtp.data.llava.placeholders_per_image) a function of
    the image's (height, width), read from its header; an image that cannot be read is not counted for length."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"data file not found: {data_path}")
    with open(data_path) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversationError(f"{data_path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise ConversationError(f"{data_path}: a LLaVA data file is a JSON list of samples")
    report = CheckReport()
    for i, rec in enumerate(tqdm(records, desc="checking", disable=not progress)):
        report.samples += 1
        sid = str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"
        if not isinstance(rec, dict):
            report.add("malformed_record", f"{sid}: not a JSON object")
            continue
        image = rec.get("image")
        convs = place_image(rec.get("conversations") or [], bool(image))
        report.with_image += bool(image)
        report.text_only += not image
        size = _check_image(report, sid, os.path.join(image_folder or "", image)) if image else None
        problem = placeholder_problem(convs, bool(image))
        if problem is not None:
            report.add(problem[0], f"{sid}: {problem[1]}")
        try:
            rendered = render(template, convs, getattr(tokenizer, "eos_token", "</s>") or "</s>", sid)
        except ConversationError as e:
            report.add("malformed_conversation", str(e))
            continue
        per_image = image_tokens(size) if callable(image_tokens) and size is not None else image_tokens
        if tokenizer is not None and not callable(per_image):
            n_tokens = len(tokenize(rendered, tokenizer, per_image)[0])
            if n_tokens > model_max_length:
                report.add("too_long", f"{sid}: {n_tokens} tokens > {model_max_length}")
    return report


def _check_image(report: CheckReport, sid: str, path: str) -> tuple[int, int] | None:
    """The image's (height, width) from its header, or None (reported) when it is missing or unreadable."""
    if not os.path.isfile(path):
        report.add("missing_image", f"{sid}: {path}")
        return None
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file's structure without decoding pixels
            return im.size[1], im.size[0]
    except Exception as e:  # PIL raises many types for broken files
        report.add("unreadable_image", f"{sid}: {path}: {e.__class__.__name__}")
        return None


def format_report(report: CheckReport) -> str:
    lines = [f"{report.samples} samples: {report.with_image} with an image, {report.text_only} text-only"]
    if report.ok:
        lines.append("no problems found")
    for kind, n in sorted(report.problems.items()):
        lines.append(f"{kind}: {n}")
        lines.extend(f"  {ex}" for ex in report.examples[kind])
    return "\n".join(lines)
