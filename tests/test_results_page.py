"""The results page (benchmarks/results/README.md) is what benchmarks/results_page.py makes of
benchmarks/results/latest/, and README.md's headline table is the page's, line for line."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _page_module():
    spec = importlib.util.spec_from_file_location("results_page",
                                                  ROOT / "benchmarks" / "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_page_is_current(tmp_path):
    out = tmp_path / "README.md"
    _page_module().main(["--out", str(out)])
    committed = (ROOT / "benchmarks" / "results" / "README.md").read_text()
    assert out.read_text() == committed, (
        "benchmarks/results/README.md is stale: run python benchmarks/results_page.py")


def test_every_latest_set_names_its_commit_and_date():
    sets = _page_module().load_sets()
    assert sets
    for name, data in sets.items():
        meta = data["meta"]
        assert len(meta.get("commit", "")) >= 7 and meta.get("date", "")[:4].isdigit(), name


def test_readme_headline_is_the_pages():
    """README.md copies the page's headline table between its two headline markers."""
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- headline: benchmarks/results/README.md -->", "<!-- /headline -->"
    assert start in readme and end in readme
    block = [ln for ln in readme.split(start, 1)[1].split(end, 1)[0].splitlines() if ln.strip()]
    page = (ROOT / "benchmarks" / "results" / "README.md").read_text().splitlines()
    assert len(block) >= 3 and [ln for ln in block if ln not in page] == []
