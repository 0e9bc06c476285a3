"""The README's main job, `python -m symmtriton`, runs every public op family on the CPU and
reports each one checked against the reference; a failed check makes it exit non-zero."""

import pytest

from symmtriton.tools import demo

LABELS = [case[0] for case in demo.CASES]


def _rows(out: str) -> dict:
    """label -> its printed line (the longest label that starts the line)."""
    rows = {}
    for line in out.splitlines():
        found = [label for label in LABELS if line.startswith(label + " ")]
        if found:
            rows[max(found, key=len)] = line
    return rows


def test_demo_covers_every_public_op_family():
    import symmtriton as st

    families = {label.split(" ")[0] for label in LABELS}
    public = {name for name in st.__all__
              if not isinstance(getattr(st, name), type)  # MoeHandle: a result, not an op
              and getattr(getattr(st, name), "__module__", "").startswith("symmtriton.ops.")}
    assert families == public
    assert {"all_reduce (in place)", "all_reduce (out=)"} <= set(LABELS)


def test_demo_runs_and_is_correct(capsys):
    assert demo.main(["--world-size", "2", "--numel", "100", "--hidden", "24", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "backend host" in out
    rows = _rows(out)
    assert set(rows) == set(LABELS), out
    for label, line in rows.items():
        assert " OK " in line and "bfloat16" in line and "FAIL" not in line, line
    assert "counts [0, 4]" in rows["all_gather_v"]
    assert "zero-copy" in rows["all_reduce (in place)"] and "staged" in rows["all_reduce (out=)"]
    assert f"all {len(LABELS)} checks passed" in out


def test_demo_exits_non_zero_on_a_failed_check(monkeypatch, capsys):
    class FakePool:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def run(self, fn, *args):
            lines = [(label, "[8]", "staged, lines", label != "all_reduce (out=)", 1e-5)
                     for label in LABELS]
            return [("host", "cpu", lines)] * 2

    monkeypatch.setattr(demo, "WorkerPool", FakePool)
    assert demo.main(["--iters", "1"]) == 1
    rows = _rows(capsys.readouterr().out)
    assert " FAIL " in rows["all_reduce (out=)"] and " OK " in rows["all_gather_v"]


@pytest.mark.parametrize("flags", [["--world-size", "0"], ["--numel", "0"], ["--rows", "0"],
                                   ["--dtype", "int8"]])
def test_demo_rejects_bad_arguments(flags):
    with pytest.raises(SystemExit) as info:
        demo.main(flags)
    assert info.value.code == 2


def test_human_time():
    assert demo.human_time(12.34e-6) == "12.3 us"
    assert demo.human_time(4.56e-3) == "4.6 ms"
    assert demo.human_time(2.5) == "2.50 s"
    assert demo.human_time(None) == "-"
