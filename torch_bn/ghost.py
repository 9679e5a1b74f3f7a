"""``GhostBatchNormFunction``: training-mode ghost batch norm as a custom autograd Function.

Ghost batch norm (Hoffer et al., NeurIPS 2017, arXiv 1705.08741) splits the batch into
consecutive chunks of ``virtual_batch_size`` samples along dim 0 (the last may be smaller) and
normalizes each chunk with its own mean and biased variance: the regularizing noise of a small
batch, at the throughput of a large one. The math is the closed form of batch norm applied per
chunk, :func:`torch_bn.ops.chunk_forward` / :func:`~torch_bn.ops.chunk_backward` (docs/derivation.md),
in one call over a (G, V, C, S) view of the batch (two where N is not a multiple of V), never a
Python loop over chunks. The layers are ``torch_bn.GhostBatchNorm1d/2d/3d``; the functional form is
``torch_bn.functional.batch_norm(..., virtual_batch_size=V)``.

On CPU, where :func:`torch_bn.dispatch.choose_path` picks the compiled op, the bodies are one
call each of the compiled ghost ops of :mod:`torch_bn.cpp` (``ghost_forward`` / ``ghost_backward``):
plain batch norm's loops run on each chunk in place, since a chunk of a contiguous or
channels-last batch is one block of memory. Everywhere else (the reference switch, double
backward, torch.func transforms, torch.compile, CUDA, no compiled op) the bodies are the reference
ops, so ``torch_bn.use_path("reference")`` runs them and an edit there takes effect.

A sibling of :class:`~torch_bn.function.BatchNormFunction`: its statistics are per chunk, so it
returns and saves (G, C) statistics and takes the chunk size; it lives in its own file because
its bodies are its own (ghost batch norm has no fused or Triton body).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import cpp, dispatch, ops
from .eager import eager_twin
from .function import needed_gradients, save_context


def _unchunk(pieces: list[Tensor], like: Tensor) -> Tensor:
    """The chunk views' results (G, V, C, S) as one tensor shaped like ``like`` (N, C, *)."""
    if len(pieces) == 1:
        return pieces[0].reshape(like.shape)
    flat = [p.reshape(p.shape[0] * p.shape[1], p.shape[2], p.shape[3]) for p in pieces]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)).view(like.shape)


def _normalized_chunks(x: Tensor, mean: Tensor, rstd: Tensor, virtual_batch_size: int
                       ) -> list[tuple[Tensor, Tensor]]:
    """xhat and rstd (G, 1, C, 1) of each chunk view of x, from the statistics (chunks, C)."""
    out, start = [], 0
    for xg in ops.ghost_chunks(x, virtual_batch_size):
        g, c = xg.shape[0], xg.shape[2]
        rstd_g = rstd[start:start + g].view(g, 1, c, 1)
        out.append(((xg - mean[start:start + g].view(g, 1, c, 1)) * rstd_g, rstd_g))
        start += g
    return out


class GhostBatchNormFunction(torch.autograd.Function):
    """y, means, variances, rstds = GhostBatchNormFunction.apply(x, weight, bias, eps, virtual_batch_size)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float);
    virtual_batch_size (int >= 2; chunks of one sample are refused by the callers).
    Outputs: y like x; every chunk's mean, biased variance and rstd = 1 / sqrt(var + eps),
    (number of chunks, C) in compute dtype, not differentiable (callers average the means and
    variances into the running statistics).
    Saves x, weight and the per-chunk mean and rstd; the backward is the closed form per chunk,
    built from differentiable ops when autograd records it (double backward). Bodies: the
    compiled ghost ops where :func:`~torch_bn.dispatch.choose_path` says "cpp", else the
    reference ops of :mod:`torch_bn.ops` (ghost batch norm has no fused or Triton body).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                virtual_batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if dispatch.choose_path(x) == "cpp":
            return tuple(cpp.op().ghost_forward(x, weight, bias, virtual_batch_size, eps))
        c = x.shape[1]
        pieces = [ops.chunk_forward(xg, weight, bias, eps)  # one view, or two with a smaller last chunk
                  for xg in ops.ghost_chunks(x, virtual_batch_size)]
        if len(pieces) == 1:
            y, mean, var, rstd = pieces[0]
            return y.view(x.shape), mean.view(-1, c), var.view(-1, c), rstd.view(-1, c)
        return (_unchunk([p[0] for p in pieces], x),
                *(torch.cat([p[i].view(-1, c) for p in pieces]) for i in (1, 2, 3)))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps, virtual_batch_size = inputs
        _y, mean, var, rstd = output
        save_context(ctx, (x, weight, mean, rstd), (mean, var, rstd), eps, bias)
        ctx.virtual_batch_size = virtual_batch_size
        ctx.path = dispatch.choose_path(x)  # what forward ran on: the backward takes the same path

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _eps, _virtual_batch_size):
        x, weight, mean, rstd = ctx.saved_tensors
        dxs = ops.ghost_chunks(dx, ctx.virtual_batch_size) if dx is not None else None
        dys = [ops.chunk_jvp(None if dxs is None else dxs[i], dweight, dbias, xhat, rstd, weight)
               for i, (xhat, rstd) in enumerate(_normalized_chunks(x, mean, rstd, ctx.virtual_batch_size))]
        return _unchunk(dys, x).to(x.dtype), None, None, None

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None
        double_backward = torch.is_grad_enabled()
        if dispatch.backward_path(ctx.path, staged=False, double_backward=double_backward) == "cpp":
            dx, dweight, dbias = cpp.op().ghost_backward(dy, x, weight, mean, rstd, ctx.virtual_batch_size,
                                                         ctx.needs_input_grad[0])
            return (*needed_gradients(ctx, dx, dweight, dbias, weight), None, None)
        if double_backward:  # the statistics as functions of x
            stats = [ops.chunk_stats(xg) for xg in ops.ghost_chunks(x, ctx.virtual_batch_size)]
            mean = torch.cat([m.view(-1, x.shape[1]) for m, _ in stats])
            rstd = torch.rsqrt(torch.cat([v.view(-1, x.shape[1]) for _, v in stats]) + ctx.eps)
        dys = ops.ghost_chunks(dy, ctx.virtual_batch_size)
        dxs, dweight, dbias = [], 0, 0
        for i, (xhat, rstd) in enumerate(_normalized_chunks(x, mean, rstd, ctx.virtual_batch_size)):
            dxg, dw, db = ops.chunk_backward(dys[i], xhat, rstd, weight)
            dxs.append(dxg)
            dweight, dbias = dweight + dw, dbias + db
        return (*needed_gradients(ctx, _unchunk(dxs, x), dweight, dbias, weight), None, None)


GhostBatchNormFunction.eager = eager_twin(GhostBatchNormFunction)  # the same Function, applied faster outside torch.func (torch_bn.eager)
