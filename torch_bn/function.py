"""``BatchNormFunction``: training-mode batch norm as a custom autograd Function.

Forward and backward are the hand-written math of :mod:`torch_bn.ops`. The Function uses
the ``forward`` + ``setup_context`` style so that it composes with torch.func transforms
(``generate_vmap_rule``) and ``torch.compile``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops


class BatchNormFunction(torch.autograd.Function):
    """y, mean, var = BatchNormFunction.apply(x, weight, bias, eps, backward)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float);
    backward: "closed_form" (default formula) or "staged" (node-by-node).
    Outputs: y like x; the batch mean and biased variance (C,) in compute dtype, which
    are not differentiable (they are returned so callers can update running statistics).
    Saves for backward: x, weight and the per-channel mean and var (nothing of size x
    beyond the input itself).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                backward: str = "closed_form") -> tuple[Tensor, Tensor, Tensor]:
        mean, var = ops.batch_stats(x)
        y = ops.normalize(x, mean, torch.rsqrt(var + eps), weight, bias)
        return y, mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, eps, backward = inputs
        _y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.backward_fn = ops.closed_form_backward if backward == "closed_form" else ops.staged_backward

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):
        x, weight, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: the statistics are functions of x, so recompute them with
            # differentiable ops instead of using the forward's constants.
            mean, var = ops.batch_stats(x)
        dx, dweight, dbias = ctx.backward_fn(dy, x, mean, torch.rsqrt(var + ctx.eps), weight)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dweight.to(weight.dtype) if need_w else None,
            dbias.to(dbias.dtype if weight is None else weight.dtype) if need_b else None,
            None,
            None,
        )
