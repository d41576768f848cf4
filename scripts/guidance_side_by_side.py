"""Issue 17's old and new selection tables side by side (docs/testbed.md, "Does the instruction guide?").

Reads `ivtp ablate` markdown reports (the `extensions` suite of each) and prints one markdown table: per row, the
overall accuracy, the mean accuracy of colour/shape/position questions, and kept_on_target_share on them (mean,
then colour/shape/position), for each report given as LABEL=PATH.

    python scripts/guidance_side_by_side.py "old=docs/testbed/guidance_tuned_v2_fresh.md" \
        "new finetuned=ivtp_out/tb32/ablate_ext/ablate.md" --rows paper:clip,paper:none
"""

from __future__ import annotations

import argparse
import os
import sys


def read_rows(path: str, suite: str = "extensions") -> dict[str, dict[str, str]]:
    """{row name: {column: cell}} of one suite's table in an ablate.md."""
    rows, header, inside = {}, None, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                inside = line[3:].strip() == suite
                header = None
            elif inside and line.startswith("|"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if header is None:
                    header = cells
                elif not set(cells[0]) <= {"-", " "}:
                    rows[cells[1]] = _named(header, cells)
    return rows


def _named(header: list[str], cells: list[str]) -> dict[str, str]:
    """Columns by name; the second colour/shape/position (the on-target shares) get an "on " prefix."""
    out, seen = {}, set()
    for name, cell in zip(header, cells):
        key = f"on {name}" if name in seen else name
        seen.add(name)
        out[key] = cell
    return out


def csp_accuracy(row: dict[str, str]) -> str:
    """The mean accuracy of the three selection question types (older reports have no such column)."""
    if row.get("acc c+s+p"):
        return row["acc c+s+p"]
    return f"{sum(float(row[q]) for q in ('colour', 'shape', 'position')) / 3:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="LABEL=PATH")
    p.add_argument("--rows", required=True, help="comma-separated row names")
    p.add_argument("--suite", default="extensions")
    args = p.parse_args(argv)
    reports = []
    for item in args.reports:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item}: expected LABEL=PATH")
        if not os.path.isfile(path):
            p.error(f"{path}: no such report (an ablate.md)")
        reports.append((label, read_rows(path, args.suite)))
    print("| row | model | acc | acc c+s+p | on target c+s+p | colour | shape | position |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.rows.split(","):
        for label, rows in reports:
            r = rows.get(name)
            if r is None:
                continue
            print(f"| {name} | {label} | {r['GQA-layout acc']} | {csp_accuracy(r)} | {r['on target c+s+p']} | "
                  f"{r['on colour']} | {r['on shape']} | {r['on position']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
