"""`ivtp eval`: batched, resumable, shardable benchmark runs.

Files in the output folder:
- ``run.json``: what produced the predictions (benchmark, model, prune config, generation length). A resumed run
  must match it, so predictions of two settings never mix in one file.
- ``predictions.jsonl`` (one chunk) or ``chunks/{N}_{k}.jsonl`` (chunk k of N, LLaVA's naming): one line per
  answered question, appended and flushed batch by batch. A run that is interrupted loses at most the batch in
  flight; started again, it skips the ids already answered.
- ``results.json``: the merged metrics (local scorers) and the paths of submission or judge files, written by
  whichever chunk finishes last, or by ``ivtp eval --score-only``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable

from PIL import Image
from tqdm import tqdm

from ivtp.eval.benchmarks import Benchmark, BenchmarkDataError, Item
from ivtp.eval.metrics import selection_metrics
from ivtp.names import ON_BAD_IMAGE

logger = logging.getLogger(__name__)
COMPARED_RUN_KEYS = ("benchmark", "model", "prune_config", "max_new_tokens", "image_aspect_ratio")


def chunk_of(items: list, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous chunk k of N, sized ceil(len/N) as LLaVA's get_chunk (the last chunks may be short or empty)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk index {chunk_idx} is not in [0, {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size : (chunk_idx + 1) * size]


def prediction_path(out_dir: str, num_chunks: int, chunk_idx: int) -> str:
    if num_chunks == 1:
        return os.path.join(out_dir, "predictions.jsonl")
    return os.path.join(out_dir, "chunks", f"{num_chunks}_{chunk_idx}.jsonl")


def read_predictions(path: str, benchmark: str, repair: bool = False) -> dict[str, dict]:
    """The predictions already in `path`, by question id. A last line cut off by an interruption is dropped (and,
    with `repair`, removed from the file so appends stay well-formed); any other bad line is an error."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    done: dict[str, dict] = {}
    good_bytes = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            good_bytes += len(raw) + 1
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            if n == len(lines):  # the interrupted final write: no newline after it
                logger.warning("%s: dropping an incomplete last line (an interrupted write)", path)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise BenchmarkDataError(f"{path} line {n} is not valid JSON; it is not a predictions file of ivtp "
                                     "eval, or it was edited") from None
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
            raise BenchmarkDataError(f"{path} line {n} is not an ivtp eval prediction (needs question_id, text)")
        if row.get("benchmark") != benchmark:
            raise BenchmarkDataError(f"{path} holds predictions for benchmark {row.get('benchmark')!r}, not "
                                     f"{benchmark!r}: use another --out folder")
        done[str(row["question_id"])] = row
        good_bytes += len(raw) + 1
    return done


def check_run(out_dir: str, run: dict) -> None:
    """Write run.json, or check that an existing one describes the same run."""
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in COMPARED_RUN_KEYS if old.get(k) != run.get(k)]
        if diff:
            raise BenchmarkDataError(f"{out_dir} holds a run with other settings ({', '.join(diff)} differ, see "
                                     f"{path}); use another --out folder, or delete it to start over")
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(run, f, indent=2)


def open_image(item: Item, pad_fill: tuple[int, int, int] | None) -> Image.Image | None:
    """The item's image as RGB, padded to a square of the processor's mean colour (LLaVA-1.5's 'pad')."""
    from ivtp.inference import load_image

    if item.image is None:
        return None
    return load_image(item.image() if callable(item.image) else item.image, pad_fill)


