"""scripts/guidance_side_by_side.py reads back the tables `ivtp ablate` writes (docs/testbed.md's old/new table)."""

import os
import subprocess
import sys

from ivtp.testbed.ablate import Row, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "guidance_side_by_side.py")


def _row(name, colour, shape, position, on):
    metrics = {"gqa": {"accuracy": 60.0}, "gqa_by_type": {"colour": colour, "shape": shape, "position": position},
               "selection": {"kept_on_target_share": {"colour": on[0], "shape": on[1], "position": on[2]}}}
    return Row("extensions", name, "finetuned", 7, {}, metrics=metrics)


def test_the_table_reads_ablate_markdown(tmp_path):
    report = tmp_path / "ablate.md"
    report.write_text(markdown([_row("paper:clip", 50.0, 80.0, 41.0, (0.1, 0.4, 0.25)),
                                _row("paper:none", 40.0, 70.0, 61.0, (0.2, 0.2, 0.2))]))
    out = subprocess.run([sys.executable, SCRIPT, f"new={report}", "--rows", "paper:none,paper:clip,absent"],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    # header, rule, then the rows in the order asked (an absent row is left out): acc, acc c+s+p (mean of the
    # three types), on target mean then colour / shape / position, in percent
    assert out[2:] == ["| paper:none | new | 60.0 | 57.0 | 20.0 | 20.0 | 20.0 | 20.0 |",
                       "| paper:clip | new | 60.0 | 57.0 | 25.0 | 10.0 | 40.0 | 25.0 |"]


def test_a_report_without_a_label_is_refused(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "ablate.md"), "--rows", "paper:clip"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "expected LABEL=PATH" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_report_is_refused(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, f"new={tmp_path / 'absent.md'}", "--rows", "paper:clip"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no such report" in result.stderr and "Traceback" not in result.stderr
