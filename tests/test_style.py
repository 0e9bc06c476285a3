"""Style rules the code keeps, checked like tests: lines of at most 100 characters in every
Python file (``ruff``, configured in pyproject.toml), and no function of the runtime (what a
collective call runs: ``symmtriton/`` outside ``tools/``, and ``kernels/``) over 60 lines."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the longest function the runtime keeps, in lines (``def`` to its last line).
MAX_FUNCTION_LINES = 60


def _runtime_files():
    pkg = ROOT / "symmtriton"
    yield from (p for p in pkg.rglob("*.py") if "tools" not in p.relative_to(pkg).parts)
    yield from (ROOT / "kernels").glob("*.py")


def test_lines_fit_100_columns():
    ruff = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if ruff.returncode:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_runtime_functions_are_short():
    long = []
    for path in _runtime_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over the limit:\n" + "\n".join(long)
