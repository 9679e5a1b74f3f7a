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



# ---- Batch renormalization (Ioffe, 2017): docs/derivation.md, "Batch renormalization" ----------

def renorm_factors(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, eps: float,
                   rmax: float, dmax: float) -> tuple[Tensor, Tensor]:
    """The corrections r and d (C,) of batch renormalization, constants for the gradient.

    Inputs: the batch mean and biased variance (C,); the running statistics before this batch's
    update (C,). With sigma_B = sqrt(var + eps) and sigma = sqrt(running_var + eps):

        r = clamp(sigma_B / sigma, 1 / rmax, rmax),  d = clamp((mean - running_mean) / sigma, -dmax, dmax)
    """
    sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
    r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / rmax, rmax)
    d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-dmax, dmax)
    return r.detach(), d.detach()


def renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """The per-channel scale and shift that batch renormalization applies to xhat:
    y = weight * (xhat * r + d) + bias = (weight * r) * xhat + (weight * d + bias)."""
    scale = r if weight is None else weight.to(r.dtype) * r
    shift = d if weight is None else weight.to(d.dtype) * d
    return scale, shift if bias is None else shift + bias.to(d.dtype)


def renorm_backward(dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None, r: Tensor,
                    d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode backward of batch renormalization in closed form, r and d constants.

    Inputs: dy (N, C, *); xhat = (x - mean) * rstd (N, C, *) in compute dtype; rstd (C,);
    weight (C,) or None; r, d (C,). Outputs: dx (dtype of dy), dweight, dbias (C,).
    It is batch norm with weight * r for the weight (the closed form of closed_form_dx), and

        dbias = sum(dy),  dweight = r * sum(dy * xhat) + d * sum(dy)
    """
    dims, m = reduce_dims(xhat), xhat.numel() // xhat.shape[1]
    dyc = dy.to(xhat.dtype)
    dbias = dyc.sum(dims)
    sum_dy_xhat = (dyc * xhat).sum(dims)
    scale = r if weight is None else weight.to(r.dtype) * r
    dx = closed_form_dx(dyc, xhat, rstd, scale, dbias, sum_dy_xhat, m)
    return dx.to(dy.dtype), r * sum_dy_xhat + d * dbias, dbias


# ---- Ghost batch norm (Hoffer et al., 2017): docs/derivation.md, "Ghost batch norm" -------------
# A batch (N, C, *) is seen as groups of chunks: a view (G, V, C, S) holds G consecutive chunks of
# V samples each (S = the trailing size). Statistics are per chunk and channel, kept as (G, 1, C, 1)
# so that they broadcast against the view; per-channel vectors (C,) are viewed as (1, 1, C, 1).

def ghost_chunks(x: Tensor, virtual_batch_size: int) -> list[Tensor]:
    """x (N, C, *) as views (G, V, C, S) of its consecutive chunks of virtual_batch_size samples:
    one view of the G full chunks, and a second (1, R, C, S) of the last R < V samples where N
    is not a multiple of virtual_batch_size. No copy for contiguous or channels-last x."""
    n, c = x.shape[0], x.shape[1]
    v = min(virtual_batch_size, n)
    g, rest = divmod(n, v)
    if not rest:
        return [x.reshape(g, v, c, -1)]
    flat = x.reshape(n, c, -1)
    chunks = [flat[:g * v].view(g, v, c, flat.shape[2])]
    if rest:
        chunks.append(flat[g * v:].view(1, rest, c, flat.shape[2]))
    return chunks


def as_chunk_channel(v: Tensor) -> Tensor:
    """View a per-channel vector (C,) as (1, 1, C, 1), to broadcast against a chunk view."""
    return v.view(1, 1, -1, 1)


def chunk_stats(xg: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (G, 1, C, 1) of each chunk and channel of xg (G, V, C, S), in
    compute dtype, in two passes as batch_moments."""
    mean = xg.mean((1, 3), keepdim=True, dtype=compute_dtype(xg))
    xmu = xg - mean
    return mean, (xmu * xmu).mean((1, 3), keepdim=True)


def chunk_forward(xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ghost batch norm's training forward on a chunk view xg (G, V, C, S): each chunk's mean and
    biased variance (chunk_stats, with x - mean kept), then

        y = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps)

    per chunk. Outputs: y (G, V, C, S) in the input's dtype; mean, var, rstd (G, 1, C, 1) in
    compute dtype."""
    dtype = compute_dtype(xg)
    mean = xg.mean((1, 3), keepdim=True, dtype=dtype)
    xmu = xg - mean
    var = (xmu * xmu).mean((1, 3), keepdim=True)
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * as_chunk_channel(weight.to(dtype))
    y = xmu * scale if bias is None else torch.addcmul(as_chunk_channel(bias.to(dtype)), xmu, scale)
    return y.to(xg.dtype), mean, var, rstd


def chunk_backward(dyg: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form backward of batch norm, chunk by chunk, in one call over the view.

    Inputs: dyg, xhat (G, V, C, S) (xhat in compute dtype), rstd (G, 1, C, 1), weight (C,) or
    None. Outputs: dx (G, V, C, S, dtype of dy) and dweight, dbias (C,): with each chunk's sums
    sum(dy), sum(dy * xhat) over its m = V * S values per channel,

        dx = weight * rstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))

    and the parameter gradients are the sums over all chunks.
    """
    m = xhat.shape[1] * xhat.shape[3]
    dyc = dyg.to(xhat.dtype)
    sum_dy = dyc.sum((1, 3), keepdim=True)
    sum_dy_xhat = (dyc * xhat).sum((1, 3), keepdim=True)
    g = rstd if weight is None else rstd * as_chunk_channel(weight.to(xhat.dtype))
    g_m = g * (-1.0 / m)
    dx = torch.addcmul(sum_dy * g_m, xhat, sum_dy_xhat * g_m)
    if torch._C._are_functorch_transforms_active():
        dx = torch.addcmul(dx, dyc, g)  # vmap has no batching rule for addcmul_
    else:
        dx = dx.addcmul_(dyc, g)
    return dx.to(dyg.dtype), sum_dy_xhat.sum((0, 1, 3)), sum_dy.sum((0, 1, 3))


def chunk_jvp(dxg: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, xhat: Tensor,
              rstd: Tensor, weight: Tensor | None) -> Tensor:
    """Forward-mode derivative of each chunk's output (G, V, C, S) in compute dtype: as
    training_jvp, with each chunk's own statistics,

        dy = weight * rstd * (dx - mean(dx) - xhat * mean(xhat * dx)) + dweight * xhat + dbias
    """
    dy = torch.zeros_like(xhat)
    if dxg is not None:
        dxc = dxg.to(xhat.dtype)
        g = rstd if weight is None else rstd * as_chunk_channel(weight.to(xhat.dtype))
        mean_dx = dxc.mean((1, 3), keepdim=True)
        mean_xhat_dx = (xhat * dxc).mean((1, 3), keepdim=True)
        dy = torch.addcmul(-g * mean_dx, xhat, -g * mean_xhat_dx)
        dy = torch.addcmul(dy, dxc, g)
    if dweight is not None:
        dy = torch.addcmul(dy, xhat, as_chunk_channel(dweight.to(xhat.dtype)))
    if dbias is not None:
        dy = dy + as_chunk_channel(dbias.to(xhat.dtype))
    return dy


# ---- Masked statistics: docs/derivation.md, "Masked statistics" ---------------------------------
# mask is a bool tensor shaped like x without dim 1: (N,) for (N, C), (N, L) for (N, C, L), ...
# Statistics count the True positions only; every position is normalized with them.

def as_mask(mask: Tensor, x: Tensor) -> Tensor:
    """View mask (N, *) as (N, 1, *) so it broadcasts against x (N, C, *)."""
    return mask.unsqueeze(1)


def masked_batch_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """count (0-d), mean and biased variance (C,) over the positions where mask is True, in
    compute dtype. Two passes, as batch_moments; masked-out values are replaced by zeros, not
    multiplied by them, so padding that holds inf or nan does not reach the statistics."""
    dims, dtype = reduce_dims(x), compute_dtype(x)
    keep = as_mask(mask, x)
    count = mask.sum(dtype=dtype)
    mean = torch.where(keep, x, 0).sum(dims, dtype=dtype) / count
    xmu = torch.where(keep, x.to(dtype) - as_channel(mean, x), 0)
    return count, mean, (xmu * xmu).sum(dims) / count


def masked_dx(dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None, mask: Tensor,
              sum_dy: Tensor, sum_dy_xhat: Tensor, count: Tensor) -> Tensor:
    """dx = weight * rstd * (dy - mask * (sum_dy + xhat * sum_dy_xhat) / count), in xhat's dtype.

    Inputs: dy, xhat (N, C, *) in compute dtype; rstd (C,); weight (C,) or None; mask (N, *);
    sum(dy) and sum(dy * xhat) (C,) over every position (all outputs depend on the statistics)
    and the count of True positions (over several processes for synchronized batch norm).
    A masked-out position gets weight * rstd * dy: the gradient through its own output only.
    """
    g = rstd if weight is None else rstd * weight.to(xhat.dtype)
    through_stats = torch.addcmul(as_channel(sum_dy / count, xhat), xhat, as_channel(sum_dy_xhat / count, xhat))
    return (dy - through_stats * as_mask(mask, xhat)) * as_channel(g, xhat)


def masked_backward(dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None, mask: Tensor,
                    count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode backward of masked batch norm in closed form: dx (dtype of dy) by
    masked_dx, and dweight = sum(dy * xhat), dbias = sum(dy) (C,) over every position."""
    dims = reduce_dims(xhat)
    dyc = dy.to(xhat.dtype)
    dbias = dyc.sum(dims)
    dweight = (dyc * xhat).sum(dims)
    dx = masked_dx(dyc, xhat, rstd, weight, mask, dbias, dweight, count)
    return dx.to(dy.dtype), dweight, dbias


def masked_jvp(dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, xhat: Tensor,
               rstd: Tensor, weight: Tensor | None, mask: Tensor, count: Tensor) -> Tensor:
    """Forward-mode derivative of masked batch norm's output, in compute dtype:

        dmean = sum(mask * dx) / count,  dxhat = rstd * (dx - dmean - xhat * sum(mask * xhat * dx) / count)
        dy = weight * dxhat + dweight * xhat + dbias
    """
    dims = reduce_dims(xhat)
    dy = torch.zeros_like(xhat)
    if dx is not None:
        dxc = torch.where(as_mask(mask, xhat), dx.to(xhat.dtype), 0)
        g = rstd if weight is None else rstd * weight.to(xhat.dtype)
        mean_dx = dxc.sum(dims) / count
        mean_xhat_dx = (xhat * dxc).sum(dims) / count
        dy = torch.addcmul(as_channel(-g * mean_dx, xhat), xhat, as_channel(-g * mean_xhat_dx, xhat))
        dy = torch.addcmul(dy, dx.to(xhat.dtype), as_channel(g, xhat))
    if dweight is not None:
        dy = torch.addcmul(dy, xhat, as_channel(dweight.to(xhat.dtype), xhat))
    if dbias is not None:
        dy = dy + as_channel(dbias.to(xhat.dtype), xhat)
    return dy
