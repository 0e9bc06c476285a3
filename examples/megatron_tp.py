"""Megatron-Core's tensor-parallel inference collectives on symmtriton: one install() call.

    torchrun --nproc-per-node=4 examples/megatron_tp.py                 # 4 GPUs
    SYMMTRITON_BACKEND=host torchrun --nproc-per-node=2 examples/megatron_tp.py --steps 2

Megatron's parallel_state builds the tensor-parallel group (all ranks) and, after
``symmtriton.integrations.megatron.install()``, its global symmetric buffer is symmtriton's
(``parallel_state._set_global_symmetric_memory_buffer``). A stack of sequence-parallel MLP
blocks then decodes through Megatron's own function names, called the way Megatron's inference
layers (``InferenceLayerNormColumnParallelLinear``, ``InferenceRowParallelLinear``) call them:

    first block:  RMSNorm of this rank's rows, multimem_all_gather into the symmetric buffer
    each block:   column-parallel matmul of the gathered rows, GELU, row-parallel matmul
                  written into the symmetric buffer (its partial sums)
    between:      fused_multimem_rs_add_norm_ag (reduce-scatter + residual add + RMSNorm of the
                  next block + all-gather, the gathered rows landing in the buffer in place)
    last block:   multimem_reduce_scatter, residual add

Megatron's own kernels need NVLink multicast and bf16; these run on any GPUs, in any dtype the
reductions take, and on the CPU. The same model runs on torch.distributed collectives; rank 0
prints the time per decode step of both and checks that the residual streams match (bf16
tolerance on GPU, fp32 on CPU). Needs megatron-core (``pip install megatron-core``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import _common
from symmtriton.integrations import megatron as smg
from symmtriton.tools.reference import rmsnorm

#: largest allowed |symmtriton - torch.distributed| of the residual stream, as a fraction of its
#: largest magnitude, by dtype (the fused op adds the residual in fp32, torch in the dtype).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
EPS = 1e-5


def weights(args, env, dtype):
    """Per block: RMSNorm weight [H], column-parallel shard [F/W, H], row-parallel shard
    [H, F/W] (this rank's)."""
    H, Fl = args.hidden, args.ffn // env.world_size
    g = torch.Generator().manual_seed(1234 + env.rank)
    blocks = []
    for _ in range(args.layers):
        norm = 1 + 0.1 * torch.randn(H, generator=torch.Generator().manual_seed(len(blocks)))
        w1 = torch.randn(Fl, H, generator=g) * H ** -0.5
        w2 = torch.randn(H, Fl, generator=g) * args.ffn ** -0.5
        blocks.append(tuple(t.to(dtype).to(env.device) for t in (norm, w1, w2)))
    return blocks


def step_megatron(tsm, buf, blocks, residual, world):
    """One decode step through Megatron's names; ``residual`` [s, H] updated in place."""
    s, H = residual.shape
    S = world * s
    sym = buf.maybe_get_tensor([S, H], dtype=residual.dtype)
    gathered = tsm.multimem_all_gather(sym["tensor"], rmsnorm(residual, blocks[0][0], EPS),
                                       sym["handle"])
    for i, (_, w1, w2) in enumerate(blocks):
        act = F.gelu(gathered @ w1.t())  # a new tensor: the buffer may be written now
        sym = buf.maybe_get_tensor([S, H], dtype=residual.dtype)
        torch.matmul(act, w2.t(), out=sym["tensor"])
        if i + 1 < len(blocks):
            tsm.fused_multimem_rs_add_norm_ag(residual, sym["tensor"], sym["handle"], residual,
                                              blocks[i + 1][0], EPS)
            gathered = sym["tensor"]  # the next block's normed, gathered rows
        else:
            shard = torch.empty_like(residual)
            tsm.multimem_reduce_scatter(shard, sym["tensor"], sym["handle"])
            residual += shard
    return residual


def step_torch(blocks, residual, world, group):
    """The same step on torch.distributed collectives."""
    s, H = residual.shape
    gathered = torch.empty(world * s, H, dtype=residual.dtype, device=residual.device)
    dist.all_gather_into_tensor(gathered, rmsnorm(residual, blocks[0][0], EPS), group=group)
    for i, (_, w1, w2) in enumerate(blocks):
        partial = F.gelu(gathered @ w1.t()) @ w2.t()
        shard = torch.empty_like(residual)
        dist.reduce_scatter_tensor(shard, partial, group=group)
        residual += shard
        if i + 1 < len(blocks):
            gathered = torch.empty_like(partial)
            dist.all_gather_into_tensor(gathered, rmsnorm(residual, blocks[i + 1][0], EPS),
                                        group=group)
    return residual


def main() -> None:
    p = _common.parser(__doc__.split("\n", 1)[0], iters=10, warmup=2)
    p.add_argument("--layers", type=_common.positive_int, default=2, help="blocks (default 2)")
    p.add_argument("--hidden", type=_common.positive_int, default=None,
                   help="hidden size (default 4096 on GPU, 64 on CPU)")
    p.add_argument("--ffn", type=_common.positive_int, default=None,
                   help="MLP width, divisible by the world size (default 4 x hidden)")
    p.add_argument("--tokens", type=_common.positive_int, default=None,
                   help="tokens per rank per step (default 8 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=_common.positive_int, default=3,
                   help="decode steps checked (default %(default)s)")
    args = p.parse_args()
    try:
        with warnings.catch_warnings():  # Megatron warns when Transformer Engine, Apex are absent
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state
            from megatron.core.inference.communication import torch_symm_triton as tsm
    except ImportError as exc:
        p.error(f"needs megatron-core (pip install megatron-core): {exc}")
    env = _common.init_distributed()
    dtype = _common.dtype_of(args, env)
    args.hidden = _common.pick(args.hidden, env, 4096, 64)
    args.ffn = args.ffn or 4 * args.hidden
    if args.ffn % env.world_size:
        p.error(f"--ffn {args.ffn} must be divisible by the world size {env.world_size}")
    s = _common.pick(args.tokens, env, 8, 2)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=env.world_size)
    smg.install()  # before Megatron makes its global symmetric buffer
    parallel_state._set_global_symmetric_memory_buffer()
    buf = parallel_state.get_global_symmetric_memory_buffer()
    tp = parallel_state.get_tensor_model_parallel_group()
    blocks = weights(args, env, dtype)
    g = torch.Generator().manual_seed(99 + env.rank)
    start = torch.randn(s, args.hidden, generator=g).to(dtype).to(env.device)

    ours, theirs, worst = start.clone(), start.clone(), 0.0
    for _ in range(args.steps):
        step_megatron(tsm, buf, blocks, ours, env.world_size)
        step_torch(blocks, theirs, env.world_size, tp)
        _common.synchronize(env)
        scale = theirs.abs().max().clamp_min(1e-6)
        worst = max(worst, float((ours.float() - theirs.float()).abs().max() / scale))
    _common.all_ranks_agree(env, worst <= TOLERANCE[dtype], "residual stream")
    worst = _common.max_over_ranks(env, worst)

    t_ours = _common.time_per_call(
        env, lambda: step_megatron(tsm, buf, blocks, start.clone(), env.world_size),
        args.iters, args.warmup)
    t_torch = _common.time_per_call(
        env, lambda: step_torch(blocks, start.clone(), env.world_size, tp),
        args.iters, args.warmup)
    _common.log(env, f"megatron_tp {env.describe()} layers={args.layers} hidden={args.hidden} "
                     f"tokens/rank={s} {str(dtype).removeprefix('torch.')}: Megatron's names on "
                     f"symmtriton {_common.us(t_ours)} per step, torch.distributed "
                     f"{_common.us(t_torch)}; outputs match (max rel diff {worst:.1e})\n"
                     f"{_common.versus_baseline(env, {'symmtriton': t_ours}, t_torch)}")
    smg.uninstall()
    parallel_state.destroy_model_parallel()
    _common.finish(env)


if __name__ == "__main__":
    _common.main_guard(main)
