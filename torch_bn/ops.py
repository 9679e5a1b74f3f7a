"""The math of batch normalization as plain tensor functions.

Everything here is written by hand from elementary tensor ops (no ``F.batch_norm`` or
``torch.native_batch_norm``), so it doubles as a readable reference.  Conventions:

- ``x`` has shape (N, C) or (N, C, *): statistics are per channel C, taken over the
  batch dimension and every trailing dimension; M = x.numel() / C values per channel.
- Per-channel vectors (mean, var, rstd, weight, bias) have shape (C,).
- float16/bfloat16 inputs are computed in float32 ("compute dtype") and cast back at the
  end, so statistics never accumulate in half precision.
"""
from __future__ import annotations

import torch
from torch import Tensor

BACKWARDS = ("closed_form", "staged")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions statistics are taken over: all but the channel dimension 1."""
    return [0] + list(range(2, x.dim()))


def as_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a (C,) vector as (1, C, 1, ...) so it broadcasts against x."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance.

    Inputs: x (N, C, *). Outputs: mean (C,), var (C,) in compute dtype.
    ``torch.var_mean`` uses Welford's algorithm, which is stable for data far from zero
    (E[x^2] - E[x]^2 would cancel catastrophically for x = 1e4 + noise).
    """
    var, mean = torch.var_mean(x.to(compute_dtype(x)), dim=reduce_dims(x), correction=0)
    return mean, var


def normalize(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean) * rstd * weight + bias, in the input's dtype.

    Inputs: x (N, C, *); mean, rstd (C,); weight, bias (C,) or None.
    rstd and weight are folded into one per-channel scale, but x - mean is taken first:
    folding the mean into the shift too (x * scale + shift, as PyTorch's CPU kernel does)
    saves a pass but cancels catastrophically for constant or far-from-zero features.
    """
    dtype = compute_dtype(x)
    scale = rstd if weight is None else rstd * weight.to(dtype)
    xmu = x.to(dtype) - as_channel(mean, x)
    if bias is None:
        y = xmu * as_channel(scale, x)
    else:
        y = torch.addcmul(as_channel(bias.to(dtype), x), xmu, as_channel(scale, x))
    return y.to(x.dtype)


def closed_form_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode backward in closed form (docs/derivation.md).

    Inputs: upstream gradient dy and input x (N, C, *); the forward's mean, rstd (C,);
    weight (C,) or None. Outputs: dx (dtype of x), dweight, dbias (C,, compute dtype).

        xhat = (x - mean) * rstd
        dbias = sum(dy),  dweight = sum(dy * xhat)
        dx = weight * rstd / M * (M * dy - dbias - xhat * dweight)

    Written with differentiable ops only, so autograd can differentiate it again.
    """
    dtype = compute_dtype(x)
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    xhat = (x.to(dtype) - as_channel(mean, x)) * as_channel(rstd, x)
    dy = dy.to(dtype)
    dbias = dy.sum(dims)
    dweight = (dy * xhat).sum(dims)
    g = rstd if weight is None else rstd * weight.to(dtype)
    dx = as_channel(g / m, x) * (m * dy - as_channel(dbias, x) - xhat * as_channel(dweight, x))
    return dx.to(x.dtype), dweight, dbias


def staged_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode backward, node by node through the forward's computation graph.

    Same inputs and outputs as :func:`closed_form_backward`. The forward graph is

        mu = mean(x); xmu = x - mu; sq = xmu**2; var = mean(sq); std = sqrt(var + eps)
        ivar = 1 / std; xhat = xmu * ivar; out = weight * xhat + bias

    and each line below is the local derivative of one node, summing gradients where a
    node feeds two others (xmu feeds sq and xhat; x feeds mu and xmu).
    """
    dtype = compute_dtype(x)
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    dy = dy.to(dtype)
    xmu = x.to(dtype) - as_channel(mean, x)
    ivar = rstd
    xhat = xmu * as_channel(ivar, x)
    dbias = dy.sum(dims)                                   # out = gammax + bias
    dweight = (dy * xhat).sum(dims)                        # gammax = weight * xhat
    dxhat = dy if weight is None else dy * as_channel(weight.to(dtype), x)
    divar = (dxhat * xmu).sum(dims)                        # xhat = xmu * ivar
    dxmu1 = dxhat * as_channel(ivar, x)
    dstd = -ivar * ivar * divar                            # ivar = 1 / std
    dvar = 0.5 * ivar * dstd                               # std = sqrt(var + eps)
    dsq = as_channel(dvar / m, x).expand_as(xmu)           # var = mean(sq)
    dxmu2 = 2 * xmu * dsq                                  # sq = xmu ** 2
    dx1 = dxmu1 + dxmu2                                    # xmu = x - mu (branch to x)
    dmu = -dx1.sum(dims)                                   # xmu = x - mu (branch to mu)
    dx2 = as_channel(dmu / m, x)                           # mu = mean(x)
    dx = dx1 + dx2
    return dx.to(x.dtype), dweight, dbias
