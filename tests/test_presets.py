"""symmtriton.presets: every threshold and launch preset has a source line, and every result
file a source line names exists (CPU only, no process group)."""

import pathlib
import re

from symmtriton import config, context, presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: a file under benchmarks/results/ as a source line names it
RESULT_FILE = re.compile(r"(?<![\w/.-])((?:archive|latest)/[\w./-]*\w\.\w+)")


def _entries() -> set:
    """The module's public UPPER_CASE constants other than :data:`presets.SOURCES` and
    :data:`presets.RESULTS_DIR`: its entries."""
    return {n for n in vars(presets) if n.isupper() and not n.startswith("_")} - {
        "SOURCES", "RESULTS_DIR"}


def test_every_entry_has_one_source_line():
    assert _entries() == set(presets.SOURCES)
    for name, source in presets.SOURCES.items():
        assert isinstance(source, str) and source.strip() and "\n" not in source, name
        named = RESULT_FILE.findall(source)
        assert source.startswith("not measured") or named, (name, source)


def test_every_result_file_a_source_names_exists():
    results = ROOT / presets.RESULTS_DIR
    missing = [(name, path) for name, source in presets.SOURCES.items()
               for path in RESULT_FILE.findall(source) if not (results / path).is_file()]
    assert missing == []
    assert RESULT_FILE.findall("a (archive/2026-11-26_x/f.csv, W=2); latest/y.json") == [
        "archive/2026-11-26_x/f.csv", "latest/y.json"]


def test_the_rules_read_the_presets():
    """config and context decide from these values: no copy of them elsewhere."""
    for name in _entries():
        assert not hasattr(config, name), name
        assert not hasattr(context, name), name
