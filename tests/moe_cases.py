"""MoE test cases both MoE test files use: token counts, routings, rank-tagged inputs and the
experts (a scale per expert), with the capacity and timeout of their calls."""

import torch
import torch.distributed as dist

import symmtriton as st
from symmtriton.tools.testing import device, sync, tagged

M = 5  # max_tokens_per_rank
TIMEOUT_S = 20.0


def tokens(kind, rank, world):
    """Tokens of ``rank``: ``"zero"``: rank 0 has none; else ``M`` (the last rank ``M - 1``)."""
    if kind == "zero" and rank == 0:
        return 0
    return M - 1 if rank == world - 1 else M


def route(kind, rank, world, T, K, EL, salt=0):
    """``topk_idx`` int64 ``[T, K]`` of ``rank``: ``uniform`` (K random experts, distinct up to
    E; token 1 padding, token 2 with an unused slot), ``skewed`` (mostly the first experts,
    named again when ``K > EL``), ``one_rank`` (only the last rank's experts), ``every_rank``
    (every rank owns one of each token's experts), ``zero`` (uniform, rank 0 without tokens)."""
    E = world * EL
    g = torch.Generator().manual_seed(1000 * salt + 10 * rank + world)
    rows = [torch.randperm(E, generator=g).repeat(-(-K // E))[:K] for _ in range(T)]
    idx = torch.stack(rows) if T else torch.zeros(0, K, dtype=torch.int64)
    t, k = torch.arange(T)[:, None], torch.arange(K)[None, :]
    if kind == "skewed":
        idx = torch.where(t % 4 == 3, idx, k % EL)
    elif kind == "one_rank":
        idx = (world - 1) * EL + (t + k) % EL
    elif kind == "every_rank":
        idx = (k % world) * EL + (t + k // world) % EL
    elif T > 2:
        idx[1] = -1
        idx[2, 0] = -1
    return idx


def inputs(kind, rank, world, K, EL, H, dtype, salt=0):
    """``(x, topk_idx, topk_weights)`` of ``rank`` (on the CPU)."""
    T = tokens(kind, rank, world)
    x = tagged(T * H, dtype, rank, salt, bound=2).cpu().view(T, H)
    g = torch.Generator().manual_seed(77 + rank + salt)
    w = torch.randint(-1, 1, (T, K), generator=g).float().exp2()
    return x, route(kind, rank, world, T, K, EL, salt), w


def scales(rank, EL, dtype):
    """``[EL, 1, 1]``: local expert ``j`` of ``rank`` scales its rows by ``(global id) % 2 + 1``."""
    return torch.tensor([(rank * EL + j) % 2 + 1 for j in range(EL)], dtype=dtype)[:, None, None]


def expert(recv, rank, EL):
    """The experts (:func:`scales`) applied to ``recv``."""
    return recv * scales(rank, EL, recv.dtype).to(recv.device)


def compiled_and_eager(layer, rank, world, H):
    """``layer(x, idx, w, num_experts, scale)`` on the uniform routing (2 local experts, K 4,
    hidden ``H``, bf16; ``scale``: :func:`scales`) under ``torch.compile(fullgraph=True)`` and
    eagerly: ``(graphs traced, symmtriton ops in them, compiled result, eager result)``."""
    st.SymmetricMemoryManager.get_buffer("ep", dist.group.WORLD, size_mb=1)
    torch._dynamo.reset()
    EL, K = 2, 4
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    x, idx, w = (t.to(device()) for t in inputs("uniform", rank, world, K, EL, H,
                                                  torch.bfloat16))
    scale = scales(rank, EL, torch.bfloat16).to(device())
    got = torch.compile(layer, backend=backend, fullgraph=True)(x, idx, w, world * EL, scale)
    eager = layer(x, idx, w, world * EL, scale)
    sync()
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if "symmtriton" in str(n.target)]
    return len(graphs), ops, got, eager
