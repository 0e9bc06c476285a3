"""The barrier-free path (kernels/lines.py): flag-in-data lines carry small messages of every op
that has it, exactly, call after call on both parities, and leave the line area all zero.

Each op runs on rank-tagged integer data (exact sums) under ``$SYMMTRITON_PROTOCOL=lines`` and
``barrier``; the two must agree bit for bit with each other and with the reference."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.config import lines_config, lines_row_config, lines_row_split
from symmtriton.context import context
from symmtriton.presets import LINES_MAX_BYTES
from symmtriton.kernels.all_gather import _all_gather_lines_kernel
from symmtriton.kernels.all_reduce import _all_reduce_lines_kernel
from symmtriton.kernels.all_reduce_rmsnorm import _all_reduce_rmsnorm_lines_kernel
from symmtriton.kernels.fused_rmsnorm import _fused_rmsnorm_lines_kernel
from symmtriton.kernels.reduce_scatter import _reduce_scatter_lines_kernel
from symmtriton.ops import driver
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync, tagged

LINES_KERNELS = (_all_gather_lines_kernel, _reduce_scatter_lines_kernel, _all_reduce_lines_kernel,
                 _all_reduce_rmsnorm_lines_kernel, _fused_rmsnorm_lines_kernel)


def _last_kernel():
    return driver.last_plan().kernel.fn


def _line_area(buf) -> torch.Tensor:
    """This rank's line area as int64 lines."""
    hdl = buf.symm_mem_hdl
    return hdl.local_tensor()[buf.lines_off:buf.alloc_bytes].view(torch.int64)


def _ops(rank, world, salt):
    """One call of every op with a lines kernel, on small operands; returns their results and the
    kernels the plans launched."""
    dev, bf16 = device(), torch.bfloat16
    res, fns = {}, []
    # all-gather: 32-bit, 16-bit and byte units (an odd address forces bytes)
    for name, n, dtype, shift in (("ag32", 250, torch.float32, 0), ("ag16", 6, bf16, 0),
                                  ("ag8", 12, torch.uint8, 1)):
        x = torch.zeros(n + shift, dtype=dtype, device=dev)[shift:]
        x.copy_(tagged(n, dtype, rank, salt))
        out = torch.zeros(world * n + shift, dtype=dtype, device=dev)[shift:]
        res[name] = st.all_gather_into_tensor(out, x).clone()
        fns.append(_last_kernel())
    for name, n, dtype in (("rs16", 10, bf16), ("rs32", 333, torch.float32)):
        out = torch.empty(n, dtype=dtype, device=dev)
        res[name] = st.reduce_scatter_tensor(out, tagged(world * n, dtype, rank, salt)).clone()
        fns.append(_last_kernel())
    x = tagged(1002, bf16, rank, salt)
    res["ar"] = st.all_reduce(x).clone()  # in place
    fns.append(_last_kernel())
    S, H = 3, 66
    residual = tagged(S * H, bf16, 0, salt + 1, bound=3).view(S, H)
    weight = torch.ones(H, dtype=bf16, device=dev)
    res["arn"] = st.all_reduce_add_rmsnorm(tagged(S * H, bf16, rank, salt).view(S, H), residual,
                                           weight)
    res["arn_res"] = residual
    fns.append(_last_kernel())
    # reduce-scatter + add + RMSNorm (+ all-gather): 2 rows per rank, in place for the gathered one
    s = 2
    for name, fused in (("rsn", st.reduce_scatter_add_rmsnorm),
                        ("rsnag", st.reduce_scatter_add_rmsnorm_all_gather)):
        x = tagged(world * s * H, bf16, rank, salt).view(world * s, H)
        residual = tagged(s * H, bf16, rank, salt + 2, bound=3).view(s, H)
        res[name] = fused(x, residual, weight, out=x if name == "rsnag" else None).clone()
        res[name + "_res"] = residual
        fns.append(_last_kernel())
    sync()
    return {k: v.cpu() for k, v in res.items()}, fns


def _references(world, salt):
    bf16 = torch.bfloat16
    ref = {
        "ag32": reference.all_gather([tagged(250, torch.float32, r, salt) for r in range(world)]),
        "ag16": reference.all_gather([tagged(6, bf16, r, salt) for r in range(world)]),
        "ag8": reference.all_gather([tagged(12, torch.uint8, r, salt) for r in range(world)]),
        "ar": reference.all_reduce([tagged(1002, bf16, r, salt) for r in range(world)]),
    }
    return {k: v.cpu() for k, v in ref.items()}


def _lines_vs_barrier(rank, world, rounds):
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=2)
    bad, kernels = [], set()
    for salt in range(rounds):  # several calls per op: both parities, lines reused
        with protocol("lines"):
            lines, fns = _ops(rank, world, salt)
        kernels.update(fns)
        with protocol("barrier"):
            barrier, fns = _ops(rank, world, salt)
        if any(fn in LINES_KERNELS for fn in fns):
            bad.append(("barrier protocol launched a lines kernel", salt))
        for k in lines:
            if not torch.equal(lines[k].view(torch.uint8), barrier[k].view(torch.uint8)):
                bad.append((k, salt))
        for k, want in _references(world, salt).items():
            if not torch.equal(lines[k], want):
                bad.append((k, salt, "reference"))
        rs = {"rs16": (10, torch.bfloat16), "rs32": (333, torch.float32)}
        for k, (n, dtype) in rs.items():
            want = reference.reduce_scatter([tagged(world * n, dtype, r, salt)
                                             for r in range(world)], rank).cpu()
            if not torch.equal(lines[k], want):
                bad.append((k, salt, "reference"))
    dist.barrier()  # every rank's last call has read (and cleared) its lines
    area = _line_area(buf)
    return bad, kernels == set(LINES_KERNELS), int(area.count_nonzero())


