"""symmtriton-bench: a tiny CPU sweep through the worker pool and through torchrun, its files,
and the option parsing."""

import csv
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from symmtriton import tuning
from symmtriton.tools.bench import baselines, cli, moe, options, report, rownorm, timing, workloads
from symmtriton.tools.bench import meta as bench_meta
from symmtriton.config import CONFIG_KEYS
from symmtriton.ops import driver
from symmtriton.tools.testing import CPU_ENV

TINY = ["--min-bytes", "1K", "--max-bytes", "1K", "--iters", "1", "--warmup", "0"]


def _bench_main(rank, world, out_dir, cache, argv):
    os.environ[tuning.CACHE_ENV] = cache
    return cli.main(list(argv) + ["--out-dir", out_dir])


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
    assert list(rows[0]) == list(report.FIELDS)
    assert set(CONFIG_KEYS) <= set(report.FIELDS)
    # 3 ops x 1 size x 1 mode (graph is skipped on the CPU) x 2 placements
    assert [(r["op"], r["placement"], r["mode"]) for r in rows] == [
        (op, p, "eager") for op in ("all_gather", "reduce_scatter", "fused")
        for p in ("zero_copy", "staged")]
    for r in rows:
        assert r["check"] == "ok" and r["path"] == "symmetric" and r["world_size"] == "2"
        assert float(r["time_us"]) > 0 and float(r["baseline_us"]) > 0 and float(r["copy_us"]) > 0
        assert r["baseline"] == "gloo" and r["symm_mem_us"] == "" and r["efficiency"] == ""
        assert r["ceiling"] == "local" and float(r["ceiling_gbs"]) == float(r["copy_gbs"])
        bus = float(r["algbw_gbs"]) * report.bus_factor(r["op"], 2)
        assert abs(float(r["busbw_gbs"]) - bus) < 2e-3
    assert {r["size_bytes"] for r in rows} == {"1024"}
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["world_size"] == 2 and data["complete"] is True
    assert meta["devices"] == ["cpu", "cpu"] and meta["layout"] == "cpu" and meta["p2p_gbs"] is None
    assert meta["torch"] == torch.__version__ and meta["triton"] and meta["date"]
    # provenance: commit, date (UTC), versions, world size, where the ranks ran, how times reduce
    assert meta["commit"] == bench_meta.project_commit() != "unknown"  # this is a checkout
    assert meta["date"].endswith("+00:00") and {"cuda", "nccl", "symmtriton"} <= set(meta)
    assert meta["rank_placement"] == "CPU host" and meta["multicast"] is False
    assert meta["time_reduction"] == "max_over_ranks"
    assert "max over ranks" in meta["timing"]["reduction"]
    assert "synchronize" in meta["timing"]["eager"]
    # no peer-copy ceiling on the CPU: said so, and no row is marked
    assert meta["ceiling"]["peer_copy_gbs"] is None and "CPU host" in meta["ceiling"]["source"]
    assert {(r["valid"], r["over_ceiling"]) for r in rows} == {("", "")}
    assert {(r["time_reduction"], r["commit"]) for r in rows} == {
        ("max_over_ranks", meta["commit"])}
    # the launch setting and the SYMMTRITON_* variables set (an A/B names its side)
    assert meta["pdl"] is False and meta["environment"][tuning.CACHE_ENV] == cache
    assert data["columns"] == list(report.FIELDS) and len(data["rows"]) == len(rows)
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
    argv = ["--min-bytes", "4K", "--max-bytes", "4K", "--iters", "1", "--warmup", "0",
            "--hidden", "256", "--ops", ",".join(NEW_OPS), "--no-plot", "--name", "new"]
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
        bus = float(r["algbw_gbs"]) * report.bus_factor(r["op"], 2)
        assert abs(float(r["busbw_gbs"]) - bus) < 2e-3
    sizes = {r["op"]: int(r["size_bytes"]) for r in rows}  # [S, 256] bf16 rows of 4 KiB
    assert sizes == {op: 4096 for op in NEW_OPS}
    assert report.bus_factor("all_reduce", 2) == 1.0
    assert report.bus_factor("all_gather_v", 2) == 0.5


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
           "-m", "symmtriton.tools.bench", *TINY, "--ops", "all_gather", "--placement", "staged",
           "--no-plot", "--out-dir", str(tmp_path), "--peer-copy-gbs", "1e-9"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows, data = _read(str(tmp_path), "symmtriton_cpu_w2")
    assert [(r["op"], r["placement"], r["check"]) for r in rows] == [("all_gather", "staged", "ok")]
    assert data["meta"]["dist_backend"] == "gloo"
    assert "busbw" in proc.stdout and "[1/1 " in proc.stderr  # table on stdout, progress on stderr
    # a ceiling given by option (none is measured on the CPU): every time is over it
    ceiling = data["meta"]["ceiling"]
    assert ceiling["peer_copy_gbs"] == 1e-9 and "--peer-copy-gbs" in ceiling["source"]
    assert [(r["valid"], r["over_ceiling"], r["speedup"]) for r in rows] == [
        ("false", "symmtriton;baseline", "")]
    warning = ("# WARNING: invalid row all_gather lines bfloat16 1024 B staged eager: "
               "symmtriton busbw")
    assert warning in proc.stderr
    assert "1 rows invalid" in proc.stderr and data["rows"][0]["valid"] is False
    assert "1 rows in" in proc.stderr
    assert not (tmp_path / "symmtriton_cpu_w2.png").exists()


