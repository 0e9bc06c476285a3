"""Tensor-parallel decoding with a sequence-sharded residual stream: symmtriton's fused
reduce-scatter + residual add + RMSNorm + all-gather against torch.distributed collectives.

    torchrun --nproc-per-node=8 examples/tp_decode.py          # 8 GPUs, hidden 4096, CUDA graphs
    TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1 torchrun --nproc-per-node=2 examples/tp_decode.py
                                                     # 2 ranks on 1 GPU (start MPS to time)
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/tp_decode.py --steps 3 --iters 2
    torchrun --nproc-per-node=2 examples/tp_decode.py --mode ar    # no sequence parallelism

The model is a stack of pre-norm transformer blocks (attention over a KV cache, gated-SiLU MLP,
no positional encoding), tensor-parallel over the ranks: attention heads and MLP columns are
split (column-parallel QKV / gate-up matmuls, row-parallel output / down matmuls), and the
residual stream is split by tokens (sequence parallel), each rank holding ``batch / world``
rows. Each decode step feeds one token per sequence (``batch`` tokens), and between every
row-parallel matmul and the next column-parallel one runs

    symmtriton:         torch.ops.symmtriton.reduce_scatter_add_rmsnorm_all_gather (one kernel;
                        the row-parallel matmul writes its partial sums straight into the
                        symmetric buffer, so the reduce-scatter reads them without a copy)
    torch.distributed:  reduce_scatter_tensor, residual add, RMSNorm, all_gather_into_tensor

with the same weights. ``--mode ar`` runs the layout without sequence parallelism instead: the
residual stream is replicated (every rank holds all ``batch`` rows) and the layer boundary is

    symmtriton:         torch.ops.symmtriton.all_reduce_add_rmsnorm (one kernel, zero-copy)
    torch.distributed:  all_reduce, residual add, torch.nn.functional.rms_norm

On GPU one decode step is captured in a CUDA graph and replayed (the
torch.distributed path too when its group is NCCL; gloo cannot be captured). The check feeds
the torch.distributed model the tokens the symmtriton model decoded, compares the final normed
hidden states of every step (bf16 tolerance on GPU, fp32 on CPU), and rank 0 prints the
per-token latency (one decode step) of both, what the torch.distributed baseline runs on (the
speed-up only where the two compare like for like: one rank per GPU, NCCL) and the largest
difference.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import _common
from symmtriton import custom_ops
from symmtriton.tools.reference import rmsnorm

#: largest allowed |symmtriton - torch.distributed| of the normed hidden states, as a fraction
#: of their largest magnitude, by dtype. The paths round differently (the fused op reduces and
#: adds the residual in fp32, torch.distributed in the element type; RMSNorm sums in another
#: order), and a residual that differs by one rounding step shifts its whole normed row.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Config:
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    batch: int
    max_len: int
    eps: float
    dtype: torch.dtype


class Layer:
    """One block's weights (this rank's shards) and KV cache (this rank's heads)."""

    def __init__(self, cfg: Config, world: int, rank: int, index: int, device, seed: int):
        hl, hd, fl, H = cfg.heads // world, cfg.hidden // cfg.heads, cfg.ffn // world, cfg.hidden

        def randn(*shape, scale, salt, sharded=True):
            g = torch.Generator(device=device).manual_seed(
                seed + 1000 * index + 10 * salt + (rank + 1) * 1_000_003 * sharded)
            return (torch.randn(shape, generator=g, device=device) * scale).to(cfg.dtype)

        self.attn_norm = 1 + randn(H, scale=0.1, salt=0, sharded=False)
        self.wqkv = randn(H, 3 * hl * hd, scale=H ** -0.5, salt=1)
        self.wo = randn(hl * hd, H, scale=(cfg.heads * hd) ** -0.5, salt=2)
        self.mlp_norm = 1 + randn(H, scale=0.1, salt=3, sharded=False)
        self.w_gate_up = randn(H, 2 * fl, scale=H ** -0.5, salt=4)
        self.w_down = randn(fl, H, scale=cfg.ffn ** -0.5, salt=5)
        # [sequence, head, position, head_dim]: attention is two batched matmuls, no permutes
        self.k_cache = torch.zeros(cfg.batch, hl, cfg.max_len, hd, dtype=cfg.dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)


class Model:
    """The tensor-parallel decoder of one rank plus its decode state (static tensors, so a
    captured step replays on new tokens)."""

    def __init__(self, cfg: Config, env: _common.Env, seed: int, sequence_parallel: bool = True):
        self.cfg, self.env = cfg, env
        dev = env.device
        g = torch.Generator(device=dev).manual_seed(seed)
        self.embed = torch.randn(cfg.vocab, cfg.hidden, generator=g, device=dev).to(cfg.dtype)
        self.lm_head = (torch.randn(cfg.hidden, cfg.vocab, generator=g, device=dev)
                        * cfg.hidden ** -0.5).to(cfg.dtype)
        self.final_norm = (1 + 0.1 * torch.randn(cfg.hidden, generator=g, device=dev)).to(cfg.dtype)
        self.prompt = torch.randint(0, cfg.vocab, (cfg.batch,), generator=g, device=dev)
        self.layers = [Layer(cfg, env.world_size, env.rank, i, dev, seed)
                       for i in range(cfg.layers)]
        s = cfg.batch // env.world_size if sequence_parallel else cfg.batch
        # this rank's tokens (all of them when the residual is replicated)
        self.rows = slice(env.rank * s, (env.rank + 1) * s) if sequence_parallel else slice(None)
        self.residual = torch.zeros(s, cfg.hidden, dtype=cfg.dtype, device=dev)
        self.tokens = torch.zeros(cfg.batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.arange(cfg.max_len, device=dev)

    def reset(self) -> None:
        """Empty KV caches, position 0, the prompt's tokens."""
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()
        self.pos.zero_()
        self.tokens.copy_(self.prompt)

    def step(self, comm) -> torch.Tensor:
        """Decode one token per sequence: read ``self.tokens``, write the greedy next tokens
        there, advance the position; return the final normed hidden states [batch, hidden]."""
        cfg = self.cfg
        S, hl, hd = cfg.batch, cfg.heads // self.env.world_size, cfg.hidden // cfg.heads
        self.residual.copy_(F.embedding(self.tokens[self.rows], self.embed))
        h = comm.all_gather_normed(self.residual, self.layers[0].attn_norm)
        for i, layer in enumerate(self.layers):
            q, k, v = (h @ layer.wqkv).view(S, 3, hl, 1, hd).unbind(1)   # each [S, hl, 1, hd]
            layer.k_cache.index_copy_(2, self.pos, k)
            layer.v_cache.index_copy_(2, self.pos, v)
            scores = (q @ layer.k_cache.transpose(-1, -2)).float() * hd ** -0.5  # [S, hl, 1, T]
            scores = scores.masked_fill(self.positions > self.pos, float("-inf"))
            attn = scores.softmax(-1).to(cfg.dtype) @ layer.v_cache               # [S, hl, 1, hd]
            h = comm.row_parallel(attn.reshape(S, hl * hd), layer.wo, self.residual, layer.mlp_norm)
            gate, up = (h @ layer.w_gate_up).chunk(2, dim=-1)
            last = i + 1 == len(self.layers)
            next_norm = self.final_norm if last else self.layers[i + 1].attn_norm
            h = comm.row_parallel(F.silu(gate) * up, layer.w_down, self.residual, next_norm)
        self.tokens.copy_((h @ self.lm_head).argmax(-1))
        self.pos.add_(1).remainder_(cfg.max_len)
        return h


class SymmtritonComm:
    """Row-parallel matmul into the symmetric buffer, then the fused custom op."""

    name = "symmtriton fused"

    def __init__(self, cfg: Config, env: _common.Env, buf):
        self.cfg, self.group_name = cfg, custom_ops.group_name(env.group)
        view = buf.maybe_get_tensor((cfg.batch, cfg.hidden), cfg.dtype)["tensor"]
        # the partial sums live in the buffer (zero-copy), or in a tensor when it is unavailable
        self.partial = view if view is not None else torch.empty(
            cfg.batch, cfg.hidden, dtype=cfg.dtype, device=env.device)
        self.out = torch.empty(cfg.batch, cfg.hidden, dtype=cfg.dtype, device=env.device)

    def all_gather_normed(self, residual, weight):
        torch.ops.symmtriton.all_gather_into_tensor(
            self.out, rmsnorm(residual, weight, self.cfg.eps), self.group_name)
        return self.out

    def row_parallel(self, x, w, residual, norm_weight):
        torch.matmul(x, w, out=self.partial)
        torch.ops.symmtriton.reduce_scatter_add_rmsnorm_all_gather(
            self.partial, residual, norm_weight, self.cfg.eps, self.group_name, self.out)
        return self.out


class TorchComm:
    """The same layer boundary through torch.distributed and torch ops."""

    name = "torch.distributed"

    def __init__(self, cfg: Config, env: _common.Env):
        self.cfg, self.group = cfg, env.group
        self.partial = torch.empty(cfg.batch, cfg.hidden, dtype=cfg.dtype, device=env.device)
        self.shard = torch.empty(cfg.batch // env.world_size, cfg.hidden, dtype=cfg.dtype,
                                 device=env.device)
        self.out = torch.empty_like(self.partial)

    def all_gather_normed(self, residual, weight):
        dist.all_gather_into_tensor(self.out, rmsnorm(residual, weight, self.cfg.eps),
                                    group=self.group)
        return self.out

    def row_parallel(self, x, w, residual, norm_weight):
        torch.matmul(x, w, out=self.partial)
        dist.reduce_scatter_tensor(self.shard, self.partial, group=self.group)
        residual.add_(self.shard)
        return self.all_gather_normed(residual, norm_weight)


class SymmtritonAllReduceComm(SymmtritonComm):
    """``--mode ar``: replicated residual; row-parallel matmul into the symmetric buffer, then
    the fused all-reduce + add + RMSNorm custom op."""

    name = "symmtriton all_reduce_add_rmsnorm"

    def all_gather_normed(self, residual, weight):
        return rmsnorm(residual, weight, self.cfg.eps)  # replicated: nothing to gather

    def row_parallel(self, x, w, residual, norm_weight):
        torch.matmul(x, w, out=self.partial)
        torch.ops.symmtriton.all_reduce_add_rmsnorm(
            self.partial, residual, norm_weight, self.cfg.eps, self.group_name, self.out)
        return self.out


class TorchAllReduceComm(TorchComm):
    """``--mode ar`` through torch.distributed: all_reduce, add, ``F.rms_norm``."""

    name = "torch.distributed all_reduce + add + rms_norm"

    def all_gather_normed(self, residual, weight):
        return F.rms_norm(residual, (self.cfg.hidden,), weight, self.cfg.eps)

    def row_parallel(self, x, w, residual, norm_weight):
        torch.matmul(x, w, out=self.partial)
        dist.all_reduce(self.partial, group=self.group)
        residual.add_(self.partial)
        return self.all_gather_normed(residual, norm_weight)


class GraphStep:
    """One decode step captured in a CUDA graph (after warm-up steps on a side stream, which
    compile the kernels and create the buffers); calling it replays the graph. It keeps the
    model and the comm alive: the graph reads and writes their tensors by address.
    ``_common.finish`` resets the graph before the process group goes: the torch.distributed
    step's graph holds NCCL's communicator."""

    def __init__(self, model: Model, comm):
        self.model, self.comm = model, comm
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.step(comm)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = _common.cuda_graph()  # reset by _common.finish
        with torch.cuda.graph(self.graph):
            self.out = model.step(comm)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


def make_step(model: Model, comm, use_graph: bool):
    """A function running one decode step: ``model.step`` itself or a :class:`GraphStep`."""
    return GraphStep(model, comm) if use_graph else (lambda: model.step(comm))


def check(env, model: Model, symm_step, torch_step, steps: int, dtype) -> float:
    """Decode ``steps`` tokens with symmtriton, then feed the same tokens to the
    torch.distributed model; the normed hidden states of every step must agree within
    :data:`TOLERANCE`. Returns their largest absolute difference and the bound it met."""
    model.reset()
    fed, hidden = [], []
    for _ in range(steps):
        fed.append(model.tokens.clone())
        hidden.append(symm_step().clone())
    model.reset()
    diff = scale = 0.0
    for tokens, expect in zip(fed, hidden):
        model.tokens.copy_(tokens)
        diff = max(diff, (torch_step().float() - expect.float()).abs().max().item())
        scale = max(scale, expect.float().abs().max().item())
    _common.synchronize(env)
    diff, scale = _common.max_over_ranks(env, diff), _common.max_over_ranks(env, scale)
    bound = TOLERANCE[dtype] * max(scale, 1.0)
    _common.all_ranks_agree(env, diff <= bound,
                            f"tp_decode: max abs diff {diff:.3g} > tolerance {bound:.3g}")
    return diff, bound


def config_from(args, env, p: argparse.ArgumentParser) -> Config:
    """The model shape from the flags (device-dependent defaults), validated."""
    hidden = _common.pick(args.hidden, env, 4096, 256)
    world = env.world_size
    cfg = Config(
        layers=_common.pick(args.layers, env, 4, 2), hidden=hidden,
        heads=_common.pick(args.heads, env, 32, 4),
        ffn=args.ffn if args.ffn is not None else -(-hidden * 8 // 3 // 256) * 256,
        vocab=_common.pick(args.vocab, env, 32000, 512),
        batch=_common.pick(args.batch, env, 8 * world, 2 * world),
        max_len=_common.pick(args.max_len, env, 256, 16), eps=args.eps,
        dtype=_common.dtype_of(args, env))
    for what, value, divisor in (("--batch", cfg.batch, world), ("--heads", cfg.heads, world),
                                 ("--ffn", cfg.ffn, world), ("--hidden", cfg.hidden, cfg.heads)):
        if value % divisor:
            p.error(f"{what} {value} must be divisible by {divisor}")
    return cfg


def main() -> None:
    p = _common.parser(__doc__.split("\n\n", 1)[0], iters=50, warmup=5)
    p.add_argument("--layers", type=_common.positive_int, help="transformer blocks (GPU 4, CPU 2)")
    p.add_argument("--hidden", type=_common.positive_int, help="hidden size (GPU 4096, CPU 256)")
    p.add_argument("--heads", type=_common.positive_int, help="attention heads (GPU 32, CPU 4)")
    p.add_argument("--ffn", type=_common.positive_int,
                   help="MLP width (default: 8/3 hidden, rounded up to 256)")
    p.add_argument("--vocab", type=_common.positive_int,
                   help="vocabulary size (GPU 32000, CPU 512)")
    p.add_argument("--batch", type=_common.positive_int,
                   help="sequences decoded together = tokens per step "
                        "(GPU 8 x world, CPU 2 x world)")
    p.add_argument("--max-len", type=_common.positive_int, help="KV cache length (GPU 256, CPU 16)")
    p.add_argument("--steps", type=_common.positive_int, default=8,
                   help="decode steps compared between the two paths (default %(default)s)")
    p.add_argument("--eps", type=float, default=1e-6, help="RMSNorm epsilon (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="weights and prompt seed (default %(default)s)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the decode steps eagerly on GPU")
    p.add_argument("--mode", choices=("sp", "ar"), default="sp",
                   help="sp: sequence-parallel residual, fused reduce-scatter + all-gather; ar: "
                        "replicated residual, fused all-reduce (default %(default)s)")
    args = p.parse_args()
    env = _common.init_distributed()
    cfg = config_from(args, env, p)

    model = Model(cfg, env, args.seed, sequence_parallel=args.mode == "sp")
    symm_cls, torch_cls = ((SymmtritonComm, TorchComm) if args.mode == "sp"
                           else (SymmtritonAllReduceComm, TorchAllReduceComm))
    symm = symm_cls(cfg, env, _common.buffer(env, args))
    graphs = env.on_gpu and not args.no_cuda_graphs
    torch_graph = graphs and env.dist_backend == "nccl"
    model.reset()
    symm_step = make_step(model, symm, graphs)
    torch_step = make_step(model, torch_cls(cfg, env), torch_graph)

    diff, bound = check(env, model, symm_step, torch_step, args.steps, cfg.dtype)
    model.reset()
    t_symm = _common.time_per_call(env, symm_step, args.iters, args.warmup)
    t_torch = _common.time_per_call(env, torch_step, args.iters, args.warmup)
    graph_note = {(True, True): "both",
                  (True, False): f"symmtriton only ({env.dist_backend} cannot be captured)",
                  (False, False): "off"}[(graphs, torch_graph)]
    _common.log(env, (
        f"tp_decode {env.describe()} layers={cfg.layers} hidden={cfg.hidden} heads={cfg.heads} "
        f"ffn={cfg.ffn} batch={cfg.batch} {str(cfg.dtype).removeprefix('torch.')} "
        f"cuda_graphs={graph_note} "
        f"mode={args.mode}\n"
        f"  per-token latency (one decode step): {symm_cls.name} {_common.us(t_symm)}, "
        f"{torch_cls.name} {_common.us(t_torch)}\n"
        f"{_common.versus_baseline(env, {symm_cls.name: t_symm}, t_torch)}\n"
        f"  max abs diff of the normed hidden states over {args.steps} steps: {diff:.3g} "
        f"(tolerance {bound:.3g}): outputs match"))
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