def test_lines_match_barriers_and_leave_the_area_clean(pool):
    for bad, all_lines, nonzero in pool.run(_lines_vs_barrier, 2):  # both parities
        assert bad == []
        assert all_lines  # every op went through its lines kernel
        assert nonzero == 0  # every line read was cleared: nothing stale for the next calls


def _auto_choice(rank, world):
    """``auto`` sends small messages as lines and larger ones (or odd byte counts) with barriers."""
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=8)
    # the auto limit on all this rank pushes (to world - 1 peers), or the slot if smaller
    cap = min(LINES_MAX_BYTES // (world - 1), buf.lines_words * 4)
    chosen = {}
    with protocol("auto"):
        for n in (4, 7, cap // 2, cap // 2 + 2):
            x = tagged(n, torch.bfloat16, rank)
            st.all_gather_into_tensor(torch.empty(world * n, dtype=torch.bfloat16,
                                                  device=device()), x)
            chosen[n] = _last_kernel() is _all_gather_lines_kernel
        sync()
    return list(chosen.values())


@pytest.mark.full  # all-gathers at the line cap (256 KiB a rank): the heaviest lines test
@pytest.mark.parametrize("world", [2, 3])
def test_auto_protocol_chooses_lines_for_small_word_messages(cpu_pool, world):
    for chosen in cpu_pool(world).run(_auto_choice):
        # 8 B and the cap per peer: lines; 14 B (not whole words): barriers; past the cap: barriers
        assert chosen == [True, False, True, False]


def _area_layout(rank, world):
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=1)
    ctx = context(buf)
    # the scratch API never reaches the area
    whole = buf.maybe_get_tensor((buf.nbytes,), torch.uint8)["tensor"]
    past = buf.maybe_get_tensor((buf.nbytes + 1,), torch.uint8)["tensor"]
    return (ctx.lines_off >= whole.numel(), past is None, ctx.lines_words,
            buf.alloc_bytes - buf.lines_off)


def test_line_area_lies_past_the_scratch_bytes(cpu_pool):
    for before, none_past, words, area in cpu_pool(3).run(_area_layout):
        assert before and none_past
        assert area == 2 * 3 * words * 8  # parities x sources x lines of 8 bytes


@pytest.mark.parametrize("mode", ["lines", "barrier", "push"])
def test_env_protocol_is_validated(monkeypatch, mode):
    from symmtriton import env

    monkeypatch.setenv(env.PROTOCOL, mode.upper())
    assert env.protocol() == mode
    monkeypatch.setenv(env.PROTOCOL, "fast")
    with pytest.raises(ValueError, match="'fast'"):
        env.protocol()


@pytest.mark.parametrize("peer_bytes, chunk_bytes", [(1024, 512), (4096, 512), (8192, 256),
                                                     (32768, 256), (65536, 512), (1 << 20, 512)])
def test_flat_chunks_halve_for_mid_sizes(peer_bytes, chunk_bytes):
    """config.lines_config: 256-byte chunks for more than 4 and at most 32 KiB per peer, 512
    bytes otherwise; the row kernels start at 256 (presets.ROW_UNIT_BYTES) for rows of more than 4
    KiB, else at 512."""
    assert lines_config(peer_bytes // 2, torch.bfloat16, 2).block_size * 2 == chunk_bytes
    assert lines_row_config(4096, torch.bfloat16, 2).block_size * 2 == 256
    assert lines_row_config(2048, torch.bfloat16, 2).block_size * 2 == 512
    assert lines_row_config(512, torch.bfloat16, 2).block_size * 2 == 512


def test_row_split_fills_the_blocks_and_fits_the_slot():
    """config.lines_row_split: how the barrier-free row kernels cut rows (kernels/lines_rows.py)."""
    cfg = lines_row_config(4096, torch.bfloat16, 2)
    big = 1 << 18  # inbox lines of a GPU slot
    # decode rows: 256-byte units, one block (a warp) each; 512 bytes when they outnumber blocks
    assert lines_row_split(cfg, 1, 4096, 2, 264, big, False) == (32, 128, 32, 1)
    assert lines_row_split(cfg, 16, 4096, 2, 264, big, False) == (256, 256, 16, 1)
    # more units than blocks: wider units, more warps
    assert lines_row_split(cfg, 128, 4096, 2, 264, big, False) == (256, 2048, 2, 4)
    # short rows stay whole (no stats exchange)
    assert lines_row_split(cfg, 3, 66, 2, 264, big, False)[1:3] == (128, 1)
    # the inboxes (units x nc lines) never overflow the slot
    assert lines_row_split(cfg, 16, 4096, 2, 264, 1024, False)[:3] == (128, 512, 8)
    assert lines_row_split(cfg, 16, 4096, 2, 264, 1023, False)[:3] == (64, 1024, 4)
    # the interpreter: at most 4 units per row, all in one block
    assert lines_row_split(cfg, 3, 1000, 2, 264, big, True)[:3] == (1, 256, 4)
    small = lines_row_config(200, torch.bfloat16, 2)
    assert lines_row_split(small, 3, 200, 2, 264, big, True)[:3] == (3, 256, 1)
