"""Fast eager paths: the math of :mod:`torch_bn.ops` with fewer trips through memory.

Who runs this: large CPU inputs (``dispatch.FUSED_MIN_ELEMENTS`` and up) where the compiled CPU
op is absent (``TORCH_BN_CPP=0``, or no C++ compiler). Where the op is built, every CPU input takes
it instead (:mod:`torch_bn.cpp`, faster still), and this module only runs when pinned with
``torch_bn.use_path("fused")``. It stays because it serves the no-compiler case measurably
better than the reference ops: forward+backward, 1 thread, 2-core CPU, reference / fused time
2.3x at (32, 64, 32, 32) float32, 3.3x at (4096, 1024), 3.2x at (256, 65536); bfloat16 1.8x,
2.2x, 5.6x; near FUSED_MIN_ELEMENTS, at (256, 1024), 1.5x float32 and about even bfloat16
(bench/RESULTS.md, "Without the compiled op").

Same results as the reference ops to within rounding (tested against them and float64), but
not differentiable: they run where autograd is not recording, inside BatchNormFunction.
Two tricks, in plain tensor ops:

- One-pass statistics and a folded affine where that is safe. Sum x and x^2 in one sweep,
  var = E[x^2] - mean^2, and y = x * scale + (bias - mean * scale) in one pass (the backward
  likewise: sum(dy * x) - mean * sum(dy), and dx = a * dy + b * x + c in two ops). These
  lose about (1 + (|mean| * rstd)^2) ulps, so they are taken only when every channel has
  |mean| * rstd <= ONE_PASS_MAX_MEAN_RSTD (= 4; checked in all 2,000 training calls of train.py's
  deep CIFAR-10 experiment it never exceeded 2.4). Otherwise, as for constant features or data
  far from zero, the exact two-pass path runs: x - mean first.
- Row slabs: sums of x, x^2 or dy * x are accumulated slab by slab into slab-sized accumulators
  that stay in cache, and temporaries (x - mean, float32 copies of half-precision slabs: most
  mixed-dtype kernels are slow on CPU) live in small buffers reused slab after slab, never in
  full-size tensors that must be allocated, page-faulted and streamed through memory.

Like PyTorch's own kernel, only x and per-channel vectors are kept for backward. Slabs split
dim 0 only, so any (N, C, *) input and any strides work.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from .ops import as_channel, compute_dtype, reduce_dims

SLAB_ELEMENTS = 1 << 17  # 512 KiB of float32: three such slabs per op stay in a core's L2
# One-pass error grows as (1 + (|mean| * rstd)^2) ulps: at 4, float32 y is within 1e-5 of
# float64 (PyTorch's own CPU kernel, which also folds the mean into the shift: 6e-6).
ONE_PASS_MAX_MEAN_RSTD = 4.0

# CPU scratch is kept per thread between calls: allocating and freeing it on every call shifts
# the heap so that glibc returns y's pages to the OS and the next call page-faults them back in
# (about 1 us per 4 KiB page here: as much as the arithmetic at 16 MiB).
_scratch = threading.local()


def _dense_strides(t: Tensor) -> list[int]:
    """Strides of a dense tensor shaped like t with t's order of dimensions in memory, as
    torch.empty_like gives: element-wise ops between t and such a buffer (channels-last ones
    included) then walk both in the same order instead of transposing."""
    strides, step = [0] * t.dim(), 1
    for d in sorted(range(t.dim()), key=t.stride):  # fastest-moving dimension first
        strides[d] = step
        step *= t.shape[d]
    return strides


def _scratch_buffer(name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A buffer shaped and laid out like ``like``, reused across calls (up to 4 slabs' worth)."""
    pool = _scratch.__dict__.setdefault("pool", {})
    key, n = (name, dtype, like.device), like.numel()
    flat = pool.get(key)
    if flat is None or flat.numel() < n:
        flat = torch.empty(n, dtype=dtype, device=like.device)
        # A huge single row is not worth keeping; nor is GPU scratch: there the caching
        # allocator already reuses memory, and knows which stream last used it.
        if n <= 4 * SLAB_ELEMENTS and like.device.type == "cpu":
            pool[key] = flat
    return flat[:n].as_strided(like.shape, _dense_strides(like))


