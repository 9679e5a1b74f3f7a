"""``BatchRenormFunction``: training-mode batch renormalization as a custom autograd Function.

Batch renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275) normalizes with the batch
statistics and then corrects towards the running ones, per channel:

    y = weight * ((x - mean_B) / sigma_B * r + d) + bias,
    r = clamp(sigma_B / sigma, 1/rmax, rmax),  d = clamp((mean_B - running_mean) / sigma, -dmax, dmax)

with sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps) (the running statistics before
this batch's update), and r and d constants for the gradient. The math is
:func:`torch_bn.ops.renorm_factors` and :func:`torch_bn.ops.renorm_backward` (derived in
docs/derivation.md); the layers and the functional form are ``torch_bn.BatchRenorm1d/2d/3d`` and
:func:`torch_bn.functional.batch_renorm`.

A sibling of :class:`~torch_bn.function.BatchNormFunction`, not a mode of it: it takes the
running statistics and the clipping bounds as inputs and has its own backward (parameter
gradients through r and d), so it is its own autograd node; it lives in its own file, beside
function.py, because it shares none of that file's path choice. Its bodies are the readable
reference ops of :mod:`torch_bn.ops` on every device (it has no compiled or Triton body).
The ``forward`` + ``setup_context`` style composes with torch.func (``generate_vmap_rule``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .eager import eager_twin
from .function import needed_gradients, save_context


class BatchRenormFunction(torch.autograd.Function):
    """y, mean, var, r, d = BatchRenormFunction.apply(x, weight, bias, running_mean, running_var, eps, rmax, dmax)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; running_mean, running_var (C,)
    (read, not written, not differentiated); eps, rmax >= 1, dmax >= 0 (floats).
    Outputs: y like x; the batch mean and biased variance (for the running-statistics update)
    and the corrections r and d, (C,) in compute dtype, not differentiable. Saves x, weight,
    mean, var, r and d.
    Backward and forward AD treat r and d as constants (ops.renorm_backward); the backward is
    built from differentiable ops when autograd records it (double backward).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                running_var: Tensor, eps: float, rmax: float, dmax: float
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        mean, var = ops.batch_stats(x)
        r, d = ops.renorm_factors(mean, var, running_mean, running_var, eps, rmax, dmax)
        scale, shift = ops.renorm_affine(weight, bias, r, d)
        return ops.normalize(x, mean, torch.rsqrt(var + eps), scale, shift), mean, var, r, d

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, running_mean, running_var, eps, rmax, dmax = inputs
        _y, mean, var, r, d = output
        save_context(ctx, (x, weight, mean, var, r, d), (mean, var, r, d), eps, bias)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _rm, _rv, _eps, _rmax, _dmax):
        x, weight, mean, var, r, d = ctx.saved_tensors
        # y = (weight * r) * xhat + (weight * d + bias): batch norm's tangent with that affine map.
        scale, _ = ops.renorm_affine(weight, None, r, d)
        dscale = None if dweight is None else dweight * r
        dshift = dbias if dweight is None else (dweight * d if dbias is None else dweight * d + dbias)
        dy = ops.training_jvp(dx, dscale, dshift, x, mean, torch.rsqrt(var + ctx.eps), scale)
        return dy, None, None, None, None

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar, _dr, _dd):
        x, weight, mean, var, r, d = ctx.saved_tensors
        if dy is None:
            return (None,) * 8
        if torch.is_grad_enabled():  # double backward: the statistics as functions of x
            mean, var = ops.batch_stats(x)
        rstd = torch.rsqrt(var + ctx.eps)
        xhat = (x - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
        dx, dweight, dbias = ops.renorm_backward(dy, xhat, rstd, weight, r, d)
        return (*needed_gradients(ctx, dx, dweight, dbias, weight), None, None, None, None, None)


BatchRenormFunction.eager = eager_twin(BatchRenormFunction)  # the same Function, applied faster outside torch.func (torch_bn.eager)
