"""Fast eager paths: the math of :mod:`torch_bn.ops` with fewer trips through main memory.

Same results as the reference ops (tested equal), but not differentiable: they run where
autograd is not recording, inside BatchNormFunction. The trick, in plain tensor ops: work
on cache-sized slabs of rows, so that x - mean, its square, or dy * xhat live in a small
reused buffer (or in the output's own slab) instead of full-size temporaries that must be
allocated, page-faulted and streamed through memory twice. Half-precision slabs are
converted to float32 in the buffer (mixed-dtype kernels are slow on CPU). Like PyTorch's own
kernel, only x and per-channel vectors are kept for backward. Slabs split dim 0 only, so any
(N, C, *) input and any strides work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops import as_channel, compute_dtype, reduce_dims

SLAB_ELEMENTS = 1 << 18  # 1 MiB of float32: stays in cache between the two uses of a slab


class _Slabs:
    """Row slabs of the tensors of one call, with reusable float scratch buffers."""

    def __init__(self, x: Tensor) -> None:
        rows = max(1, SLAB_ELEMENTS // max(x[0].numel(), 1))
        self.slices = [slice(i, min(i + rows, x.shape[0])) for i in range(0, x.shape[0], rows)]
        self.dtype = compute_dtype(x)
        self.buffers: dict[str, Tensor] = {}

    def buffer(self, name: str, like: Tensor) -> Tensor:
        """Scratch shaped like ``like`` in compute dtype (the last slab may be shorter)."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != like.shape:
            buf = self.buffers[name] = torch.empty(like.shape, dtype=self.dtype, device=like.device)
        return buf

    def compute(self, slab: Tensor, name: str) -> Tensor:
        """The slab in compute dtype: itself, or a float32 copy in a buffer (read-only use)."""
        return slab if slab.dtype == self.dtype else self.buffer(name, slab).copy_(slab)

    def centred(self, slab: Tensor, mean_c: Tensor, out: Tensor | None = None) -> Tensor:
        """slab - mean in compute dtype, written into ``out`` or a scratch buffer."""
        out = self.buffer("centred", slab) if out is None else out
        if slab.dtype == self.dtype:
            return torch.sub(slab, mean_c, out=out)
        return out.copy_(slab).sub_(mean_c)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: returns y (like x), mean and biased var (C,, compute dtype).

    Memory traffic: read x (sum); read x (sum of squared deviations, from a slab buffer);
    read x, write y (each slab of y is x - mean, then scaled and shifted in place).
    """
    s = _Slabs(x)
    dims, m = reduce_dims(x), x.numel() // x.shape[1]
    mean = torch.zeros(x.shape[1], dtype=s.dtype, device=x.device)
    for rows in s.slices:
        mean += s.compute(x[rows], "x").sum(dims)
    mean /= m
    mean_c = as_channel(mean, x)
    sumsq = torch.zeros_like(mean)
    for rows in s.slices:
        xmu = s.centred(x[rows], mean_c)
        sumsq += xmu.mul_(xmu).sum(dims)
    var = sumsq / m
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(s.dtype)
    scale_c = as_channel(scale, x)
    bias_c = None if bias is None else as_channel(bias.to(s.dtype), x)
    y = torch.empty_like(x)
    same = x.dtype == s.dtype
    for rows in s.slices:
        slab = s.centred(x[rows], mean_c, out=y[rows] if same else None)
        if bias_c is None:
            slab.mul_(scale_c)
        else:
            torch.addcmul(bias_c, slab, scale_c, out=slab)
        if not same:
            y[rows].copy_(slab)
    return y, mean, var


def closed_form_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward (as ``ops.closed_form_backward``): returns dx, dweight, dbias.

    Memory traffic: read dy and x for both reductions; read them again and write dx.
    """
    s = _Slabs(x)
    dims, m = reduce_dims(x), x.numel() // x.shape[1]
    mean_c = as_channel(mean, x)
    dbias = torch.zeros_like(mean)  # sum(dy)
    dot = torch.zeros_like(mean)  # sum(dy * (x - mean))
    for rows in s.slices:
        d = s.compute(dy[rows], "dy")
        dbias += d.sum(dims)
        dot += s.centred(x[rows], mean_c).mul_(d).sum(dims)
    dweight = dot * rstd  # sum(dy * xhat)
    # dx = a * dy + b * (x - mean) + c, per channel: a = weight * rstd,
    # b = -a * rstd * dweight / M, c = -a * dbias / M  (docs/derivation.md, with xhat = (x - mean) * rstd)
    a = rstd if weight is None else rstd * weight.to(s.dtype)
    a_c = as_channel(a, x)
    b_c = as_channel(-a * rstd * dweight / m, x)
    c_c = as_channel(-a * dbias / m, x)
    dx = torch.empty_like(dy)
    same = dy.dtype == s.dtype
    for rows in s.slices:
        slab = s.centred(x[rows], mean_c, out=dx[rows] if same else None)
        torch.addcmul(c_c, slab, b_c, out=slab).addcmul_(s.compute(dy[rows], "dy"), a_c)
        if not same:
            dx[rows].copy_(slab)
    return dx, dweight, dbias
