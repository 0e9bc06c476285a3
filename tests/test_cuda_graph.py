"""CUDA graphs: AG, RS and the fused op captured together in one graph and replayed many times
with fresh inputs each replay (GPU worlds of tests/conftest.py); the push kernels composed in one
graph, and the same composition eagerly on every world."""

import pytest
import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools import reference
from symmtriton.tools.testing import device, protocol, sync, tagged

from helpers import captured



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
        rs_ref = reference.reduce_scatter(
            [tagged(world * n, torch.bfloat16, r, salt) for r in range(world)], rank)
        # the fused op ran 3 times: residual gained the reduced shard 3 times
        inputs = [tagged(world * s * H, torch.bfloat16, r, salt).view(world * s, H)
                  for r in range(world)]
        shard = reference.reduce_scatter(inputs, rank).float()
        ok = (torch.equal(ag_out, ag_ref) and torch.equal(rs_out, rs_ref)
              and torch.equal(f_res, (res0.float() + 3 * shard).to(torch.bfloat16)))
        if not ok:
            bad.append(it)
    return bad


@pytest.mark.gpu
def test_collectives_replay_in_one_cuda_graph(gpu_pool):
    assert gpu_pool.run(_graph_replays, 20, timeout=600) == [[]] * gpu_pool.world_size


class _PushComposition:
    """The push kernels (kernels/push.py, forced by ``$SYMMTRITON_PROTOCOL=push``) composed in one
    step: a staged reduce-scatter, a staged two-shot all-reduce into another tensor (gather area
    + copy out), a staged one-shot all-reduce (forced one-shot beyond 2 ranks) and a zero-copy
    two-shot all-reduce in place (the sums land in the peers' tensors). The staged calls use the
    buffer's scratch bytes from byte 0, where the zero-copy tensor lies (README: the buffer is a
    scratch area), so each step copies that tensor's input in after every staged call and runs
    its all-reduce last; ``ZERO_COPY_LAST = False`` is the layout that breaks that rule."""

    ZERO_COPY_LAST = True

    def __init__(self, rank, world, n):
        dev, bf16 = device(), torch.bfloat16
        buf = st.SymmetricMemoryManager.get_buffer("tp", dist.group.WORLD, size_mb=32)
        self.rank, self.world, self.n = rank, world, n
        self.rs_in = torch.empty(world * n, dtype=bf16, device=dev)
        self.rs_out = torch.empty(n, dtype=bf16, device=dev)
        self.ar_in = torch.empty(n, dtype=bf16, device=dev)
        self.ar_out = torch.empty(n, dtype=bf16, device=dev)
        self.sym_src = torch.empty(n, dtype=bf16, device=dev)
        self.sym = buf.maybe_get_tensor((n,), bf16)["tensor"]
        self.ar1_in = torch.empty(n, dtype=bf16, device=dev)
        self.ar1_out = torch.empty(n, dtype=bf16, device=dev)

    def fill(self, salt):
        n, world, rank, bf16 = self.n, self.world, self.rank, torch.bfloat16
        self.rs_in.copy_(tagged(world * n, bf16, rank, salt))
        self.ar_in.copy_(tagged(n, bf16, rank, salt + 1))
        self.sym_src.copy_(tagged(n, bf16, rank, salt + 2))
        self.ar1_in.copy_(tagged(n, bf16, rank, salt + 3))

    def _zero_copy(self):
        self.sym.copy_(self.sym_src)
        st.all_reduce(self.sym, algorithm="two_shot")

    def step(self):
        st.reduce_scatter_tensor(self.rs_out, self.rs_in)
        st.all_reduce(self.ar_in, out=self.ar_out, algorithm="two_shot")
        if not self.ZERO_COPY_LAST:
            self._zero_copy()
        st.all_reduce(self.ar1_in, out=self.ar1_out, algorithm="one_shot")
        if self.ZERO_COPY_LAST:
            self._zero_copy()

    def wrong(self, salt) -> list:
        """Names of the results that differ from the pure-torch reference for ``salt``."""
        n, world, bf16 = self.n, self.world, torch.bfloat16

        def ar_ref(s):
            return reference.all_reduce([tagged(n, bf16, r, s) for r in range(world)])

        rs_ref = reference.reduce_scatter([tagged(world * n, bf16, r, salt) for r in range(world)],
                                          self.rank)
        checks = {"reduce_scatter": (self.rs_out, rs_ref),
                  "two_shot": (self.ar_out, ar_ref(salt + 1)),
                  "zero_copy": (self.sym, ar_ref(salt + 2)),
                  "one_shot": (self.ar1_out, ar_ref(salt + 3))}
        return [name for name, (got, ref) in checks.items() if not torch.equal(got, ref)]


class _ZeroCopyFirst(_PushComposition):
    ZERO_COPY_LAST = False


def _push_graph_replays(rank, world, replays):
    """The composition captured twice in one graph, replayed with fresh data; every result
    exact. Returns the replays that were wrong."""
    comp = _PushComposition(rank, world, 70000 + 3)  # several chunks per slice, a tail
    comp.fill(0)
    with protocol("push"):
        graph = captured(lambda: [comp.step() for _ in range(2)])
    bad = []
    for it in range(replays):
        salt = 4 * (it + 1)
        comp.fill(salt)
        graph.replay()
        torch.cuda.synchronize()
        if comp.wrong(salt):
            bad.append(it)
    return bad


@pytest.mark.gpu
def test_push_kernels_replay_in_one_cuda_graph(gpu_pool):
    assert gpu_pool.run(_push_graph_replays, 1000, timeout=600) == [[]] * gpu_pool.world_size


def _push_eager(rank, world, zero_copy_last):
    """The same composition run eagerly (twice per step, two steps): the wrong results."""
    comp = (_PushComposition if zero_copy_last else _ZeroCopyFirst)(rank, world, 20000 + 3)
    wrong = []
    with protocol("push"):
        for it in range(2):
            comp.fill(4 * it)
            comp.step()
            comp.step()
            sync()
            wrong += comp.wrong(4 * it)
    return sorted(set(wrong))


@pytest.mark.w3_full  # the push kernels run at W = 3 in their own test files
def test_push_composition_is_exact(pool):
    """The staged and zero-copy push calls compose (on the CPU tier too, eagerly)."""
    assert pool.run(_push_eager, True) == [[]] * pool.world_size


def test_staged_push_overwrites_a_zero_copy_tensor_in_the_scratch(cpu_pool):
    """The layout rule the composition keeps: a staged push call lays its slots from byte 0, so
    a zero-copy tensor filled before it holds the peers' data afterwards."""
    pool = cpu_pool(2)
    assert pool.run(_push_eager, False) == [["zero_copy"]] * 2