def run_chunk(model, processor, bench: Benchmark, items: list[Item], out_dir: str, *, num_chunks: int = 1,
              chunk_idx: int = 0, batch_size: int = 8, max_new_tokens: int | None = None, pad: bool = True,
              progress: bool = True, use_images: bool = True, on_bad_image: str = "stop",
              before_batch: Callable[[list[Item]], None] | None = None) -> int:
    """Answer this chunk's unanswered items, appending each batch to its predictions file; the count answered.
    use_images=False asks the questions without their images (a floor for what the image adds); before_batch
    sees each batch's items before it runs (the testbed's oracle sets the patches to keep from them).

    An image that cannot be decoded stops the run with its question id (the batches before it are saved), or
    with on_bad_image='skip' is written as a blank answer marked "skipped", which scores as wrong and which
    results.json counts; a resumed run tries skipped questions again."""
    from ivtp.errors import InputError
    from ivtp.inference import Sample, check_prompts, generate

    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, not {on_bad_image!r}")
    path = prediction_path(out_dir, num_chunks, chunk_idx)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    done = read_predictions(path, bench.name, repair=True)
    todo = [it for it in chunk_of(items, num_chunks, chunk_idx) if it.id not in done or done[it.id].get("skipped")]
    # A missing image or an over-long prompt should fail now, not hours in: check before any compute.
    missing = [it.image for it in todo if isinstance(it.image, str) and not os.path.isfile(it.image)]
    if missing:
        raise BenchmarkDataError(f"{bench.name}: {len(missing)} image(s) missing, e.g. {missing[0]}")
    skipped = _unreadable_images(bench, todo, on_bad_image) if use_images else {}
    todo = [it for it in todo if it.id not in skipped]
    max_new = max_new_tokens or bench.max_new_tokens
    check_prompts(model, processor, [(it.prompt, use_images and it.image is not None) for it in todo], max_new,
                  ids=[f"{bench.name} question {it.id}" for it in todo])
    mean = getattr(processor.image_processor, "image_mean", None)
    fill = tuple(int(255 * m) for m in mean) if pad and mean is not None else None
    bar = tqdm(total=len(todo), desc=f"{bench.name} {chunk_idx + 1}/{num_chunks}", disable=not progress)
    with open(path, "a", encoding="utf-8") as out, bar:
        for it, problem in skipped.values():
            out.write(json.dumps(_row(bench, it, "", skipped=problem), ensure_ascii=False) + "\n")
        for start in range(0, len(todo), batch_size):
            batch, samples = [], []
            for it in todo[start : start + batch_size]:
                try:
                    image = open_image(it, fill) if use_images else None
                except InputError as e:  # undecodable (a file, or base64 in a TSV)
                    if on_bad_image == "stop":
                        raise BenchmarkDataError(f"{bench.name} question {it.id}: {e}; the answers so far are "
                                                 "saved (--on-bad-image skip answers the rest)") from None
                    logger.warning("%s question %s skipped: %s", bench.name, it.id, e)
                    out.write(json.dumps(_row(bench, it, "", skipped=str(e)), ensure_ascii=False) + "\n")
                    continue
                batch.append(it)
                samples.append(Sample(it.prompt, image))
            if before_batch is not None:
                before_batch(batch)
            results = generate(model, processor, samples, max_new_tokens=max_new, batch_size=len(batch)) if (
                batch) else []
            for it, r in zip(batch, results):
                out.write(json.dumps(_row(bench, it, r.answer, visual_tokens=r.visual_tokens, **selection_record(r)),
                                     ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a finished batch survives a crash or a pre-empted job
            bar.update(len(batch))
    return len(todo) + len(skipped)


def _unreadable_images(bench: Benchmark, items: list[Item], on_bad_image: str) -> dict[str, tuple[Item, str]]:
    """Image files among `items` that are not images at all, found from their headers (PIL reads no pixels, so
    this costs about a file open each) before any compute: on_bad_image='stop' raises for the first, 'skip'
    returns them by id, with the reason. A file that is cut short past its header is only found when decoded."""
    from ivtp.inference import image_problem

    bad = {it.id: (it, problem) for it in items if isinstance(it.image, str) and (problem := image_problem(it.image))}
    if bad and on_bad_image == "stop":
        it, problem = next(iter(bad.values()))
        raise BenchmarkDataError(f"{bench.name} question {it.id}: {problem} ({len(bad)} unreadable image(s) in all; "
                                 "--on-bad-image skip answers the rest)")
    for it, problem in bad.values():
        logger.warning("%s question %s skipped: %s", bench.name, it.id, problem)
    return bad


def _row(bench: Benchmark, item: Item, text: str, **fields) -> dict:
    """One line of a predictions file."""
    return {"benchmark": bench.name, "question_id": item.id, "prompt": item.prompt, "text": text, **fields}


def selection_record(result) -> dict:
    """What a prediction line keeps of the pruning, for `selection_metrics`: the patches that reached the LLM and
    those left at the end (empty for merged tokens), and stage 2's pseudo-CLS source and selected words."""
    if not result.visual_tokens:  # a text-only question
        return {}
    record = {"stage1_patches": result.stage1_patches, "kept_patches": result.kept_patches}
    if "pseudo_cls_source" in result.guidance:
        record["pseudo_cls_source"] = result.guidance["pseudo_cls_source"]
        record["selected_tokens"] = [t["token"] for t in result.guidance["selected_tokens"]]
    return record


def collect(bench: Benchmark, items: list[Item], out_dir: str, num_chunks: int) -> dict[str, dict] | None:
    """All predictions of the run if every chunk is complete, else None. Merges chunk files into
    predictions.jsonl (in question order), as LLaVA's scripts do with cat."""
    merged: dict[str, dict] = {}
    for k in range(num_chunks):
        merged.update(read_predictions(prediction_path(out_dir, num_chunks, k), bench.name))
    if any(it.id not in merged for it in items):
        return None
    if num_chunks > 1:
        path = prediction_path(out_dir, 1, 0)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(merged[it.id], ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # atomic: two chunks finishing together write the same file
    return merged


def finish(bench: Benchmark, root: str, items: list[Item], out_dir: str, num_chunks: int, run: dict) -> dict | None:
    """Score the merged predictions and write submission files; None while chunks are still missing."""
    rows = collect(bench, items, out_dir, num_chunks)
    if rows is None:
        return None
    predictions = {it.id: rows[it.id]["text"] for it in items}  # collect() checked every item has a row
    model_id = run.get("model_id") or "ivtp"
    finals = [rows[it.id]["visual_tokens"][-1] for it in items if rows[it.id].get("visual_tokens")]
    result = {
        "benchmark": bench.name,
        "title": bench.title,
        "model": run.get("model"),
        "prune_config": run.get("prune_config"),
        "questions": len(items),
        "metrics": bench.score(root, items, predictions),
        "files": bench.write_outputs(root, items, predictions, out_dir, model_id),
        "mean_final_visual_tokens": round(sum(finals) / len(finals), 2) if finals else None,
    }
    skipped = [it.id for it in items if rows[it.id].get("skipped")]
    if skipped:  # scored as blank (wrong) answers above
        result["skipped"] = {"questions": len(skipped), "reason": "unreadable image", "scored_as": "wrong",
                             "question_ids": skipped[:50]}
    targets = bench.selection_targets(root, items)
    if targets:  # a split that knows where each question's answer lies (the testbed's GQA layout)
        result["selection"] = selection_metrics([rows[it.id] for it in items], targets)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    return result


def evaluate(model, processor, bench: Benchmark, root: str, out_dir: str, run: dict, *, limit: int | None = None,
             num_chunks: int = 1, chunk_idx: int = 0, batch_size: int = 8, pad: bool = True,
             progress: bool = True, items: list[Item] | None = None, **chunk_options) -> dict:
    """One chunk of a benchmark run; then, if all chunks are done, the merged result. Returns a summary dict
    (``result`` is None while other chunks are still running). `items`: the benchmark already loaded."""
    t0 = time.time()
    items = load_items(bench, root, limit) if items is None else items
    check_run(out_dir, run)
    answered = run_chunk(model, processor, bench, items, out_dir, num_chunks=num_chunks, chunk_idx=chunk_idx,
                         batch_size=batch_size, max_new_tokens=run.get("max_new_tokens"), pad=pad,
                         progress=progress, **chunk_options)
    result = finish(bench, root, items, out_dir, num_chunks, run)
    return {"out": out_dir, "answered_now": answered, "chunk": [chunk_idx, num_chunks],
            "seconds": round(time.time() - t0, 2), "result": result}


def check_scoring(bench: Benchmark, root: str, items: list[Item]) -> None:
    """Read every file the scorer and the submission writer will read, with blank answers, so that a bad answer
    file fails before the first question rather than after the last."""
    import tempfile

    blank = {it.id: "" for it in items}
    bench.score(root, items, blank)
    bench.selection_targets(root, items)
    with tempfile.TemporaryDirectory() as scratch:
        bench.write_outputs(root, items, blank, scratch, "check")


def load_items(bench: Benchmark, root: str, limit: int | None) -> list[Item]:
    """The benchmark's questions (the first `limit`), with the files its scorer reads checked (check_scoring)."""
    items = bench.load(root)
    seen: set[str] = set()
    dup = next((it.id for it in items if it.id in seen or seen.add(it.id)), None)
    if dup is not None:
        raise BenchmarkDataError(f"{bench.name}: question id {dup!r} appears twice in {root}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be positive, got {limit}")
        items = items[:limit]
    check_scoring(bench, root, items)
    return items
