"""The core package stays free of lmms-eval: only the plugin module imports it, and nothing imports the plugin
(lmms-eval finds it through its entry point). Runs in every venv, with or without the `lmms` extra."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.path.join(ROOT, "ivtp", "integrations", "lmms_eval.py")


def _imported_modules(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_core_module_imports_lmms_eval_or_the_plugin():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "ivtp")):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == PLUGIN:
                continue
            bad = {m for m in _imported_modules(path)
                   if m.split(".")[0] == "lmms_eval" or m.startswith("ivtp.integrations.lmms_eval")}
            if bad:
                offenders.append(f"{os.path.relpath(path, ROOT)}: {sorted(bad)}")
    assert not offenders, "core modules import lmms-eval or the plugin:\n" + "\n".join(offenders)


def test_importing_the_core_loads_no_lmms_eval():
    code = ("import sys, ivtp, ivtp.cli, ivtp.inference, ivtp.models, ivtp.integrations; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lmms_eval'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