class _Slabs:
    """Row slabs of the tensors of one call, and their scratch buffers in compute dtype."""

    def __init__(self, x: Tensor) -> None:
        self.rows = max(1, SLAB_ELEMENTS // max(x[0].numel(), 1))
        self.dtype = compute_dtype(x)
        self.dims = reduce_dims(x)
        self.half = x.dtype != self.dtype  # float16/bfloat16 input, float32 arithmetic

    def of(self, t: Tensor) -> tuple[Tensor, ...]:
        """Views of t's row slabs (the last may be shorter)."""
        return t.split(self.rows)

    def buffer(self, name: str, like: Tensor) -> Tensor:
        """Scratch shaped like ``like`` in compute dtype."""
        return _scratch_buffer(name, like, self.dtype)

    def compute(self, slab: Tensor, name: str) -> Tensor:
        """The slab in compute dtype: itself, or a float32 copy in a buffer (read-only use)."""
        return self.buffer(name, slab).copy_(slab) if self.half else slab

    def centred(self, slab: Tensor, mean_c: Tensor, out: Tensor | None = None) -> Tensor:
        """slab - mean in compute dtype, written into ``out`` or a scratch buffer."""
        out = self.buffer("centred", slab) if out is None else out
        if self.half:
            return out.copy_(slab).sub_(mean_c)
        return torch.sub(slab, mean_c, out=out)

    def dot_sums(self, a: Tensor, b: Tensor, a_mean_c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per channel sum(b) and sum(a * b), in one sweep over the slabs of a and b; with
        a_mean_c, a - mean stands for a (and for b too when b is a).

        Each slab is added element-wise into two slab-shaped accumulators (add_, addcmul_: no
        product is ever written out), which are reduced once at the end. Each accumulator
        element sums one value per slab, so rounding grows with the number of slabs (512 at
        256 MiB of float32), not with N.
        """
        total = total_ab = None
        for a_slab, b_slab in zip(self.of(a), self.of(b)):
            as_ = self.compute(a_slab, "a") if a_mean_c is None else self.centred(a_slab, a_mean_c)
            bs = as_ if a is b else self.compute(b_slab, "b")
            if total is None:
                total = self.buffer("total", bs).copy_(bs)
                total_ab = torch.mul(as_, bs, out=self.buffer("total_ab", bs))
            elif bs.shape[0] == total.shape[0]:
                total.add_(bs)
                total_ab.addcmul_(as_, bs)
            else:  # the short last slab
                total[: bs.shape[0]].add_(bs)
                total_ab[: bs.shape[0]].addcmul_(as_, bs)
        return total.sum(self.dims), total_ab.sum(self.dims)


def _affine(x: Tensor, scale_c: Tensor, shift_c: Tensor, out: Tensor) -> Tensor:
    """out = x * scale + shift with per-channel (1, C, 1, ...) scale and shift (out may be x).

    One addcmul, except where channels are not the fastest-moving dimension (NCHW-like input):
    there PyTorch's CPU addcmul, with two operands broadcast along the inner dimension, leaves
    its vectorized loop (2-3x slower at 2x256x14x14) and mul then add_ costs less.
    """
    if x.dim() > 2 and x.stride(1) != 1:
        return torch.mul(x, scale_c, out=out).add_(shift_c)
    return torch.addcmul(shift_c, x, scale_c, out=out)


def one_pass_ok(mean: Tensor, rstd: Tensor) -> bool:
    """Whether the one-pass formulas are accurate here: every |mean| * rstd <= the bound."""
    return mean.numel() == 0 or bool((mean.abs() * rstd).amax() <= ONE_PASS_MAX_MEAN_RSTD)


def forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: returns y (like x), mean and biased var (C,, compute dtype).

    Memory traffic, one-pass path: read x (sums of x and x^2); read x, write y. The exact path
    adds a sweep for sum((x - mean)^2) and writes y as (x - mean) * scale + bias.
    """
    y = torch.empty_like(x)  # before any scratch, so that it reuses the block the last y freed
    s = _Slabs(x)
    m = x.numel() // x.shape[1]
    total, total_sq = s.dot_sums(x, x)
    mean = total / m
    var = (total_sq / m - mean * mean).clamp_(min=0)
    rstd = torch.rsqrt(var + eps)
    exact = not one_pass_ok(mean, rstd)
    mean_c = as_channel(mean, x)
    if exact:  # a second sweep: sum((x - mean)^2)
        var = s.dot_sums(x, x, mean_c)[1] / m
        rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.to(s.dtype)
    shift = torch.zeros_like(mean) if bias is None else bias.to(s.dtype)
    if not exact:
        shift = shift - mean * scale
    scale_c, shift_c = as_channel(scale, x), as_channel(shift, x)
    if not exact and not s.half:
        return _affine(x, scale_c, shift_c, out=y), mean, var
    for xs, ys in zip(s.of(x), s.of(y)):
        # x - mean (exact) or a float32 copy of half-precision x, written where y goes or into
        # a buffer, then scaled and shifted in place.
        xs = s.centred(xs, mean_c, out=None if s.half else ys) if exact else s.compute(xs, "a")
        _affine(xs, scale_c, shift_c, out=xs)
        if s.half:
            ys.copy_(xs)
    return y, mean, var


def closed_form_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward (as ``ops.closed_form_backward``): returns dx, dweight, dbias.

    Memory traffic: read dy and x for both reductions; read them again and write dx.
    dx = a * dy + b * (x - mean) + c per channel, with a = weight * rstd,
    b = -a * rstd * dweight / M, c = -a * dbias / M (docs/derivation.md, xhat = (x - mean) * rstd).
    """
    dx = torch.empty_like(dy)  # first, as y in forward_train
    s = _Slabs(x)
    m = x.numel() // x.shape[1]
    exact = not one_pass_ok(mean, rstd)
    mean_c = as_channel(mean, x)
    dbias, dot = s.dot_sums(x, dy, mean_c if exact else None)
    if not exact:
        dot -= mean * dbias  # sum(dy * x) - mean * sum(dy) = sum(dy * (x - mean))
    dweight = dot * rstd  # sum(dy * xhat)
    a = rstd if weight is None else rstd * weight.to(s.dtype)
    b = -a * rstd * dweight / m
    c = -a * dbias / m
    if not exact:
        c -= b * mean  # b * (x - mean) + c = b * x + (c - b * mean)
    a_c, b_c, c_c = as_channel(a, x), as_channel(b, x), as_channel(c, x)
    for xs, dys, dxs in zip(s.of(x), s.of(dy), s.of(dx)):
        out = s.buffer("dx", dxs) if s.half else dxs
        xs = s.centred(xs, mean_c) if exact else s.compute(xs, "a")
        _affine(xs, b_c, c_c, out=out).addcmul_(s.compute(dys, "b"), a_c)
        if s.half:
            dxs.copy_(out)
    return dx, dweight, dbias
