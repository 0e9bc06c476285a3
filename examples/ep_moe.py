"""Expert-parallel MoE layer on symmtriton's all-to-all pair (moe_dispatch / moe_combine), against
the same layer on all_gather_v / reduce_scatter_v and on torch.distributed.all_to_all_single.

    torchrun --nproc-per-node=2 examples/ep_moe.py                  # 2 GPUs, CUDA graphs
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/ep_moe.py --steps 3 --iters 2

Every rank holds ``--experts`` experts (a ``[H, H]`` matrix each; expert ``e`` lives on rank
``e // experts``) and, each step, a different number of tokens (at most ``--tokens``; some ranks
none; the rest are padding, routed to no expert). A router (the same on every rank) picks
``--topk`` experts per token with softmax weights. One layer step, three ways:

    all-to-all:         moe_dispatch -> recv_x [experts, W * tokens, H] packed per expert ->
                        one batched matmul over the local experts -> moe_combine (weighted sum
                        of each token's expert rows, one pre-reduced row per token and rank)
    all_gather_v:       all_gather_into_tensor of the token counts, all_gather_v of (hidden,
                        routing, probs) into the symmetric buffer, the local experts over every
                        gathered token, reduce_scatter_v of the weighted outputs
    torch.distributed:  all_to_all_single of the padded tokens and routing, the same batched
                        experts on the tokens routed here, all_to_all_single of the weighted
                        partial sums back

Nothing is read back to the host, so on GPU each is captured in a CUDA graph once and replayed
with new tokens every step (the torch.distributed layer too when its group is NCCL). Rank 0
checks every step's three outputs against each other (bf16 tolerance on GPU) and prints the time
per step of each, what the baseline runs on and the speed-up where they compare like for like
(one rank per GPU, NCCL).
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
        self.outs = {name: torch.zeros(cap, H, dtype=dtype, device=dev)
                     for name in ("all-to-all", "all_gather_v", "torch.distributed")}
        specs = [(W * cap * H, dtype), (W * cap * k, torch.int64), (W * cap * k, torch.float32)]
        views = buf.maybe_get_tensors(specs)["tensors"]
        shapes = [(W * cap, H), (W * cap, k), (W * cap, k)]
        if views is None:  # no symmetric memory: plain tensors (staged or torch fallback)
            self.gathered = [torch.zeros(s, dtype=d, device=dev)
                             for s, (_, d) in zip(shapes, specs)]
        else:  # the scratch area: the all-to-all's staging reuses it between the steps
            self.gathered = [v.view(d).view(s) for (v, _), s, (_, d) in zip(views, shapes, specs)]
            for t in self.gathered:
                t.zero_()

    def route(self):
        """``(topk_idx, weights)`` of this step's tokens; padding tokens (from ``n`` on) get -1."""
        logits = (self.x @ self.router).float()
        probs, idx = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1)
        valid = torch.arange(self.cap, device=self.x.device)[:, None] < self.n
        return torch.where(valid, idx, -1), probs / probs.sum(-1, keepdim=True)

    def run_experts(self, x, idx, probs):
        """Sum over this rank's experts of (routing weight x expert(token)), fp32 (0 for a token
        routed to none of them)."""
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j, e in enumerate(self.local):
            weight = (probs * (idx == e)).sum(-1, keepdim=True)
            y += weight * (x @ self.experts[j]).float()
        return y

    def step_all_to_all(self):
        """moe_dispatch -> the local experts, batched -> moe_combine."""
        idx, probs = self.route()
        recv, handle = st.moe_dispatch(self.x, idx, self.n_experts, self.env.group,
                                       max_tokens_per_rank=self.cap)
        expert_out = torch.bmm(recv, self.experts)  # rows past handle.recv_counts: unused
        return st.moe_combine(expert_out, idx, probs, handle, self.env.group,
                              out=self.outs["all-to-all"])

    def step_gather_v(self):
        """all_gather_v of every token to every rank -> experts -> reduce_scatter_v."""
        env, out = self.env, self.outs["all_gather_v"]
        st.all_gather_into_tensor(self.counts, self.n, env.group)
        idx, probs = self.route()
        hidden, g_idx, g_probs = self.gathered
        st.all_gather_v(self.gathered, [self.x, idx, probs], self.counts, env.group)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        y = self.run_experts(hidden, torch.where(rows < self.counts.sum(), g_idx, -1), g_probs)
        st.reduce_scatter_v(out, y.to(out.dtype), self.counts, env.group)
        return out

    def step_torch(self):
        """all_to_all_single of every rank's padded tokens -> experts -> all_to_all_single of the
        weighted partial sums back (no count exchange: padded to ``--tokens``)."""
        env, W, out = self.env, self.env.world_size, self.outs["torch.distributed"]
        idx, probs = self.route()
        sent = [t.expand(W, *t.shape).contiguous() for t in (self.x, idx, probs)]
        got = [torch.empty_like(t) for t in sent]
        for g_t, t in zip(got, sent):
            dist.all_to_all_single(g_t, t, group=env.group)
        y = self.run_experts(*got)  # [source, token, H]
        back = torch.empty_like(y)
        dist.all_to_all_single(back, y, group=env.group)
        return out.copy_(back.sum(0))


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
    torch_graphs = env.dist_backend == "nccl"
    steps = {"all-to-all": graphed(env, moe.step_all_to_all),
             "all_gather_v": graphed(env, moe.step_gather_v),
             "torch.distributed": graphed(env, moe.step_torch) if torch_graphs else moe.step_torch}
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    worst = 0.0
    for step in range(args.steps):
        n = tokens_of(step, env.rank, env.world_size, args.tokens)
        gen = torch.Generator().manual_seed(100 * step + env.rank)
        moe.x.copy_(torch.randn(moe.x.shape, generator=gen).to(dtype))
        moe.n.fill_(n)
        for fn in steps.values():
            fn()
        _common.synchronize(env)
        want = moe.outs["torch.distributed"][:n].float()
        ok = True
        for name in ("all-to-all", "all_gather_v"):
            got = moe.outs[name][:n].float()
            worst = max(worst, float((got - want).abs().max()) if n else 0.0)
            ok = ok and torch.allclose(got, want, **tol)
        _common.all_ranks_agree(env, ok, f"ep_moe step {step}")
    st.synchronize(env.group)  # raises if a step's counts or expert ids were out of range
    times = {name: _common.time_per_call(env, fn, args.iters, args.warmup)
             for name, fn in steps.items()}
    mode = "graph" if env.on_gpu else "eager"
    modes = {"all-to-all": mode, "all_gather_v": mode,
             "torch.distributed": mode if torch_graphs else "eager"}
    _common.log(env, f"ep_moe {env.describe()} hidden={args.hidden} tokens<={args.tokens}/rank "
                     f"experts={args.experts}/rank topk={args.topk} "
                     f"{str(dtype).removeprefix('torch.')}: " +
                     ", ".join(f"{name} {_common.us(t)} ({modes[name]})"
                               for name, t in times.items()) +
                     f" per step; outputs match (max diff {worst:.3g})")
    theirs = times.pop("torch.distributed")
    _common.log(env, _common.versus_baseline(env, times, theirs))
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
