"""Autotuner: agreement across ranks, the JSON cache and lookup_config."""

import json
import os
import warnings

import pytest
import torch

from symmtriton import tuning
from symmtriton.tools.bench import tune
from symmtriton.config import CONFIG_KEYS, LaunchConfig, default_config, push_config

#: small all-gather: 64 bf16 elements per rank = 32 int32 words, one block for every candidate.
AG_NUMEL = 64
AG_CANDIDATES = (LaunchConfig(128, 1, 264), LaunchConfig(128, 2, 264), LaunchConfig(256, 4, 264))


def fake_time(rank: int, index: int) -> float:
    """Rank-dependent fake timings: each rank finds a different candidate fastest."""
    return 1.0 if index == rank % 3 else 3.0 + index * 0.25


def _tune_with_fake_times(rank, world, cache):
    os.environ[tuning.CACHE_ENV] = cache
    calls = []

    def measure(cfg, run):
        run()  # a real launch, the same on every rank
        calls.append(cfg)
        return fake_time(rank, AG_CANDIDATES.index(cfg))

    res = tune.tune("all_gather", AG_NUMEL, torch.bfloat16, None, AG_CANDIDATES, measure=measure)
    key_numel, key_dtype = tuning.launch_key("all_gather", AG_NUMEL, torch.bfloat16)
    with open(cache) as f:
        on_disk = json.load(f)
    looked_up = tuning.lookup_config("all_gather", key_numel, key_dtype, world)
    return res.winner, res.times_s, calls, looked_up, on_disk, tuning.device_name()


def test_tuning_agrees_across_ranks_despite_rank_dependent_timings(pool, tmp_path):
    world = pool.world_size
    cache = str(tmp_path / "tuning.json")
    results = pool.run(_tune_with_fake_times, cache)
    slowest = [max(fake_time(r, i) for r in range(world)) for i in range(len(AG_CANDIDATES))]
    expected = AG_CANDIDATES[slowest.index(min(slowest))]
    local_picks = {AG_CANDIDATES[min(range(3), key=lambda i: fake_time(r, i))]
                   for r in range(world)}
    assert len(local_picks) > 1  # local choices would disagree: the test means something
    gpu = pool.env["SYMMTRITON_BACKEND"] == "cuda"
    for winner, times, calls, looked_up, on_disk, device_name in results:
        assert device_name == (torch.cuda.get_device_name() if gpu else "cpu")
        assert winner == expected
        assert list(times) == slowest  # MAX over ranks
        assert calls == list(AG_CANDIDATES)  # every rank ran every candidate, in order
        assert looked_up == expected
        [entry] = on_disk["entries"]
        assert entry["config"] == expected.as_dict() and set(entry["config"]) == set(CONFIG_KEYS)
        assert (entry["device"], entry["world_size"], entry["op"], entry["dtype"]) == (
            device_name, world, "all_gather", "int32")
    assert not [p for p in os.listdir(tmp_path) if p != "tuning.json"]  # no temporary files left


def _round_trip(rank, world, cache):
    os.environ[tuning.CACHE_ENV] = cache
    ag = tune.tune("all_gather", AG_NUMEL, torch.bfloat16, None, AG_CANDIDATES[:2], iters=1,
                   warmup=0)
    rs_cands = (LaunchConfig(256, 1, 264), LaunchConfig(512, 2, 264))
    rs = tune.tune("reduce_scatter", 100, torch.float32, None, rs_cands, placement="zero_copy",
                   iters=1, warmup=0)
    fused_cands = tune.candidate_configs("fused", 16, torch.bfloat16, world, hidden=8,
                                         max_candidates=2)
    fu = tune.tune("fused", 16, torch.bfloat16, None, fused_cands, hidden=8, iters=1, warmup=0)
    tuning.reload_cache()  # forget the in-memory table: read the file again
    ag_key = tuning.launch_key("all_gather", AG_NUMEL, torch.bfloat16)
    got = {
        "ag": (ag.winner, tuning.lookup_config("all_gather", *ag_key, world)),
        "rs": (rs.winner, tuning.lookup_config("reduce_scatter", 100, torch.float32, world),
               tuning.lookup_config("reduce_scatter", 128, torch.float32, world)),  # same bucket
        "fused": (fu.winner, tuning.lookup_config("fused", 16, torch.bfloat16, world, hidden=8)),
        # a different bucket, dtype, world size or hidden: the default
        "misses": [tuning.lookup_config("reduce_scatter", 129, torch.float32, world),
                   tuning.lookup_config("reduce_scatter", 100, torch.bfloat16, world),
                   tuning.lookup_config("reduce_scatter", 100, torch.float32, world + 1),
                   tuning.lookup_config("fused", 16, torch.bfloat16, world, hidden=16)],
    }
    os.environ[tuning.CACHE_ENV] = cache + ".other"  # another file: nothing cached there
    got["other_file"] = tuning.lookup_config("reduce_scatter", 100, torch.float32, world)
    return got


