"""Writing JSON and JSON-lines files: the one writer the generator, the benchmark outputs and the testbed use."""

from __future__ import annotations

import json
import os


def dump_json(obj, path: str, indent: int | None = None) -> str:
    """Write `obj` as JSON (UTF-8, non-ASCII kept, a final newline), creating the folder; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:  # dumps, not dump: only dumps uses the C encoder
        f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    return path


def dump_jsonl(rows, path: str) -> str:
    """Write one JSON object per line, creating the folder; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
