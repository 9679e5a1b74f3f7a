"""``GhostBatchNormFunction``: training-mode ghost batch norm as a custom autograd Function.

Ghost batch norm (Hoffer et al., NeurIPS 2017, arXiv 1705.08741) splits the batch into
consecutive chunks of ``virtual_batch_size`` samples along dim 0 (the last may be smaller) and
normalizes each chunk with its own mean and biased variance: the regularizing noise of a small
batch, at the throughput of a large one. The math is the closed form of batch norm applied per
chunk, :func:`torch_bn.ops.chunk_stats` / :func:`~torch_bn.ops.chunk_backward` (docs/derivation.md),
in one call over a (G, V, C, S) view of the batch (two where N is not a multiple of V), never a
Python loop over chunks. The layers are ``torch_bn.GhostBatchNorm1d/2d/3d``; the functional form is
``torch_bn.functional.batch_norm(..., virtual_batch_size=V)``.

A sibling of :class:`~torch_bn.function.BatchNormFunction`: its statistics are per chunk, so it
returns and saves (G, C) statistics and takes the chunk size; it lives in its own file because
it shares none of function.py's path choice (its bodies are the reference ops on every device).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops


def _unchunk(pieces: list[Tensor], like: Tensor) -> Tensor:
    """The chunk views' results (G, V, C, S) as one tensor shaped like ``like`` (N, C, *)."""
    flat = [p.reshape(p.shape[0] * p.shape[1], p.shape[2], p.shape[3]) for p in pieces]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)).view(like.shape)


class GhostBatchNormFunction(torch.autograd.Function):
    """y, means, variances = GhostBatchNormFunction.apply(x, weight, bias, eps, virtual_batch_size)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float);
    virtual_batch_size (int >= 2; chunks of one sample are refused by the callers).
    Outputs: y like x; every chunk's mean and biased variance, (number of chunks, C) in compute
    dtype, not differentiable (callers average them into the running statistics).
    Saves x, weight and the per-chunk statistics; the backward is the closed form per chunk,
    built from differentiable ops when autograd records it (double backward).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                virtual_batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        ys, means, variances = [], [], []
        for xg in ops.ghost_chunks(x, virtual_batch_size):  # one view, or two with a smaller last chunk
            mean, var = ops.chunk_stats(xg)
            ys.append(ops.chunk_normalize(xg, mean, torch.rsqrt(var + eps), weight, bias))
            means.append(mean)
            variances.append(var)
        return _unchunk(ys, x), torch.cat(means), torch.cat(variances)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps, virtual_batch_size = inputs
        _y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps, ctx.virtual_batch_size = eps, virtual_batch_size
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def _chunks(ctx, x: Tensor, mean: Tensor, var: Tensor):
        """Each chunk view of x with its xhat and rstd (G, C)."""
        start = 0
        for xg in ops.ghost_chunks(x, ctx.virtual_batch_size):
            g = xg.shape[0]
            rstd = torch.rsqrt(var[start:start + g] + ctx.eps)
            xhat = (xg.to(mean.dtype) - ops.per_chunk(mean[start:start + g])) * ops.per_chunk(rstd)
            start += g
            yield xg, xhat, rstd

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _eps, _virtual_batch_size):
        x, weight, mean, var = ctx.saved_tensors
        dxs = ops.ghost_chunks(dx, ctx.virtual_batch_size) if dx is not None else None
        dys = [ops.chunk_jvp(None if dxs is None else dxs[i], dweight, dbias, xhat, rstd, weight)
               for i, (_xg, xhat, rstd) in enumerate(GhostBatchNormFunction._chunks(ctx, x, mean, var))]
        return _unchunk(dys, x).to(x.dtype), None, None

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # double backward: the statistics as functions of x
            stats = [ops.chunk_stats(xg) for xg in ops.ghost_chunks(x, ctx.virtual_batch_size)]
            mean, var = torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats])
        dys = ops.ghost_chunks(dy, ctx.virtual_batch_size)
        dxs, dweight, dbias = [], 0, 0
        for i, (_xg, xhat, rstd) in enumerate(GhostBatchNormFunction._chunks(ctx, x, mean, var)):
            dxg, dw, db = ops.chunk_backward(dys[i], xhat, rstd, weight)
            dxs.append(dxg)
            dweight, dbias = dweight + dw, dbias + db
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (_unchunk(dxs, x) if need_x else None, dweight.to(weight.dtype) if need_w else None,
                dbias.to(ctx.bias_dtype) if need_b else None, None, None)
