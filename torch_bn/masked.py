"""``MaskedBatchNormFunction``: training-mode batch norm with statistics over masked positions.

For padded batches (sequences of different lengths, images with invalid pixels): a bool mask
shaped like the input without dim 1 says which positions count. Mean and biased variance per
channel are taken over the True positions only, and every position's output is normalized with
them (as Keras and Flax do); the gradients are the exact derivatives of that function, so a
masked-out position receives gradient through its own output only, never through the
statistics. The math is :func:`torch_bn.ops.masked_batch_stats`, :func:`~torch_bn.ops.masked_backward`
and :func:`~torch_bn.ops.masked_jvp` (docs/derivation.md). The functional form is the ``mask=``
keyword of :func:`torch_bn.functional.batch_norm`; the layers take ``forward(input, mask=None)``.

A sibling of :class:`~torch_bn.function.BatchNormFunction`: it takes the mask as an input and
saves the count, so it is its own autograd node; it lives in its own file because it shares none
of function.py's path choice (its bodies are the reference ops on every device). ``mask=None``
never reaches it: that is batch norm's own path, unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .eager import eager_twin
from .function import needed_gradients, save_context


class MaskedBatchNormFunction(torch.autograd.Function):
    """y, mean, var, count = MaskedBatchNormFunction.apply(x, weight, bias, mask, eps)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; mask (N, *) bool; eps (float).
    Outputs: y like x; the mean and biased variance (C,) over the True positions and their count
    (0-d), in compute dtype, not differentiable (for the running statistics).
    Saves x, weight, mask, mean, var and count; the backward is built from differentiable ops
    when autograd records it (double backward).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        count, mean, var = ops.masked_batch_stats(x, mask)
        return ops.normalize(x, mean, torch.rsqrt(var + eps), weight, bias), mean, var, count

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, mask, eps = inputs
        _y, mean, var, count = output
        save_context(ctx, (x, weight, mask, mean, var, count), (mean, var, count), eps, bias)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _mask, _eps):
        x, weight, mask, mean, var, count = ctx.saved_tensors
        rstd = torch.rsqrt(var + ctx.eps)
        xhat = (x.to(mean.dtype) - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
        dy = ops.masked_jvp(dx, dweight, dbias, xhat, rstd, weight, mask, count)
        return dy.to(x.dtype), None, None, None

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar, _dcount):
        x, weight, mask, mean, var, count = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # double backward: the statistics as functions of x
            count, mean, var = ops.masked_batch_stats(x, mask)
        rstd = torch.rsqrt(var + ctx.eps)
        xhat = (x - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
        dx, dweight, dbias = ops.masked_backward(dy, xhat, rstd, weight, mask, count)
        return (*needed_gradients(ctx, dx, dweight, dbias, weight), None, None)


MaskedBatchNormFunction.eager = eager_twin(MaskedBatchNormFunction)  # the same Function, applied faster outside torch.func (torch_bn.eager)
