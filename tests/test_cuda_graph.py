"""CUDA graphs: AG, RS and the fused op captured together in one graph and replayed many times
with fresh inputs each replay (GPU only: every GPU world of tests/conftest.py)."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton import reference
from symmtriton.testing import captured, device, protocol, tagged

pytestmark = pytest.mark.gpu


def _graph_replays(rank, world, replays):
    dev = device()
    st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=32)  # collectives find it
    n, s, H = 4096 + 8, 3, 1152
    ag_in = torch.empty(n, dtype=torch.bfloat16, device=dev)
    ag_out = torch.empty(world * n, dtype=torch.bfloat16, device=dev)
    rs_in = torch.empty(world * n, dtype=torch.bfloat16, device=dev)
    rs_out = torch.empty(n, dtype=torch.bfloat16, device=dev)
    f_in = torch.empty(world * s, H, dtype=torch.bfloat16, device=dev)
    f_res = torch.empty(s, H, dtype=torch.bfloat16, device=dev)
    f_w = torch.ones(H, dtype=torch.bfloat16, device=dev)
    f_out = torch.empty(world * s, H, dtype=torch.bfloat16, device=dev)

    def step():
        st.all_gather_into_tensor(ag_out, ag_in)
        st.reduce_scatter_tensor(rs_out, rs_in)
        st.reduce_scatter_add_rmsnorm_all_gather(f_in, f_res, f_w, out=f_out)

    def fill(salt):
        ag_in.copy_(tagged(n, torch.bfloat16, rank, salt))
        rs_in.copy_(tagged(world * n, torch.bfloat16, rank, salt))
        f_in.copy_(tagged(world * s * H, torch.bfloat16, rank, salt).view(world * s, H))
        f_res.copy_(tagged(s * H, torch.bfloat16, rank, salt, bound=2).view(s, H))

    fill(0)
    graph = captured(lambda: [step() for _ in range(3)])  # repeated collectives in one graph
    bad = []
    for it in range(replays):
        salt = it + 1
        fill(salt)
        res0 = f_res.clone()
        graph.replay()
        torch.cuda.synchronize()
        ag_ref = reference.all_gather([tagged(n, torch.bfloat16, r, salt) for r in range(world)])
        rs_ref = reference.reduce_scatter([tagged(world * n, torch.bfloat16, r, salt) for r in range(world)], rank)
        # the fused op ran 3 times: residual gained the reduced shard 3 times
        inputs = [tagged(world * s * H, torch.bfloat16, r, salt).view(world * s, H) for r in range(world)]
        shard = reference.reduce_scatter(inputs, rank).float()
        ok = (torch.equal(ag_out, ag_ref) and torch.equal(rs_out, rs_ref)
              and torch.equal(f_res, (res0.float() + 3 * shard).to(torch.bfloat16)))
        if not ok:
            bad.append(it)
    return bad


def test_collectives_replay_in_one_cuda_graph(gpu_pool):
    assert gpu_pool.run(_graph_replays, 20, timeout=600) == [[]] * gpu_pool.world_size


def _push_graph_replays(rank, world, replays):
    """The push kernels (kernels/push.py, forced by ``$SYMMTRITON_PROTOCOL=push``) captured twice
    each in one graph: a staged reduce-scatter, a staged two-shot all-reduce into another tensor
    (gather area + copy out), a zero-copy one in place (the sums land in the peers' tensors) and
    a staged one-shot all-reduce (forced one-shot beyond 2 ranks), replayed
    with fresh data; every result exact. The staged calls use the buffer's scratch bytes, where
    the zero-copy tensor lies, so each step copies that tensor's input in after them."""
    dev, bf16 = device(), torch.bfloat16
    buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=32)
    n = 70000 + 3  # several chunks per slice, a tail
    rs_in = torch.empty(world * n, dtype=bf16, device=dev)
    rs_out = torch.empty(n, dtype=bf16, device=dev)
    ar_in = torch.empty(n, dtype=bf16, device=dev)
    ar_out = torch.empty(n, dtype=bf16, device=dev)
    sym_src = torch.empty(n, dtype=bf16, device=dev)
    sym = buf.maybe_get_tensor((n,), bf16)["tensor"]
    ar1_in = torch.empty(n, dtype=bf16, device=dev)
    ar1_out = torch.empty(n, dtype=bf16, device=dev)

    def fill(salt):
        rs_in.copy_(tagged(world * n, bf16, rank, salt))
        ar_in.copy_(tagged(n, bf16, rank, salt + 1))
        sym_src.copy_(tagged(n, bf16, rank, salt + 2))
        ar1_in.copy_(tagged(n, bf16, rank, salt + 3))

    def step():
        st.reduce_scatter_tensor(rs_out, rs_in)
        st.all_reduce(ar_in, out=ar_out, algorithm="two_shot")
        sym.copy_(sym_src)
        st.all_reduce(sym, algorithm="two_shot")
        st.all_reduce(ar1_in, out=ar1_out, algorithm="one_shot")

    fill(0)
    with protocol("push"):
        graph = captured(lambda: [step() for _ in range(2)])
    bad = []
    for it in range(replays):
        salt = 4 * (it + 1)
        fill(salt)
        graph.replay()
        torch.cuda.synchronize()
        rs_ref = reference.reduce_scatter([tagged(world * n, bf16, r, salt) for r in range(world)],
                                          rank)
        ar_ref = reference.all_reduce([tagged(n, bf16, r, salt + 1) for r in range(world)])
        sym_ref = reference.all_reduce([tagged(n, bf16, r, salt + 2) for r in range(world)])
        ar1_ref = reference.all_reduce([tagged(n, bf16, r, salt + 3) for r in range(world)])
        if not (torch.equal(rs_out, rs_ref) and torch.equal(ar_out, ar_ref)
                and torch.equal(sym, sym_ref) and torch.equal(ar1_out, ar1_ref)):
            bad.append(it)
    return bad


def test_push_kernels_replay_in_one_cuda_graph(gpu_pool):
    assert gpu_pool.run(_push_graph_replays, 1000, timeout=600) == [[]] * gpu_pool.world_size
