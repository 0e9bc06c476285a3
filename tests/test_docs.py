"""Every repository path the documentation cites exists: in every Markdown file, and in the
comments and docstrings of symmtriton/, kernels/, tests/, examples/ and benchmarks/ (plus the
comments of benchmarks/*.sh). A cited path is a run of path characters that starts with a
top-level folder (``kernels/lines.py``, ``benchmarks/results/...``, ``docs/...``) or, relative to
the citing file or a package folder, with ``results/``, ``latest/``, ``archive/``, ``ops/``,
``backends/`` or an archive folder (``2026-11-26_3ac72a2/...``). URLs, glob patterns
(``*``) and placeholders (``<op>``) are not paths; ``name.{csv,json}`` stands for both files."""

import ast
import io
import os
import pathlib
import re
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODE_DIRS = ("symmtriton", "kernels", "tests", "examples", "benchmarks")
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "node_modules"}
PREFIXES = ("symmtriton", "kernels", "tests", "examples", "benchmarks", "docs", "results",
            "latest", "archive", "ops", "backends", r"\d{4}-\d{2}-\d{2}_[0-9a-f]{7}")
PATH = re.compile(r"(?<![\w./:-])((?:%s)/[\w./-]*\w)" % "|".join(PREFIXES))
#: what may follow a cited path that makes it a pattern, not a path
PATTERN_NEXT = ("*", "<", "{", "[")
BRACES = re.compile(r"\.\{([\w,]+)\}")


def _files(suffix: str, dirs=(".",)):
    """Files ending in ``suffix`` under ``dirs``, never entering :data:`SKIP_DIRS` nor a hidden
    folder (a local virtual environment, caches)."""
    for d in dirs:
        for folder, subdirs, names in os.walk(ROOT / d):
            subdirs[:] = sorted(n for n in subdirs
                                if n not in SKIP_DIRS and not n.startswith(".")
                                and not n.endswith(".egg-info"))
            yield from (pathlib.Path(folder) / n for n in sorted(names) if n.endswith(suffix))


def _python_text(path: pathlib.Path) -> str:
    """The comments and docstrings of a Python file."""
    src = path.read_text()
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(src).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(parts)


def _cited(text: str):
    """(path, alternatives) for each path cited in ``text``."""
    for m in PATH.finditer(text):
        rest = text[m.end():]
        if rest[:1] in PATTERN_NEXT:
            continue
        braces = BRACES.match(rest)
        path = m.group(1)
        yield path, [f"{path}.{ext}" for ext in braces.group(1).split(",")] if braces else [path]


def _exists(path: str, citing: pathlib.Path) -> bool:
    bases = (ROOT, citing.parent, ROOT / "symmtriton", ROOT / "benchmarks",
             ROOT / "benchmarks" / "results")
    return any((base / path).exists() for base in bases)


def _missing(sources) -> list:
    bad = []
    for path, text in sources:
        for cited, alternatives in _cited(text):
            for alt in alternatives:
                if not _exists(alt, path):
                    bad.append(f"{path.relative_to(ROOT)}: {alt}")
    return bad


def test_paths_cited_in_markdown_exist():
    sources = [(p, p.read_text()) for p in _files(".md")]
    assert len(sources) >= 4
    assert _missing(sources) == []


def test_paths_cited_in_comments_and_docstrings_exist():
    sources = [(p, _python_text(p)) for p in _files(".py", CODE_DIRS)]
    sources += [(p, "\n".join(ln for ln in p.read_text().splitlines()
                              if ln.lstrip().startswith("#")))
                for p in _files(".sh", CODE_DIRS)]
    assert len(sources) >= 50
    assert _missing(sources) == []


def test_the_path_pattern():
    text = ("see kernels/lines.py, `tests/test_<op>.py`, symmtriton/bench*.py, "
            "https://x.org/docs/a, latest/h200_w1.{csv,json} and "
            "benchmarks/results/archive/2026-11-26_3ac72a2/x.csv.")
    assert list(_cited(text)) == [
        ("kernels/lines.py", ["kernels/lines.py"]),
        ("latest/h200_w1", ["latest/h200_w1.csv", "latest/h200_w1.json"]),
        ("benchmarks/results/archive/2026-11-26_3ac72a2/x.csv",
         ["benchmarks/results/archive/2026-11-26_3ac72a2/x.csv"])]