def test_help_documents_the_options():
    text = options.build_parser().format_help()
    for opt in ("--ops", "--dtypes", "--modes", "--placement", "--min-bytes", "--max-bytes",
                "--iters", "--warmup", "--tune", "--backend", "--out-dir", "busbw", "torchrun",
                "--quick", "--step", "--min-iters", "--max-spread", "p2p", "4G", "--algorithm",
                "--fp8", "ours_quant_us", "all_to_all_vdev"):
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
    (["--fp8", "e5m2"], "'e5m2' is not one of none, static, dynamic"),
    (["--fp8", ","], "--fp8: empty list"),
])
def test_bad_options_exit_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        options.parse_options(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_option_defaults_on_the_cpu():
    opts = options.parse_options([])
    assert opts.ops == ("all_gather", "reduce_scatter", "fused")  # the newer ops are opt-in
    assert opts.v_counts == ("uniform", "skewed")
    assert opts.dtypes == (torch.bfloat16,) and opts.modes == ("eager", "graph")
    assert opts.placements == ("zero_copy", "staged")
    assert opts.sizes == (1024, 4096, 16384, 65536) and opts.iters == 3 and opts.min_iters == 3
    quick = options.parse_options(["--quick", "--max-bytes", "256M"])
    assert quick.sizes == (4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20) and quick.warmup == 3
    assert options.parse_options(["--max-bytes", "4G", "--step", "2"]).sizes[-1] == 4 << 30
    assert opts.out_dir == os.path.join("benchmarks", "results")


def test_sizes_and_shapes():
    assert options.parse_bytes("64K") == 65536 and options.parse_bytes("1MB") == 1 << 20
    assert options.parse_bytes("256MiB") == 256 << 20 and options.parse_bytes("100") == 100
    assert options.sweep_sizes(1024, 5000) == (1024, 2048, 4096)
    ag = baselines.shape_for("all_gather", 1024, torch.bfloat16, 3, 4096)
    assert (ag.numel, ag.total_bytes, ag.count) == (170, 1020, 510)
    fu = baselines.shape_for("fused", 1024, torch.bfloat16, 4, 4096)  # too small for 4 rows of 4096
    assert fu.hidden == 128 and fu.numel == 128 and fu.total_bytes == 1024
    big = baselines.shape_for("fused", 1 << 20, torch.bfloat16, 4, 4096)
    assert big.hidden == 4096 and big.count == 128 * 4096 and (big.count // big.hidden) % 4 == 0
    assert report.bus_factor("all_gather", 4) == 0.75 and report.bus_factor("fused", 4) == 1.5
    ar = baselines.shape_for("all_reduce", 1000, torch.bfloat16, 4, 4096)  # the whole tensor
    assert (ar.numel, ar.total_bytes, ar.hidden) == (500, 1000, None)
    arn = baselines.shape_for("all_reduce_add_rmsnorm", 1 << 20, torch.bfloat16, 4, 4096)
    assert (arn.hidden, arn.numel, arn.total_bytes) == (4096, 128 * 4096, 1 << 20)
    agv = baselines.shape_for("all_gather_v", 1 << 20, torch.bfloat16, 4, 4096)
    assert (agv.hidden, agv.numel, agv.count) == (4096, 32 * 4096, 128 * 4096)
    assert workloads.v_counts("uniform", 12, 4) == (3, 3, 3, 3)
    # rank 0 none, then 2 : 3 : 4, the rest last
    assert workloads.v_counts("skewed", 12, 4) == (0, 2, 4, 6)
    assert workloads.v_counts("skewed", 8, 2) == (0, 8)
    assert workloads.v_counts("skewed", 5, 1) == (5,)


def test_table_format():
    row = {k: None for k in report.FIELDS}
    row.update(size_bytes=1024, count=512, dtype="bfloat16", op="all_gather", placement="staged",
               mode="eager", time_us=12.5, algbw_gbs=0.08, busbw_gbs=0.04, check="ok")
    meta = {"world_size": 2, "device": "cpu", "backend": "host", "dist_backend": "gloo",
            "torch": "x", "triton": "y", "date": "d"}
    text = report.format_table([row], meta)
    assert "busbw" in text and "12.50" in text and "all_gather" in text


def test_rows_reach_the_csv_as_they_finish(tmp_path):
    opts = options.parse_options(["--out-dir", str(tmp_path), "--name", "live", "--no-plot"])
    meta = {"device": "cpu", "world_size": 2, "layout": "cpu"}
    files = report.ResultFiles(opts, meta)
    row = {k: None for k in report.FIELDS}
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


def test_variant_names_the_path_a_row_took(monkeypatch):
    """The ``variant`` column, from the last plan's ``path`` and ``algorithm``: ``push`` for the
    flagged-chunk kernels (kernels/push.py), ``push_one_shot`` for the all-reduce's one round,
    beside ``lines``, ``barrier``, ``multimem`` and the all-reduce's ``one_shot`` /
    ``two_shot``; nothing for an empty call or the fallback."""
    cases = (("push", None, "push"), ("push", "two_shot", "push"),
             ("push", "one_shot", "push_one_shot"), ("lines", None, "lines"),
             ("lines", "lines", "lines"), ("barrier", None, "barrier"),
             ("multimem", None, "multimem"), ("barrier", "two_shot", "two_shot"),
             ("multimem", "one_shot", "one_shot"), ("fallback", "two_shot", None),
             ("empty", None, None))
    for path, algorithm, want in cases:
        plan = SimpleNamespace(path=path, algorithm=algorithm)
        monkeypatch.setattr(driver, "last_plan", lambda plan=plan: plan)
        assert cli._variant(None) == want
        assert cli._variant("skewed") == "/".join(x for x in ("skewed", want) if x)


def _row(**kw):
    row = {k: None for k in report.FIELDS}
    row.update(size_bytes=256 << 20, op="all_gather", dtype="bfloat16", placement="zero_copy",
               mode="eager", world_size=2, baseline="nccl",
               symm_mem_op="_low_contention_all_gather")
    row.update(kw)
    return row


def test_rows_over_the_peer_copy_ceiling_are_invalid():
    """busbw over the ceiling by more than 5% marks the row invalid, names what was over, blanks
    the speedups it takes part in and returns a warning naming the row; within 5% it is valid;
    without a ceiling nothing is marked."""
    # 256 MiB at W=2: busbw = 134.2 GB/s per ms; ceiling 389 GB/s (0.345 ms)
    over = _row(time_us=379.1, baseline_us=550.8, symm_mem_us=117.0, speedup=1.453,
                speedup_symm_mem=0.309)
    warnings = report.mark_validity(over, 389.1)
    assert over["valid"] is False and over["over_ceiling"] == "symm_mem"
    assert over["speedup_symm_mem"] is None and over["speedup"] == 1.453
    assert warnings == [
        "invalid row all_gather bfloat16 268435456 B zero_copy eager: symm_mem "
        "(_low_contention_all_gather) busbw 1147.2 GB/s exceeds the peer-copy ceiling 389.1 GB/s "
        "by 195% (more than 5%)"]
    under = _row(time_us=345.0 / 1.04, baseline_us=550.8, speedup=1.6)  # 4% over: within tolerance
    assert report.mark_validity(under, 389.1) == [] and under["valid"] is True
    assert under["over_ceiling"] is None and under["speedup"] == 1.6
    ours = _row(time_us=100.0, baseline_us=550.8, speedup=5.5, symm_mem_us=400.0,
                speedup_symm_mem=4.0)
    assert len(report.mark_validity(ours, 389.1)) == 1
    assert ours["over_ceiling"] == "symmtriton"
    assert ours["speedup"] is None and ours["speedup_symm_mem"] is None
    unknown = _row(time_us=1.0)
    assert report.mark_validity(unknown, None) == [] and unknown["valid"] is None
    # multicast: a switch that reduces may beat a link; gathers stay bounded
    assert report.ceiling_applies("all_reduce", False)
    assert not report.ceiling_applies("all_reduce", True)
    assert report.ceiling_applies("all_gather", True)
    # the CSV writes the flag as true / false / empty
    assert report._csv_row(over)["valid"] == "false"
    assert report._csv_row(unknown)["valid"] == ""


def test_ceiling_and_placement_metadata():
    topo = baselines.Topology
    cpu = topo(("cpu",) * 2, 0, "cpu")
    shared = topo(("H200",) * 4, 1, "shared: 4 ranks on 1 GPU(s)")
    pergpu = topo(("H200",) * 2, 2, "one rank per GPU")
    placements = [bench_meta.rank_placement(t) for t in (pergpu, shared, cpu)]
    assert placements == list(bench_meta.PLACEMENTS)
    measured = bench_meta.ceiling_meta(pergpu, 2, 389.1423, None, True, False)
    assert measured["peer_copy_gbs"] == 389.142
    assert measured["source"].startswith("measured in this run")
    assert measured["tolerance"] == 0.05
    given = bench_meta.ceiling_meta(shared, 4, None, 390.0, True, False)
    assert given["peer_copy_gbs"] == 390.0 and "--peer-copy-gbs" in given["source"]
    for t, w, why in ((cpu, 2, "CPU host"), (shared, 4, "share a GPU"), (pergpu, 1, "one rank"),
                      (pergpu, 2, "symmetric memory unavailable")):
        meta = bench_meta.ceiling_meta(t, w, None, None, t is not pergpu or w == 1, False)
        assert meta["peer_copy_gbs"] is None and why in meta["source"]


def test_project_commit(monkeypatch, tmp_path):
    commit = bench_meta.project_commit()  # this test runs in a git checkout of the project
    assert len(commit.removesuffix("-dirty")) == 40
    assert bench_meta.project_commit("abc123") == "abc123"
    monkeypatch.setattr(bench_meta, "CHECKOUT", str(tmp_path))  # not a checkout
    assert bench_meta.project_commit() == "unknown"


def test_eager_samples_stop_after_the_whole_device_synchronised(monkeypatch):
    """The clock of an eager sample stops after ``torch.cuda.synchronize(device)`` (every stream
    of the device), not after the calls returned: work the calls left behind is timed."""
    synced = []

    def synchronize(device=None):
        time.sleep(0.02)  # the device finishing what the calls queued
        synced.append(device)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    dev = torch.device("cuda", 0)
    times = timing.eager_samples(lambda: None, 2, dev, batch=4)
    assert synced == [dev, dev] and all(t >= 0.02 / 4 for t in times)


def _rank_max(rank, world):
    fake = {0: [4.0, 1.0, 1.0], 1: [1.0, 4.0, 1.0]}[rank]  # each rank slow in another sample
    sleepy = timing.median_time(lambda: time.sleep(0.03 if rank == 1 else 0.0), iters=3, warmup=0,
                                device=torch.device("cpu"), group=torch.distributed.group.WORLD)
    return (timing.agreed_median(lambda n: fake[:n], 3, 3, torch.distributed.group.WORLD, 0.05),
            timing.all_reduce_max(fake, torch.distributed.group.WORLD), sleepy)


def test_times_are_the_max_over_ranks(cpu_pool):
    """Each sample takes the slowest rank's time (then the median): per-rank medians of 1.0
    reduce to 4.0; a call slow on rank 1 only is slow on every rank."""
    for median, maxima, sleepy in cpu_pool(2).run(_rank_max):
        assert maxima == [4.0, 4.0, 1.0] and median == 4.0 and sleepy >= 0.03


NORM_OPS = ("fused", "reduce_scatter_add_rmsnorm", "all_reduce_add_rmsnorm")


def test_fp8_rows_with_both_baselines_in_pool(cpu_pool, tmp_path):
    """``--fp8 none,static,dynamic`` at W=2 (staged): each RMSNorm row op runs without FP8 and
    in both FP8 forms; an FP8 row has both baselines (torch.distributed's unfused sequence
    then torch's quantisation; ours in bf16 then torch's quantisation), and its check (ok)
    compared all three with the reference quantisation."""
    out, cache = str(tmp_path / "out"), str(tmp_path / "tuning.json")
    argv = ["--min-bytes", "4K", "--max-bytes", "4K", "--iters", "1", "--warmup", "0",
            "--hidden", "256", "--ops", ",".join(NORM_OPS), "--fp8", "none,static,dynamic",
            "--placement", "staged", "--no-plot", "--name", "fp8"]
    assert cpu_pool(2).run(_bench_main, out, cache, argv, timeout=600) == [0, 0]
    rows, data = _read(out, "fp8")
    assert [(r["op"], r["fp8"], r["placement"]) for r in rows] == [
        (op, form, p) for op in NORM_OPS for form in ("", "static", "dynamic")
        for p in ("staged",)]
    for r in rows:
        assert r["check"] == "ok" and r["path"] == "symmetric" and r["baseline"] == "gloo"
        assert float(r["time_us"]) > 0 and float(r["baseline_us"]) > 0
        assert int(r["size_bytes"]) == 4096  # the input's bytes, FP8 or not
        if r["fp8"]:
            assert float(r["ours_quant_us"]) > 0 and float(r["speedup_ours_quant"]) > 0
        else:
            assert r["ours_quant_us"] == "" and r["speedup_ours_quant"] == ""
    assert not [n for n in data["notes"] if "differ" in n]
    assert data["meta"]["options"]["fp8"] == ["none", "static", "dynamic"]
    assert "reduce_scatter_out" in str(baselines.SYMM_MEM_OPS["reduce_scatter_add_rmsnorm"])


def _fp8_check(rank, world, op, form, spoil):
    """An FP8 row's check on this rank; ``spoil``: the baseline quantises with another scale
    (the check must see it)."""
    notes = []
    wl = workloads.make_workload(op, 4 * 64, torch.bfloat16, hidden=64)
    row = rownorm.Fp8Row(wl, form, note=notes.append)
    if spoil:
        rownorm.STATIC_SCALE *= 2
    try:
        return row.check(), notes
    finally:
        rownorm.STATIC_SCALE = 2.0 ** -4


def test_fp8_check_compares_ours_and_both_baselines(cpu_pool):
    pool = cpu_pool(2)
    for op in NORM_OPS:
        for form in rownorm.FORMS:
            assert pool.run(_fp8_check, op, form, False) == [(True, [])] * 2
    ok, notes = pool.run(_fp8_check, "fused", "static", True)[0]
    assert ok is False and notes == ["fused fp8 static: baseline differ from the reference "
                                     "quantisation on rank 0"]


def test_fp8_quantise_and_agreement():
    y = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [896.0, 1.0, -3.0]])
    q, scales = rownorm.quantise(y.bfloat16(), None)
    assert q.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert torch.equal(scales.view(-1), torch.tensor([2.0 / 448, 1.0, 2.0]))  # zero row: 1
    assert (q.float() * scales).sub(y).abs().max() <= 896 / 16
    static = rownorm.quantise(y, rownorm.static_scale("cpu"))
    assert static.float().tolist()[2][:1] == [448.0]  # clamped
    ref = (static, None)
    assert rownorm.agrees(ref, ref, 1 / 64)
    assert not rownorm.agrees((torch.zeros_like(static), None), ref, 1 / 64)
    assert not rownorm.agrees((q, scales), ref, 1 / 64)  # dynamic against static
    assert not rownorm.agrees((q, scales * 2), (q, scales), 1 / 64)


