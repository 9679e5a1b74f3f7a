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


def batch_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """Values per channel m, per-channel mean and M2 = sum((x - mean)^2) (C,) in compute dtype.

    Two passes: the mean, then the sum of squared deviations. Stable for data far from zero,
    where E[x^2] - E[x]^2 cancels catastrophically. An empty batch (m = 0) gives mean 0 and
    M2 0, so that it adds nothing when moments of several batches are combined.
    """
    dims, m = reduce_dims(x), x.numel() // x.shape[1]
    mean = x.sum(dims, dtype=compute_dtype(x)) / max(m, 1)
    xmu = x - as_channel(mean, x)
    return m, mean, (xmu * xmu).sum(dims)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance (C,) in compute dtype (see batch_moments)."""
    m, mean, m2 = batch_moments(x)
    return mean, m2 / m


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
    dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode backward in closed form (docs/derivation.md; the reference, differentiable).

    Inputs: upstream gradient dy (N, C, *); the normalized input xhat (N, C, *) in compute
    dtype and rstd = 1/sqrt(var + eps) (C,); weight (C,) or None.
    Outputs: dx (dtype of dy), dweight, dbias (C,, compute dtype).

        dbias = sum(dy),  dweight = sum(dy * xhat)
        dx = weight * rstd / M * (M * dy - dbias - xhat * dweight)
    """
    dims, m = reduce_dims(xhat), xhat.numel() // xhat.shape[1]
    dyc = dy.to(xhat.dtype)
    dbias = dyc.sum(dims)
    dweight = (dyc * xhat).sum(dims)
    return closed_form_dx(dyc, xhat, rstd, weight, dbias, dweight, m).to(dy.dtype), dweight, dbias


def closed_form_dx(dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None, sum_dy: Tensor,
                   sum_dy_xhat: Tensor, m: int) -> Tensor:
    """dx = weight * rstd / m * (m * dy - sum_dy - xhat * sum_dy_xhat), in xhat's dtype.

    Inputs: dy, xhat (N, C, *) in compute dtype; rstd (C,); weight (C,) or None; the per-channel
    sums sum(dy) and sum(dy * xhat) and the count m they were taken over (the whole batch's,
    which for synchronized batch norm spans several processes).
    """
    g = rstd if weight is None else rstd * weight.to(xhat.dtype)
    # Multiplied out, dx = g * dy + xhat * (-g * sum_dy_xhat / m) + (-g * sum_dy / m): the factors
    # are per-channel vectors, so two full-size ops (addcmul, addcmul_) do all the work.
    dx = torch.addcmul(as_channel(-g * sum_dy / m, xhat), xhat, as_channel(-g * sum_dy_xhat / m, xhat))
    if torch._C._are_functorch_transforms_active():
        return torch.addcmul(dx, dy, as_channel(g, xhat))  # vmap has no batching rule for addcmul_
    return dx.addcmul_(dy, as_channel(g, xhat))


def staged_backward(
    dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode backward, node by node through the forward's computation graph.

    Same inputs and outputs as :func:`closed_form_backward`. The forward graph is

        mu = mean(x); xmu = x - mu; sq = xmu**2; var = mean(sq); std = sqrt(var + eps)
        ivar = 1 / std; xhat = xmu * ivar; out = weight * xhat + bias

    and each line below is the local derivative of one node, summing gradients where a
    node feeds two others (xmu feeds sq and xhat; x feeds mu and xmu).
    """
    dims, m = reduce_dims(xhat), xhat.numel() // xhat.shape[1]
    dyc = dy.to(xhat.dtype)
    ivar = rstd
    xmu = xhat / as_channel(ivar, xhat)                    # the forward's x - mu, recovered
    dbias = dyc.sum(dims)                                  # out = gammax + bias
    dweight = (dyc * xhat).sum(dims)                       # gammax = weight * xhat
    dxhat = dyc if weight is None else dyc * as_channel(weight.to(xhat.dtype), xhat)
    divar = (dxhat * xmu).sum(dims)                        # xhat = xmu * ivar
    dxmu1 = dxhat * as_channel(ivar, xhat)
    dstd = -ivar * ivar * divar                            # ivar = 1 / std
    dvar = 0.5 * ivar * dstd                               # std = sqrt(var + eps)
    dsq = as_channel(dvar / m, xhat).expand_as(xmu)        # var = mean(sq)
    dxmu2 = 2 * xmu * dsq                                  # sq = xmu ** 2
    dx1 = dxmu1 + dxmu2                                    # xmu = x - mu (branch to x)
    dmu = -dx1.sum(dims)                                   # xmu = x - mu (branch to mu)
    dx2 = as_channel(dmu / m, xhat)                        # mu = mean(x)
    dx = dx1 + dx2
    return dx.to(dy.dtype), dweight, dbias


def training_jvp(
    dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None,
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
) -> Tensor:
    """Forward-mode derivative (tangent) of the training-mode output y for input tangents.

    Inputs: tangents dx (N, C, *), dweight, dbias (C,), each None when zero; the forward's x,
    batch mean and rstd = 1/sqrt(var + eps) (C,); weight (C,) or None. Output: dy like x.
    The batch statistics move with x, so (the transpose of the closed-form backward):

        dmean = mean(dx),  dvar = 2 * mean((x - mean) * dx),  drstd = -rstd^3 * dvar / 2
        dxhat = rstd * (dx - mean(dx) - xhat * mean(xhat * dx))
        dy = weight * dxhat + dweight * xhat + dbias
    """
    dims, m = reduce_dims(x), x.numel() // max(x.shape[1], 1)
    dtype = compute_dtype(x)
    xhat = (x.to(dtype) - as_channel(mean, x)) * as_channel(rstd, x)
    # Out-of-place ops only: under vmap (batched tangents) only some of the terms are batched.
    if dx is None:
        dy = torch.zeros_like(xhat)
    else:
        dxc = dx.to(dtype)
        g = rstd if weight is None else rstd * weight.to(dtype)
        mean_dx = dxc.sum(dims) / m
        mean_xhat_dx = (xhat * dxc).sum(dims) / m
        # g * (dx - mean(dx) - xhat * mean(xhat * dx)), multiplied out as in the backward
        dy = torch.addcmul(as_channel(-g * mean_dx, x), xhat, as_channel(-g * mean_xhat_dx, x))
        dy = torch.addcmul(dy, dxc, as_channel(g, x))
    if dweight is not None:
        dy = torch.addcmul(dy, xhat, as_channel(dweight.to(dtype), x))
    if dbias is not None:
        dy = dy + as_channel(dbias.to(dtype), x)
    return dy.to(x.dtype)

