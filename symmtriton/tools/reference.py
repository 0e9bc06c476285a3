"""Pure-torch references of every collective, computed from all ranks' inputs (tests, bench)."""

from __future__ import annotations

import torch


def all_gather(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenation along dim 0 in rank order."""
    return torch.cat(inputs, dim=0)


def reduce_scatter(inputs: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Slice ``rank`` (dim 0) of the fp64 sum of ``inputs``, cast back to their dtype."""
    total = torch.stack([t.double() for t in inputs]).sum(0)
    return total.chunk(len(inputs), dim=0)[rank].to(inputs[0].dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics: ``x / sqrt(mean(x^2) + eps) * weight``, in x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def reduce_scatter_add_rmsnorm(inputs: list[torch.Tensor], residual: torch.Tensor,
                               weight: torch.Tensor, eps: float, rank: int):
    """(normed shard, updated residual) of rank ``rank``: residual + reduced shard, rounded to
    the residual's dtype, then RMSNorm."""
    total = torch.stack([t.float() for t in inputs]).sum(0).chunk(len(inputs), dim=0)[rank]
    new_residual = (residual.float() + total).to(residual.dtype)
    return rmsnorm(new_residual, weight, eps), new_residual


def all_reduce(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The fp64 sum of ``inputs``, cast back to their dtype."""
    return torch.stack([t.double() for t in inputs]).sum(0).to(inputs[0].dtype)


def all_reduce_add_rmsnorm(inputs: list[torch.Tensor], residual: torch.Tensor,
                           weight: torch.Tensor, eps: float):
    """(normed rows, updated residual): residual + the fp32 sum of ``inputs``, rounded to the
    residual's dtype, then RMSNorm."""
    total = torch.stack([t.float() for t in inputs]).sum(0)
    new_residual = (residual.float() + total).to(residual.dtype)
    return rmsnorm(new_residual, weight, eps), new_residual


def all_gather_v(inputs: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Rank ``r``'s first ``counts[r]`` rows of ``inputs[r]``, concatenated in rank order."""
    return torch.cat([t[:c] for t, c in zip(inputs, counts)], dim=0)


def reduce_scatter_v(inputs: list[torch.Tensor], counts: list[int], rank: int) -> torch.Tensor:
    """Rows ``sum(counts[:rank]) .. + counts[rank]`` of the fp64 sum of ``inputs`` (each with
    ``sum(counts)`` valid rows), cast back to their dtype."""
    start = sum(counts[:rank])
    total = torch.stack([t[:sum(counts)].double() for t in inputs]).sum(0)
    return total[start:start + counts[rank]].to(inputs[0].dtype)


def moe_rows(topk_idxs: list[torch.Tensor], num_experts: int, max_tokens: int) -> dict:
    """Where ``moe_dispatch`` puts every (source rank, token, expert) pair: ``{(r, t, e): (d, j,
    i)}``, row ``i`` of local expert ``j`` on rank ``d`` (``d = e // (E / W)``), rows of each
    expert packed in the order (source rank, token index). ``topk_idxs``: every rank's
    ``[T_r, K]``; -1 is an unused slot; an expert named twice by a token is one pair."""
    world = len(topk_idxs)
    local = num_experts // world
    filled = [[0] * local for _ in range(world)]
    rows = {}
    for r, idx in enumerate(topk_idxs):
        for t, experts in enumerate(idx.tolist()):
            for e in dict.fromkeys(e for e in experts if e >= 0):
                d, j = divmod(e, local)
                rows[(r, t, e)] = (d, j, filled[d][j])
                filled[d][j] += 1
    return rows


def moe_dispatch(xs: list[torch.Tensor], topk_idxs: list[torch.Tensor], num_experts: int,
                 max_tokens: int, rank: int):
    """``(recv_x [E/W, W * max_tokens, H], recv_counts [E/W])`` of rank ``rank``: the tokens
    routed to each of its experts, packed from row 0 (see :func:`moe_rows`); rows past the
    counts are 0."""
    local = num_experts // len(xs)
    recv = xs[0].new_zeros((local, len(xs) * max_tokens, xs[0].shape[1]))
    counts = torch.zeros(local, dtype=torch.int32)
    for (r, t, _), (d, j, i) in moe_rows(topk_idxs, num_experts, max_tokens).items():
        if d == rank:
            recv[j, i] = xs[r][t]
            counts[j] += 1
    return recv, counts


def quantise_groups(x: torch.Tensor, group: int = 128,
                    out_dtype: torch.dtype = torch.float8_e4m3fn):
    """``x`` ``[T, H]`` quantised per token and group of ``group`` channels (the last group
    shorter), one group at a time: ``(q [T, H] out_dtype, scales fp32 [T, ceil(H / group)])``,
    ``scale = amax(|x[t, group]|) / max`` (1 for a group of zeros), ``q = clamp(x / scale,
    -max, max)`` cast (``max``: :data:`FP8_MAX`)."""
    q_max = FP8_MAX[out_dtype]
    T, H = x.shape
    q = torch.zeros((T, H), dtype=out_dtype)
    scales = torch.zeros((T, -(-H // group)), dtype=torch.float32)
    for g, start in enumerate(range(0, H, group)):
        part = x[:, start:start + group].float().cpu()
        amax = part.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / q_max, torch.ones_like(amax))
        q[:, start:start + group] = (part / scale).clamp(-q_max, q_max).to(out_dtype)
        scales[:, g] = scale[:, 0]
    return q, scales


def moe_dispatch_fp8(xs: list[torch.Tensor], topk_idxs: list[torch.Tensor], num_experts: int,
                     max_tokens: int, rank: int):
    """``moe_dispatch(use_fp8=True)`` of rank ``rank``: ``(recv_x, recv_scales, recv_counts)``,
    every rank's tokens quantised by :func:`quantise_groups` and routed as by
    :func:`moe_dispatch` (``recv_x`` ``float8_e4m3fn``; rows past the counts are 0)."""
    quantised = [quantise_groups(x) for x in xs]
    recv, counts = moe_dispatch([q.view(torch.uint8) for q, _ in quantised], topk_idxs,
                                num_experts, max_tokens, rank)
    scales, _ = moe_dispatch([s for _, s in quantised], topk_idxs, num_experts, max_tokens, rank)
    return recv.view(torch.float8_e4m3fn), scales, counts


def moe_combine(expert_outs: list[torch.Tensor], topk_idxs: list[torch.Tensor],
                topk_weights: list[torch.Tensor], num_experts: int, max_tokens: int,
                rank: int) -> torch.Tensor:
    """``y [T, H]`` of rank ``rank``: for each token the sum, over the ranks ``d`` owning one of
    its experts in rank order, of ``d``'s partial ``sum_k w[t, k] * expert_outs[d][row]`` over
    the slots whose expert ``d`` owns (in slot order), all in fp32, cast to the rows' dtype;
    zeros for a token without experts. ``expert_outs``: every rank's ``[E/W, W * max_tokens,
    H]``."""
    rows = moe_rows(topk_idxs, num_experts, max_tokens)
    idx, w = topk_idxs[rank].tolist(), topk_weights[rank].float()
    y = torch.zeros(len(idx), expert_outs[0].shape[2], dtype=torch.float32)
    for t, experts in enumerate(idx):
        partials = {}
        for k, e in enumerate(experts):
            if e >= 0:
                d, j, i = rows[(rank, t, e)]
                row = expert_outs[d][j, i].float()
                partials[d] = partials.get(d, torch.zeros_like(row)) + w[t, k] * row
        for d in sorted(partials):
            y[t] += partials[d]
    return y.to(expert_outs[0].dtype)


#: the largest finite value of each FP8 dtype.
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantise(y: torch.Tensor, out_dtype: torch.dtype, scale: torch.Tensor | None = None):
    """``y`` (normed rows) in ``out_dtype`` (FP8): ``(y / scale).clamp(-max, max)`` cast, with
    the static ``scale``; else per row, ``scales = amax(|y|) / max`` (1 for a row of zeros), and
    ``(out, scales)`` returned, ``scales`` [rows, 1] fp32."""
    q_max = FP8_MAX[out_dtype]
    yf = y.float()
    if scale is not None:
        return (yf / scale.float()).clamp(-q_max, q_max).to(out_dtype)
    amax = yf.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(amax > 0, amax / q_max, torch.ones_like(amax))
    return (yf / scales).clamp(-q_max, q_max).to(out_dtype), scales
