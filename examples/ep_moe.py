"""Expert-parallel MoE layer: dispatch by ``all_gather_v``, combine by ``reduce_scatter_v``,
against the same layer on torch.distributed.

    torchrun --nproc-per-node=2 examples/ep_moe.py                  # 2 GPUs, CUDA graphs
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/ep_moe.py --steps 3 --iters 2

Every rank holds ``--experts`` experts (a ``[H, H]`` matrix each; expert ``e`` lives on rank
``e // experts``) and, each step, a different number of tokens (at most ``--tokens``; some ranks
none). A router (the same on every rank) picks ``--topk`` experts per token with softmax
weights. One layer step:

    symmtriton:         all_gather_into_tensor of this rank's token count -> counts [W] (device)
                        all_gather_v(hidden, routing int64, probs fp32) by counts: one launch,
                        packed in rank order straight into the symmetric buffer (zero-copy)
                        local experts over the gathered tokens
                        reduce_scatter_v of the expert outputs by counts -> this rank's tokens
    torch.distributed:  all_gather_into_tensor of the padded tensors (and the counts), the same
                        experts, reduce_scatter_tensor of the padded outputs

The counts stay on the device, so on GPU one step of each is captured in a CUDA graph once and
replayed with new tokens and counts every step (the torch.distributed layer too when its group
is NCCL). Rank 0 checks every step against the torch.distributed layer (bf16 tolerance on GPU)
and prints the time per step of both, what the baseline runs on and the speed-up where the two
compare like for like (one rank per GPU, NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import _common
import symmtriton as st


class MoE:
    """The layer's weights and its fixed-address activations (graph-capturable)."""

    def __init__(self, env, args, dtype, buf):
        W, cap, H, k = env.world_size, args.tokens, args.hidden, args.topk
        self.env, self.cap, self.k = env, cap, k
        self.n_experts = W * args.experts
        self.local = range(env.rank * args.experts, (env.rank + 1) * args.experts)
        g = torch.Generator().manual_seed(1234)  # the same weights on every rank
        self.router = (torch.randn(H, self.n_experts, generator=g) / H ** 0.5).to(env.device, dtype)
        experts = torch.randn(self.n_experts, H, H, generator=g) / H ** 0.5
        self.experts = experts[self.local.start:self.local.stop].to(env.device, dtype)
        dev = env.device
        self.x = torch.zeros(cap, H, dtype=dtype, device=dev)  # this step's tokens (first n)
        self.n = torch.zeros(1, dtype=torch.int64, device=dev)  # this rank's token count
        self.counts = torch.zeros(W, dtype=torch.int64, device=dev)
        self.out = torch.zeros(cap, H, dtype=dtype, device=dev)
        specs = [(W * cap * H, dtype), (W * cap * k, torch.int64), (W * cap * k, torch.float32)]
        views = buf.maybe_get_tensors(specs)["tensors"]
        shapes = [(W * cap, H), (W * cap, k), (W * cap, k)]
        if views is None:  # no symmetric memory: plain tensors (staged or torch fallback)
            self.gathered = [torch.zeros(s, dtype=d, device=dev)
                             for s, (_, d) in zip(shapes, specs)]
        else:
            self.gathered = [v.view(d).view(s) for (v, _), s, (_, d) in zip(views, shapes, specs)]
            for t in self.gathered:
                t.zero_()

    def route(self, x):
        probs, idx = torch.topk(torch.softmax((x @ self.router).float(), dim=-1), self.k, dim=-1)
        return idx, probs / probs.sum(-1, keepdim=True)

    def run_experts(self, x, idx, probs, valid):
        """Sum over this rank's experts of (routing weight x expert(token)); 0 on invalid rows."""
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j, e in enumerate(self.local):
            weight = (probs * (idx == e)).sum(-1, keepdim=True)
            y += weight * (x @ self.experts[j]).float()
        return torch.where(valid[:, None], y, 0.0).to(x.dtype)

    def step_symmtriton(self):
        env = self.env
        st.all_gather_into_tensor(self.counts, self.n, env.group)
        idx, probs = self.route(self.x)
        hidden, g_idx, g_probs = self.gathered
        st.all_gather_v(self.gathered, [self.x, idx, probs], self.counts, env.group)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        y = self.run_experts(hidden, g_idx, g_probs, rows < self.counts.sum())
        st.reduce_scatter_v(self.out, y, self.counts, env.group)
        return self.out

    def step_torch(self, out):
        """The same layer on padded tensors: rank r's tokens at rows r * cap .. + counts[r]."""
        env, cap = self.env, self.cap
        idx, probs = self.route(self.x)
        counts = torch.empty_like(self.counts)
        dist.all_gather_into_tensor(counts, self.n, group=env.group)
        gathered = [t.new_empty((env.world_size * cap, *t.shape[1:])) for t in (self.x, idx, probs)]
        for g_t, t in zip(gathered, (self.x, idx, probs)):
            dist.all_gather_into_tensor(g_t, t, group=env.group)
        valid = (torch.arange(cap, device=counts.device)[None, :] < counts[:, None]).view(-1)
        y = self.run_experts(*gathered, valid)
        dist.reduce_scatter_tensor(out, y, group=env.group)
        return out