def test_cache_round_trip_and_lookup(cpu_pool, tmp_path):
    world = 2
    cache = str(tmp_path / "tuning.json")
    results = cpu_pool(world).run(_round_trip, cache, timeout=300)
    assert results[0] == results[1]
    got = results[0]
    ag_winner, ag_lookup = got["ag"]
    assert ag_lookup == ag_winner and ag_winner in AG_CANDIDATES[:2]
    rs_winner, rs_lookup, rs_same_bucket = got["rs"]
    assert rs_lookup == rs_winner == rs_same_bucket
    fu_winner, fu_lookup = got["fused"]
    assert fu_lookup == fu_winner and fu_winner.block_size >= 8
    assert got["misses"] == [default_config(129, torch.float32, world, op="reduce_scatter"),
                             default_config(100, torch.bfloat16, world, op="reduce_scatter"),
                             default_config(100, torch.float32, world + 1, op="reduce_scatter"),
                             default_config(16, torch.bfloat16, world, hidden=16)]
    assert got["other_file"] == default_config(100, torch.float32, world, op="reduce_scatter")
    entries = json.loads((tmp_path / "tuning.json").read_text())["entries"]
    assert {(e["op"], e["dtype"], e["bucket"], e.get("hidden")) for e in entries} == {
        ("all_gather", "int32", 32, None), ("reduce_scatter", "float32", 128, None),
        ("fused", "bfloat16", 16, 8)}


def _mismatched(rank, world, cache):
    os.environ[tuning.CACHE_ENV] = cache
    try:
        tune.tune("all_gather", AG_NUMEL * (1 + rank), torch.bfloat16, None, AG_CANDIDATES,
                  measure=lambda cfg, run: 1.0)
    except ValueError as exc:
        return str(exc)
    return None


def test_tune_refuses_arguments_that_differ_between_ranks(cpu_pool, tmp_path):
    msgs = cpu_pool(2).run(_mismatched, str(tmp_path / "tuning.json"))
    assert all(m and "differ" in m for m in msgs)
    assert not (tmp_path / "tuning.json").exists()


def _all_rejected(rank, world, cache):
    os.environ[tuning.CACHE_ENV] = cache

    def measure(cfg, run):
        raise ValueError("config rejected before launch")

    with pytest.raises(RuntimeError, match="no candidate"):
        tune.tune("all_gather", AG_NUMEL, torch.bfloat16, None, AG_CANDIDATES, measure=measure)
    return True


def test_tune_with_every_candidate_rejected_raises_on_every_rank(cpu_pool, tmp_path):
    assert cpu_pool(2).run(_all_rejected, str(tmp_path / "tuning.json")) == [True, True]


# -- in-process: the cache file and candidates (no process group needed) --------------------------
@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))
    tuning.reload_cache()
    yield path
    tuning.reload_cache()


def _entry(**over):
    rec = {"device": "cpu", "world_size": 4, "op": "reduce_scatter", "dtype": "bfloat16",
           "bucket": 1024, "config": {"block_size": 512, "num_warps": 2, "max_blocks": 7}}
    rec.update(over)
    return rec


