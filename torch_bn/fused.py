"""Fast eager paths: the math of :mod:`torch_bn.ops` with fewer trips through main memory.

Same results as the reference ops (tested equal), but not differentiable: they run where
autograd is not recording, inside BatchNormFunction. The trick, in plain tensor ops: work
on cache-sized slabs of rows, so that x - mean, its square, or dy * xhat live in a small
reused buffer (or in the output's own slab) instead of full-size temporaries that must be
allocated, page-faulted and streamed through memory twice. Like PyTorch's own kernel, only x
and per-channel vectors are kept for backward. Slabs split dim 0 only, so any (N, C, *)
input and any strides work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops import as_channel, compute_dtype, reduce_dims

SLAB_ELEMENTS = 1 << 18  # 1 MiB of float32: stays in cache between the two uses of a slab


def _slabs(x: Tensor) -> list[slice]:
    rows = max(1, SLAB_ELEMENTS // max(x[0].numel(), 1))
    return [slice(i, min(i + rows, x.shape[0])) for i in range(0, x.shape[0], rows)]


def _buffer(buf: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Scratch shaped like ``like`` in ``dtype``, reusing ``buf`` when it fits (the last slab may be short)."""
    if buf is not None and buf.shape == like.shape:
        return buf
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: returns y (like x), mean and biased var (C,, compute dtype).

    Memory traffic: read x (sum); read x (sum of squared deviations, from a slab buffer);
    read x, write y (each slab of y is x - mean, then scaled and shifted in place).
    """
    dtype = compute_dtype(x)
    dims, m = reduce_dims(x), x.numel() // x.shape[1]
    mean = x.sum(dims, dtype=dtype) / m
    mean_c = as_channel(mean, x)
    sumsq = torch.zeros_like(mean)
    buf = None
    for rows in _slabs(x):
        buf = torch.sub(x[rows], mean_c, out=_buffer(buf, x[rows], dtype))
        sumsq += buf.mul_(buf).sum(dims)
    var = sumsq / m
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    scale_c = as_channel(scale, x)
    bias_c = None if bias is None else as_channel(bias.to(dtype), x)
    y = torch.empty_like(x, dtype=dtype)
    for rows in _slabs(x):
        slab = torch.sub(x[rows], mean_c, out=y[rows]).mul_(scale_c)
        if bias_c is not None:
            slab.add_(bias_c)
    return y.to(x.dtype), mean, var


def closed_form_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward (as ``ops.closed_form_backward``): returns dx, dweight, dbias.

    Memory traffic: read dy and x for both reductions; read them again and write dx.
    """
    dtype = compute_dtype(x)
    dims, m = reduce_dims(x), x.numel() // x.shape[1]
    mean_c = as_channel(mean, x)
    dbias = torch.zeros_like(mean)  # sum(dy)
    dot = torch.zeros_like(mean)  # sum(dy * (x - mean))
    buf = None
    for rows in _slabs(x):
        dbias += dy[rows].sum(dims, dtype=dtype)
        buf = torch.sub(x[rows], mean_c, out=_buffer(buf, x[rows], dtype))
        dot += buf.mul_(dy[rows]).sum(dims)
    dweight = dot * rstd  # sum(dy * xhat)
    # dx = a * dy + b * (x - mean) + c, per channel: a = weight * rstd,
    # b = -a * rstd * dweight / M, c = -a * dbias / M  (docs/derivation.md, with xhat = (x - mean) * rstd)
    a = rstd if weight is None else rstd * weight.to(dtype)
    a_c = as_channel(a, x)
    b_c = as_channel(-a * rstd * dweight / m, x)
    c_c = as_channel(-a * dbias / m, x)
    dx = torch.empty_like(x, dtype=dtype)
    for rows in _slabs(x):
        torch.sub(x[rows], mean_c, out=dx[rows]).mul_(b_c).add_(c_c).addcmul_(dy[rows], a_c)
    return dx.to(dy.dtype), dweight, dbias