def tokens_of(step: int, rank: int, world: int, cap: int) -> int:
    """A different count on every rank and step; rank ``step % world`` gets none."""
    return 0 if rank == step % world else 1 + (7 * step + 3 * rank) % cap


def graphed(env, fn):
    """``fn`` captured in a CUDA graph (after an eager warm-up) on GPU; ``fn`` itself on CPU."""
    if not env.on_gpu:
        return fn
    fn()
    torch.cuda.synchronize()
    graph = _common.cuda_graph()  # reset by _common.finish (before the NCCL group goes)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    p = _common.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--hidden", type=_common.positive_int, default=None,
                   help="hidden size (default 2048 on GPU, 16 on CPU)")
    p.add_argument("--tokens", type=_common.positive_int, default=None,
                   help="most tokens per rank and step (default 128 on GPU, 4 on CPU)")
    p.add_argument("--experts", type=_common.positive_int, default=2, help="experts per rank")
    p.add_argument("--topk", type=_common.positive_int, default=2, help="experts per token")
    p.add_argument("--steps", type=_common.positive_int, default=None,
                   help="checked steps (default 8 on GPU, 3 on CPU)")
    args = p.parse_args()
    env = _common.init_distributed()
    args.hidden = _common.pick(args.hidden, env, 2048, 16)
    args.tokens = _common.pick(args.tokens, env, 128, 4)
    args.steps = _common.pick(args.steps, env, 8, 3)
    if args.topk > env.world_size * args.experts:
        p.error(f"--topk {args.topk} exceeds the {env.world_size * args.experts} experts")
    dtype = _common.dtype_of(args, env)
    moe = MoE(env, args, dtype, _common.buffer(env, args))
    ref_out = torch.empty_like(moe.out)
    ours = graphed(env, moe.step_symmtriton)
    theirs = graphed(env, lambda: moe.step_torch(ref_out)) if env.dist_backend == "nccl" else \
        (lambda: moe.step_torch(ref_out))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    worst = 0.0
    for step in range(args.steps):
        n = tokens_of(step, env.rank, env.world_size, args.tokens)
        gen = torch.Generator().manual_seed(100 * step + env.rank)
        moe.x.copy_(torch.randn(moe.x.shape, generator=gen).to(dtype))
        moe.n.fill_(n)
        ours()
        theirs()
        _common.synchronize(env)
        got, want = moe.out[:n].float(), ref_out[:n].float()
        worst = max(worst, float((got - want).abs().max()) if n else 0.0)
        _common.all_ranks_agree(env, torch.allclose(got, want, **tol), f"ep_moe step {step}")
    st.synchronize(env.group)  # raises if any step's counts overflowed a capacity
    t_ours = _common.time_per_call(env, ours, args.iters, args.warmup)
    t_theirs = _common.time_per_call(env, theirs, args.iters, args.warmup)
    mode = "graph" if env.on_gpu else "eager"
    _common.log(env, f"ep_moe {env.describe()} hidden={args.hidden} tokens<={args.tokens}/rank "
                     f"experts={args.experts}/rank topk={args.topk} "
                     f"{str(dtype).removeprefix('torch.')}: "
                     f"symmtriton {_common.us(t_ours)} ({mode}), torch.distributed "
                     f"{_common.us(t_theirs)} ({mode if env.dist_backend == 'nccl' else 'eager'}) "
                     f"per step; outputs match (max diff {worst:.3g})")
    _common.log(env, _common.versus_baseline(env, {"symmtriton": t_ours}, t_theirs))
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