def test_reduce_scatter_defaults_to_small_chunks_beyond_two_ranks(cache_file):
    """presets.RS_WIDE_CHUNK_BYTES: 4 KiB chunks, 4 warps for reduce-scatter at more than 2
    ranks; 16 KiB and 8 warps at 2 ranks and for the other ops (shards below 2 MiB)."""
    n = 1 << 19
    assert default_config(n, torch.bfloat16, 4, op="reduce_scatter") == LaunchConfig(2048, 4, 264)
    wide32 = default_config(n // 2, torch.float32, 3, op="reduce_scatter")
    assert wide32 == LaunchConfig(1024, 4, 264)
    assert default_config(n, torch.bfloat16, 2, op="reduce_scatter") == LaunchConfig(8192, 8, 264)
    assert default_config(n, torch.bfloat16, 4, op="all_gather") == LaunchConfig(8192, 8, 264)
    wide = LaunchConfig(2048, 4, 264)
    assert tuning.lookup_config("reduce_scatter", n, torch.bfloat16, 4) == wide


def test_reduce_scatter_chunks_grow_with_large_shards():
    """presets.RS_LARGE_CHUNKS: 32 / 64 / 128 KiB chunks and 16 warps from 2 / 8 / 128 MiB shards
    at 2 ranks; 4 KiB beyond 2 ranks; the other ops keep 16 KiB."""
    mib, world = 1 << 20, 2
    for shard_bytes, chunk in ((2 * mib, 32768), (8 * mib - 2, 32768), (8 * mib, 65536),
                               (128 * mib, 131072), (1024 * mib, 131072)):
        cfg = default_config(shard_bytes // 2, torch.bfloat16, world, op="reduce_scatter")
        assert cfg == LaunchConfig(chunk // 2, 16, 264), shard_bytes
    assert default_config(64 * mib, torch.bfloat16, world).block_size == 8192
    assert default_config(64 * mib, torch.bfloat16, 4, op="reduce_scatter").block_size == 2048


@pytest.mark.parametrize("world", [2, 3, 4])
def test_push_kernels_take_16k_chunks_below_2m_and_the_large_ones_above(world):
    """config.push_config: 16 KiB chunks and 8 warps at any world size below 2 MiB slices (never
    the 4 KiB pull chunks of wider worlds), RS_LARGE_CHUNKS from there."""
    mib = 1 << 20
    assert push_config(mib // 4, torch.float32, world) == LaunchConfig(4096, 8, 264)
    assert push_config(2 * mib // 2, torch.bfloat16, world) == LaunchConfig(16384, 16, 264)
    assert push_config(256 * mib // 2, torch.bfloat16, world) == LaunchConfig(65536, 16, 264)
    with pytest.raises(ValueError, match="-1"):
        push_config(-1, torch.bfloat16, world)


def test_lookup_uses_cached_entry_by_bucket(cache_file):
    cache_file.write_text(json.dumps({"version": 1, "entries": [_entry()]}))
    want = LaunchConfig(512, 2, 7)
    assert tuning.lookup_config("reduce_scatter", 1000, torch.bfloat16, 4) == want
    assert tuning.lookup_config("reduce_scatter", 513, torch.bfloat16, 4) == want
    assert tuning.lookup_config("reduce_scatter", 1025, torch.bfloat16, 4) == default_config(
        1025, torch.bfloat16, 4, op="reduce_scatter")
    assert tuning.lookup_config("all_gather", 1000, torch.bfloat16, 4) == default_config(
        1000, torch.bfloat16, 4)


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"version": 99, "entries": [_entry()]}),
    json.dumps({"version": 1, "entries": [
        _entry(config={"block_size": 3, "num_warps": 1, "max_blocks": 1})]}),
    json.dumps({"version": 1, "entries": [_entry(config={"block_size": 512})]}),
    json.dumps({"version": 1, "entries": [_entry(op="all_reduce")]}),
    json.dumps({"version": 1, "entries": [_entry(dtype="bfloat17")]}),
    json.dumps({"version": 1, "entries": [_entry(bucket=1000)]}),
    json.dumps({"version": 1, "entries": [_entry(op="fused", hidden=4096)]}),  # block < hidden
    json.dumps({"version": 1, "entries": ["oops"]}),
])
def test_invalid_cache_is_ignored_with_one_warning(cache_file, content):
    cache_file.write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            want = default_config(1000, torch.bfloat16, 4, op="reduce_scatter")
            assert tuning.lookup_config("reduce_scatter", 1000, torch.bfloat16, 4) == want
        tuning.reload_cache()
        tuning.lookup_config("reduce_scatter", 1000, torch.bfloat16, 4)
    assert len([w for w in caught if "tuning cache" in str(w.message)]) == 1


def test_valid_entries_survive_next_to_invalid_ones(cache_file):
    cache_file.write_text(json.dumps({"version": 1, "entries": [_entry(bucket=3), _entry()]}))
    with pytest.warns(RuntimeWarning, match="bucket"):
        got = tuning.lookup_config("reduce_scatter", 1000, torch.bfloat16, 4)
    assert got == LaunchConfig(512, 2, 7)


def test_store_winner_merges_atomically(cache_file):
    cache_file.write_text(json.dumps({"version": 1, "entries": [_entry()]}))
    key = tuning.cache_key("all_gather", 4096, torch.int32, 8)
    tuning.store_winner(key, LaunchConfig(1024, 4, 132), write=True, extra={"time_us": 3.5})
    data = json.loads(cache_file.read_text())
    assert data["version"] == tuning.CACHE_VERSION
    assert {(e["op"], e["bucket"]) for e in data["entries"]} == {("reduce_scatter", 1024),
                                                                 ("all_gather", 4096)}
    assert os.listdir(cache_file.parent) == [cache_file.name]
    tuning.reload_cache()
    assert tuning.lookup_config("all_gather", 3000, torch.int32, 8) == LaunchConfig(1024, 4, 132)


def test_missing_or_empty_cache_means_defaults_silently(cache_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = default_config(77, torch.int32, 2)
        assert tuning.lookup_config("all_gather", 77, torch.int32, 2) == want
        cache_file.write_text("")
        tuning.reload_cache()
        assert tuning.lookup_config("all_gather", 77, torch.int32, 2) == want


def test_default_cache_path(monkeypatch):
    monkeypatch.delenv(tuning.CACHE_ENV, raising=False)
    assert tuning.cache_path() == os.path.expanduser("~/.cache/symmtriton/tuning.json")


def test_lookup_rejects_unknown_op():
    with pytest.raises(ValueError, match="all_reduce"):
        tuning.lookup_config("all_reduce", 10, torch.float32, 2)


@pytest.mark.parametrize("op,numel,dtype,hidden", [
    ("all_gather", 1 << 20, torch.int32, None), ("all_gather", 37, torch.uint8, None),
    ("reduce_scatter", 65536, torch.bfloat16, None), ("reduce_scatter", 5, torch.float32, None),
    ("fused", 4096 * 64, torch.bfloat16, 4096), ("fused", 3 * 1000, torch.float16, 1000),
])
def test_candidate_configs(op, numel, dtype, hidden):
    cands = tune.candidate_configs(op, numel, dtype, 8, hidden=hidden, sm_count=132)
    base = default_config(numel, dtype, 8, **({"hidden": hidden} if hidden else {"op": op}))
    assert cands[0] == base
    assert len(set(cands)) == len(cands)
    assert cands == tune.candidate_configs(op, numel, dtype, 8, hidden=hidden, sm_count=132)
    if hidden:
        assert all(c.block_size == base.block_size >= hidden for c in cands)
    few = tune.candidate_configs(op, numel, dtype, 8, hidden=hidden, sm_count=132,
                                 max_candidates=3)
    assert few[0] == base and len(few) == min(3, len(cands)) and set(few) <= set(cands)


def test_candidate_configs_validate():
    with pytest.raises(ValueError, match="hidden"):
        tune.candidate_configs("fused", 4096, torch.bfloat16, 2)
    with pytest.raises(ValueError, match="hidden"):
        tune.candidate_configs("all_gather", 4096, torch.int32, 2, hidden=64)
    with pytest.raises(ValueError, match="'bogus'"):
        tune.candidate_configs("bogus", 4096, torch.int32, 2)
    with pytest.raises(ValueError, match="-1"):
        tune.candidate_configs("all_gather", -1, torch.int32, 2)


def test_launch_key_matches_the_ops_units():
    assert tuning.launch_key("all_gather", 64, torch.bfloat16) == (32, torch.int32)
    assert tuning.launch_key("all_gather", 3, torch.bfloat16) == (3, torch.int16)
    assert tuning.launch_key("all_gather", 3, torch.uint8) == (3, torch.uint8)
    assert tuning.launch_key("reduce_scatter", 3, torch.bfloat16) == (3, torch.bfloat16)
    assert [tuning.size_bucket(n) for n in (1, 1024, 1025)] == [1, 1024, 2048]