def test_fp8_forms_of_each_op():
    opts = options.parse_options(["--fp8", "static,none", "--ops", "all_gather,fused"])
    assert opts.fp8 == ("static", "none")
    assert cli._fp8_forms(opts, "fused") == ("static", None)
    assert cli._fp8_forms(opts, "all_gather") == (None,)
    assert cli._fp8_forms(opts, "moe_dispatch") == (None,)  # FP8 dispatch: dynamic scales only
    only = options.parse_options(["--fp8", "dynamic"])
    assert cli._fp8_forms(only, "all_reduce_add_rmsnorm") == ("dynamic",)
    assert cli._fp8_forms(only, "reduce_scatter") == (None,)  # runs as without --fp8
    assert cli._fp8_forms(only, "moe_dispatch") == ("dynamic",)
    assert cli._fp8_forms(only, "moe_combine") == (None,)
    assert options.parse_options([]).fp8 == ("none",)
    row = _row(op="fused", fp8="dynamic")
    assert report.row_label(row).endswith("zero_copy eager fp8 dynamic")


def test_vdev_baseline_is_unavailable_here_with_a_reason(monkeypatch):
    """torch's all_to_all_vdev needs CUDA, NVSHMEM and torch's NVSHMEM symmetric-memory
    backend; its kernel must split each peer's rows evenly."""
    cuda = torch.device("cuda", 0)
    assert moe.vdev_unavailable(torch.device("cpu"), 2, 14336) == "needs CUDA"
    if not hasattr(torch.ops.symm_mem, moe.VDEV):
        pytest.skip("this torch has no all_to_all_vdev")
    symm = moe.symm
    monkeypatch.setattr(symm, "is_nvshmem_available", lambda: False)
    assert "is_nvshmem_available() is False" in moe.vdev_unavailable(cuda, 2, 14336)
    monkeypatch.setattr(symm, "is_nvshmem_available", lambda: True)
    monkeypatch.setattr(symm, "get_backend", lambda dev: "CUDA")
    assert "backend is CUDA, not NVSHMEM" in moe.vdev_unavailable(cuda, 2, 14336)
    monkeypatch.setattr(symm, "get_backend", lambda dev: "NVSHMEM")
    assert moe.vdev_unavailable(cuda, 2, 14336) is None  # H = 7168 bf16: 32 blocks per peer
    assert "do not split evenly" in moe.vdev_unavailable(cuda, 3, 14336)
    assert "rows of 200 B" in moe.vdev_unavailable(cuda, 2, 200)


