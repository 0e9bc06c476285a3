"""symmtriton-bench: a tiny CPU sweep through the worker pool and through torchrun, its files,
and the option parsing."""

import csv
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from symmtriton import bench, bench_baselines, bench_options, bench_report, timing, tuning, workloads
from symmtriton.config import CONFIG_KEYS
from symmtriton.kernels.all_reduce import (_all_reduce_kernel, _all_reduce_one_shot_push_kernel,
                                           _all_reduce_push_kernel)
from symmtriton.kernels.reduce_scatter import (_reduce_scatter_kernel, _reduce_scatter_ll_kernel,
                                               _reduce_scatter_push_kernel)
from symmtriton.ops import driver
from symmtriton.testing import CPU_ENV

TINY = ["--min-bytes", "1K", "--max-bytes", "1K", "--iters", "1", "--warmup", "0"]


def _bench_main(rank, world, out_dir, cache, argv):
    os.environ[tuning.CACHE_ENV] = cache
    return bench.main(list(argv) + ["--out-dir", out_dir])


def _read(out_dir, stem):
    with open(os.path.join(out_dir, stem + ".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out_dir, stem + ".json")) as f:
        data = json.load(f)
    return rows, data


def test_cli_sweep_with_tuning_in_pool(cpu_pool, tmp_path):
    out, cache = str(tmp_path / "out"), str(tmp_path / "tuning.json")
    argv = TINY + ["--ops", "all_gather,reduce_scatter,fused", "--tune", "--name", "tiny"]
    assert cpu_pool(2).run(_bench_main, out, cache, argv, timeout=300) == [0, 0]
    rows, data = _read(out, "tiny")
    assert list(rows[0]) == list(bench_report.FIELDS)
    assert set(CONFIG_KEYS) <= set(bench_report.FIELDS)
    # 3 ops x 1 size x 1 mode (graph is skipped on the CPU) x 2 placements
    assert [(r["op"], r["placement"], r["mode"]) for r in rows] == [
        (op, p, "eager") for op in ("all_gather", "reduce_scatter", "fused") for p in ("zero_copy", "staged")]
    for r in rows:
        assert r["check"] == "ok" and r["path"] == "symmetric" and r["world_size"] == "2"
        assert float(r["time_us"]) > 0 and float(r["baseline_us"]) > 0 and float(r["copy_us"]) > 0
        assert r["baseline"] == "gloo" and r["symm_mem_us"] == "" and r["efficiency"] == ""
        assert r["ceiling"] == "local" and float(r["ceiling_gbs"]) == float(r["copy_gbs"])
        assert abs(float(r["busbw_gbs"]) - float(r["algbw_gbs"]) * bench_report.bus_factor(r["op"], 2)) < 2e-3
    assert {r["size_bytes"] for r in rows} == {"1024"}
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["world_size"] == 2 and data["complete"] is True
    assert meta["devices"] == ["cpu", "cpu"] and meta["layout"] == "cpu" and meta["p2p_gbs"] is None
    assert meta["torch"] == torch.__version__ and meta["triton"] and meta["date"]
    # the launch setting and the SYMMTRITON_* variables set (an A/B names its side)
    assert meta["pdl"] is False and meta["environment"][tuning.CACHE_ENV] == cache
    assert data["columns"] == list(bench_report.FIELDS) and len(data["rows"]) == len(rows)
    assert any("graph mode needs CUDA" in n for n in data["notes"])
    assert not {"host", "hostname", "node"} & set(meta)  # hostname-free
    assert socket.gethostname() not in [v for v in meta.values() if isinstance(v, str)]
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0  # matplotlib is installed here
    # --tune wrote one agreed entry per op, keyed as the ops look them up
    entries = json.loads((tmp_path / "tuning.json").read_text())["entries"]
    assert sorted(e["op"] for e in entries) == ["all_gather", "fused", "reduce_scatter"]
    for r in rows:  # the bench reports the config the op used: the tuned one
        entry = next(e for e in entries if e["op"] == r["op"])
        assert {k: int(r[k]) for k in CONFIG_KEYS} == entry["config"]


NEW_OPS = ("all_reduce", "all_reduce_add_rmsnorm", "all_gather_v", "reduce_scatter_v")


def test_new_ops_rows_checked_in_pool(cpu_pool, tmp_path):
    """The opt-in ops on the host backend at W=2: every row present, checked against the
    reference (exact on tagged data; a FAIL would make the exit status 1), with its baseline."""
    out, cache = str(tmp_path / "out"), str(tmp_path / "tuning.json")
    argv = ["--min-bytes", "4K", "--max-bytes", "4K", "--iters", "1", "--warmup", "0", "--hidden", "256",
            "--ops", ",".join(NEW_OPS), "--no-plot", "--name", "new"]
    assert cpu_pool(2).run(_bench_main, out, cache, argv, timeout=300) == [0, 0]
    rows, data = _read(out, "new")
    # the variant: count distribution / the kernel the call launched (4 KiB: lines for the
    # all-reduces; the v ops have barriers only)
    variants = {"all_reduce": ["lines"], "all_reduce_add_rmsnorm": ["lines"],
                "all_gather_v": ["uniform/barrier", "skewed/barrier"],
                "reduce_scatter_v": ["uniform/barrier", "skewed/barrier"]}
    assert [(r["op"], r["variant"], r["placement"]) for r in rows] == [
        (op, v, p) for op in NEW_OPS for v in variants[op] for p in ("zero_copy", "staged")]
    for r in rows:
        assert r["check"] == "ok" and r["path"] == "symmetric" and r["block_size"] == ""
        assert float(r["time_us"]) > 0 and float(r["baseline_us"]) > 0 and r["baseline"] == "gloo"
        assert abs(float(r["busbw_gbs"]) - float(r["algbw_gbs"]) * bench_report.bus_factor(r["op"], 2)) < 2e-3
    sizes = {r["op"]: int(r["size_bytes"]) for r in rows}  # [S, 256] bf16 rows of 4 KiB
    assert sizes == {op: 4096 for op in NEW_OPS}
    assert bench_report.bus_factor("all_reduce", 2) == 1.0
    assert bench_report.bus_factor("all_gather_v", 2) == 0.5


def test_algorithm_option_forces_the_all_reduce_algorithm(cpu_pool, tmp_path):
    """``--algorithm two_shot``: the all-reduce rows take the two-shot kernel where the size
    alone would pick lines; the other ops are untouched."""
    out, cache = str(tmp_path / "out"), str(tmp_path / "tuning.json")
    argv = TINY + ["--ops", "all_reduce,all_gather", "--algorithm", "two_shot", "--no-plot",
                   "--no-baselines", "--name", "algo"]
    assert cpu_pool(2).run(_bench_main, out, cache, argv, timeout=300) == [0, 0]
    rows, data = _read(out, "algo")
    assert [(r["op"], r["variant"], r["check"]) for r in rows] == [
        ("all_reduce", "two_shot", "ok")] * 2 + [("all_gather", "lines", "ok")] * 2
    assert "--algorithm" in data["meta"]["argv"]


def _algorithm_for_other_op(rank, world):
    try:
        workloads.make_workload("all_gather", 8, torch.bfloat16, algorithm="one_shot")
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_workload_rejects_an_algorithm_for_other_ops(cpu_pool):
    msg = cpu_pool(2).run(_algorithm_for_other_op)[0]
    assert "algorithm='one_shot' for 'all_gather'" in msg


def test_cli_through_torchrun(tmp_path):
    env = {**os.environ, **CPU_ENV, tuning.CACHE_ENV: str(tmp_path / "tuning.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "symmtriton.bench", *TINY, "--ops", "all_gather", "--placement", "staged",
           "--no-plot", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows, data = _read(str(tmp_path), "symmtriton_cpu_w2")
    assert [(r["op"], r["placement"], r["check"]) for r in rows] == [("all_gather", "staged", "ok")]
    assert data["meta"]["dist_backend"] == "gloo"
    assert "busbw" in proc.stdout and "[1/1 " in proc.stderr  # table on stdout, progress on stderr
    assert "1 rows in" in proc.stderr
    assert not (tmp_path / "symmtriton_cpu_w2.png").exists()


def test_help_documents_the_options():
    text = bench_options.build_parser().format_help()
    for opt in ("--ops", "--dtypes", "--modes", "--placement", "--min-bytes", "--max-bytes", "--iters",
                "--warmup", "--tune", "--backend", "--out-dir", "busbw", "torchrun", "--quick",
                "--step", "--min-iters", "--max-spread", "p2p", "4G", "--algorithm"):
        assert opt in text


@pytest.mark.parametrize("argv,match", [
    (["--ops", "all_reduce_v"], "all_reduce_v"),
    (["--v-counts", "zipf"], "zipf"),
    (["--dtypes", "int8"], "int8"),
    (["--modes", "lazy"], "lazy"),
    (["--placement", "nowhere"], "nowhere"),
    (["--min-bytes", "4K", "--max-bytes", "1K"], "4096"),
    (["--max-bytes", "12Q"], "12Q"),
    (["--iters", "0"], "--iters"),
    (["--step", "1"], "--step"),
    (["--max-spread", "-1"], "--max-spread"),
    (["--algorithm", "three_shot"], "three_shot"),
])
def test_bad_options_exit_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_options.parse_options(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_option_defaults_on_the_cpu():
    opts = bench_options.parse_options([])
    assert opts.ops == ("all_gather", "reduce_scatter", "fused")  # the newer ops are opt-in
    assert opts.v_counts == ("uniform", "skewed")
    assert opts.dtypes == (torch.bfloat16,) and opts.modes == ("eager", "graph")
    assert opts.placements == ("zero_copy", "staged")
    assert opts.sizes == (1024, 4096, 16384, 65536) and opts.iters == 3 and opts.min_iters == 3
    quick = bench_options.parse_options(["--quick", "--max-bytes", "256M"])
    assert quick.sizes == (4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20) and quick.warmup == 3
    assert bench_options.parse_options(["--max-bytes", "4G", "--step", "2"]).sizes[-1] == 4 << 30
    assert opts.out_dir == os.path.join("benchmarks", "results")


def test_sizes_and_shapes():
    assert bench_options.parse_bytes("64K") == 65536 and bench_options.parse_bytes("1MB") == 1 << 20
    assert bench_options.parse_bytes("256MiB") == 256 << 20 and bench_options.parse_bytes("100") == 100
    assert bench_options.sweep_sizes(1024, 5000) == (1024, 2048, 4096)
    ag = bench_baselines.shape_for("all_gather", 1024, torch.bfloat16, 3, 4096)
    assert (ag.numel, ag.total_bytes, ag.count) == (170, 1020, 510)
    fu = bench_baselines.shape_for("fused", 1024, torch.bfloat16, 4, 4096)  # too small for 4 rows of 4096
    assert fu.hidden == 128 and fu.numel == 128 and fu.total_bytes == 1024
    big = bench_baselines.shape_for("fused", 1 << 20, torch.bfloat16, 4, 4096)
    assert big.hidden == 4096 and big.count == 128 * 4096 and (big.count // big.hidden) % 4 == 0
    assert bench_report.bus_factor("all_gather", 4) == 0.75 and bench_report.bus_factor("fused", 4) == 1.5
    ar = bench_baselines.shape_for("all_reduce", 1000, torch.bfloat16, 4, 4096)  # the whole tensor
    assert (ar.numel, ar.total_bytes, ar.hidden) == (500, 1000, None)
    arn = bench_baselines.shape_for("all_reduce_add_rmsnorm", 1 << 20, torch.bfloat16, 4, 4096)
    assert (arn.hidden, arn.numel, arn.total_bytes) == (4096, 128 * 4096, 1 << 20)
    agv = bench_baselines.shape_for("all_gather_v", 1 << 20, torch.bfloat16, 4, 4096)
    assert (agv.hidden, agv.numel, agv.count) == (4096, 32 * 4096, 128 * 4096)
    assert workloads.v_counts("uniform", 12, 4) == (3, 3, 3, 3)
    assert workloads.v_counts("skewed", 12, 4) == (0, 2, 4, 6)  # rank 0 none, then 2 : 3 : 4, the rest last
    assert workloads.v_counts("skewed", 8, 2) == (0, 8) and workloads.v_counts("skewed", 5, 1) == (5,)


def test_table_format():
    row = {k: None for k in bench_report.FIELDS}
    row.update(size_bytes=1024, count=512, dtype="bfloat16", op="all_gather", placement="staged",
               mode="eager", time_us=12.5, algbw_gbs=0.08, busbw_gbs=0.04, check="ok")
    meta = {"world_size": 2, "device": "cpu", "backend": "host", "dist_backend": "gloo",
            "torch": "x", "triton": "y", "date": "d"}
    text = bench_report.format_table([row], meta)
    assert "busbw" in text and "12.50" in text and "all_gather" in text


def test_rows_reach_the_csv_as_they_finish(tmp_path):
    opts = bench_options.parse_options(["--out-dir", str(tmp_path), "--name", "live", "--no-plot"])
    meta = {"device": "cpu", "world_size": 2, "layout": "cpu"}
    files = bench_report.ResultFiles(opts, meta)
    row = {k: None for k in bench_report.FIELDS}
    row.update(size_bytes=1024, op="all_gather", check="ok", time_us=3.5)
    files.add(row)  # an interrupted run stops here: the row and the metadata are on disk
    with open(tmp_path / "live.csv", newline="") as f:
        assert [(r["size_bytes"], r["time_us"]) for r in csv.DictReader(f)] == [("1024", "3.5")]
    data = json.loads((tmp_path / "live.json").read_text())
    assert data["complete"] is False and data["meta"] == meta and data["rows"] == []
    paths = files.finish([row], ["a note"])
    data = json.loads((tmp_path / "live.json").read_text())
    assert data["complete"] is True and len(data["rows"]) == 1 and set(paths) == {"csv", "json"}


def test_relative_spread():
    assert timing.relative_spread([1.0]) == 0.0
    assert timing.relative_spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert abs(timing.relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) - 2.0 / 3.0) < 1e-12


def test_variant_names_the_kernel_a_row_launched(monkeypatch):
    """The ``variant`` column: ``push`` for the flagged-chunk kernels (kernels/push.py), beside
    ``lines``, ``barrier`` and the all-reduce's ``one_shot`` / ``two_shot``."""
    cases = ((_reduce_scatter_push_kernel, {}, "push"), (_all_reduce_push_kernel, {}, "push"),
             (_all_reduce_one_shot_push_kernel, {}, "push_one_shot"),
             (_reduce_scatter_ll_kernel, {}, "lines"), (_reduce_scatter_kernel, {}, "barrier"),
             (_all_reduce_kernel, {"TWO_SHOT": True}, "two_shot"))
    for fn, constexprs, want in cases:
        plan = SimpleNamespace(kernel=SimpleNamespace(fn=fn, constexprs=constexprs))
        monkeypatch.setattr(driver, "last_plan", lambda plan=plan: plan)
        assert bench._variant(None) == want
        assert bench._variant("skewed") == f"skewed/{want}"
