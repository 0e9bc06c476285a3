"""The README's main job, `python -m symmtriton`, runs and reports correct results."""

import pytest

from symmtriton import demo


def test_demo_runs_and_is_correct(capsys):
    assert demo.main(["--world-size", "2", "--numel", "1000", "--hidden", "264", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "backend host" in out
    rows = [line for line in out.splitlines() if line.startswith(("all_gather", "reduce_scatter"))]
    assert len(rows) == 3 and all(" True " in r for r in rows)


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit) as info:
        demo.main(["--world-size", "0"])
    assert info.value.code == 2