def test_moe_dispatch_row_notes_the_vdev_baseline_in_pool(cpu_pool, tmp_path):
    """A dispatch row on the CPU: timed with its torch.distributed baseline; the all_to_all_vdev
    baseline is reported as not timed, with the reason, in the run's notes."""
    out, cache = str(tmp_path / "out"), str(tmp_path / "tuning.json")
    argv = ["--iters", "1", "--warmup", "0", "--ops", "moe_dispatch", "--tokens", "4",
            "--hidden", "64", "--topk", "2", "--experts", "4", "--no-plot", "--name", "moe"]
    assert cpu_pool(2).run(_bench_main, out, cache, argv, timeout=600) == [0, 0]
    rows, data = _read(out, "moe")
    assert [(r["op"], r["check"], r["symm_mem_us"]) for r in rows] == [("moe_dispatch", "ok", "")]
    assert float(rows[0]["baseline_us"]) > 0
    assert ("torch symm_mem baseline for moe_dispatch: all_to_all_vdev not timed: needs CUDA"
            in data["notes"])


def test_plot_lines_keep_the_count_distributions_apart():
    """A v-op row's variant is ``<counts>/<path>``; the plot labels its lines by the counts."""
    assert [report.counts_of(v) for v in ("uniform/barrier", "skewed/lines", "skewed", "lines",
                                          "", None)] == ["uniform", "skewed", "skewed", "", "",
                                                         ""]

