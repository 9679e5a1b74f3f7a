"""Fused Triton kernels for training-mode batch norm on CUDA (and on CPU under TRITON_INTERPRET=1).

The input is read in place as an (N, C, L) array: element (r, c), with row r = n * L + l, lies at
(n * C + c) * L + l. Three memory layouts are that without a copy (see ``_ncl_layout``):
contiguous (N, C, *) input (L = the trailing size), channels-last and any input whose channel
dimension has stride 1 over dense rows (an (R, C) matrix: N -> R, L = 1), and channel-major input
such as a transposed (N, C) matrix (N -> 1, L = R). Anything else is copied to contiguous first.
Outputs (y, dx) take the input's memory layout, as nn.BatchNorm2d's do. Each channel reduces over
its R = N * L rows. Work is split over a 2D grid: blocks of BLOCK_C channels (grid axis 0, which
allows 2^31 - 1 programs) times chunks of rows (axis 1), so both tall-skinny (many rows, few
channels) and wide shapes fill the GPU.

Forward, three launches:
1. ``_stats_partial``: each program reads its chunk of rows once, keeping a Welford state
   (count, mean, M2) per row lane and channel, and merges its lanes: stable, and no
   E[x^2] - E[x]^2.
2. ``_stats_combine``: merges the chunks' (count, mean, M2) per channel (Chan et al.: mean of
   means, then M2 = sum(M2_p + n_p (mean_p - mean)^2)), a tile of chunks at a time, and
   writes mean, var, rstd.
3. ``_normalize``: y = (x - mean) * (rstd * weight) + bias.
So the forward reads x twice and writes y once: the two-pass bound.
Backward, three launches: ``_backward_partial`` (per chunk: sum(dy), sum(dy * xhat)),
``_backward_combine`` (sums the chunks: dbias, dweight), ``_backward_dx`` (the closed form
dx = weight * rstd * (dy - dbias / M - xhat * dweight / M)).
When a whole column block fits one tile (R up to SMALL_ELEMENTS rows), ``_small_forward`` and
``_small_backward`` do everything in one launch each, from one read of the data: the
one-pass bound, and a third of the launches for the small, launch-bound shapes.

All arithmetic is float32, so the kernels take float32, float16 and bfloat16 input only:
``supports(x)`` says whether x can go to them, and the ops raise TypeError for other dtypes
(float64 keeps its precision on the tensor-op path). Element offsets are int32, or int64 for
tensors near or above 2^31 elements (``LaunchConfig.int64``). The kernels are registered as
torch.library custom ops (``torch.ops.torch_bn.triton_forward`` / ``triton_backward``, torch >= 2.4)
so that ``torch.compile`` treats them as opaque calls; where that registration or Triton itself
fails, importing this module raises ImportError, and callers fall back to the tensor ops.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception as e:  # a broken install (driver, libraries) can raise more than ImportError
    raise ImportError(f"torch_bn.triton_kernels needs a working Triton ({type(e).__name__}: {e})") from e

if not (hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")):
    raise ImportError(f"torch_bn.triton_kernels needs torch >= 2.4 (torch.library.custom_op); "
                      f"this is torch {torch.__version__}")


@triton.jit
def _tile(rows, rmask, cols, cmask, C, L, INT64: tl.constexpr, ROW_VEC: tl.constexpr):
    # Offsets and mask of the (rows x cols) tile of the (N, C, L) view: element (r, c) with
    # r = n * L + l lies at (n * C + c) * L + l. With INT64 the rows and columns arrive as int64
    # and every product below is int64. Triton specializes L == 1 to a constant, so 2D and
    # channels-last input index without a division (and vectorize along channels when Triton
    # marks C divisible by 16). For L > 1 the hints tell the compiler what it cannot see through
    # the division by the runtime L: runs of ROW_VEC rows (L % ROW_VEC == 0, tiles start at
    # multiples of ROW_VEC, row counts are multiples of L) are contiguous, start at a multiple of
    # ROW_VEC elements, and are all in or all out of the mask: what vector loads and stores need.
    if INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    n = rows // L
    off = (n[:, None] * C + cols[None, :]) * L + (rows - n * L)[:, None]
    mask = rmask[:, None] & cmask[None, :]
    if ROW_VEC > 1:
        off = tl.max_contiguous(tl.multiple_of(off, [ROW_VEC, 1]), [ROW_VEC, 1])
        mask = tl.max_constancy(mask, [ROW_VEC, 1])
    return off, mask


@triton.jit
def _columns(pid_c, C, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    # This program's block of channels, and which of them exist.
    if INT64:
        pid_c = pid_c.to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _row_chunk(pid_r, R, ROWS_PER_PROG, INT64: tl.constexpr):
    # This program's rows [r0, r_end) of the chunked grid.
    if INT64:
        pid_r = pid_r.to(tl.int64)
    r0 = pid_r * ROWS_PER_PROG
    return r0, tl.minimum(r0 + ROWS_PER_PROG, R)


@triton.jit
def _per_channel(PTR, cols, cmask):
    # A (C,) vector's entries for these channels, as float32.
    return tl.load(PTR + cols, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _times_weight(v, W, cols, cmask, HAS_W: tl.constexpr):
    # v * weight per channel (v itself without affine weight).
    if HAS_W:
        v *= _per_channel(W, cols, cmask)
    return v


@triton.jit
def _stats_partial(
    X,  # input (N, C, L) view, read at _tile's offsets
    PMEAN,  # out (P, C) float32: each row chunk's mean per channel
    PM2,  # out (P, C) float32: each row chunk's sum of squared deviations per channel
    R,  # rows per channel: N * L
    C,  # channels
    L,  # length of the view's last axis (1 for 2D and channels-last input)
    ROWS_PER_PROG,  # rows of each chunk (a multiple of BLOCK_R)
    INT64: tl.constexpr,  # element offsets in int64 (tensors of about 2^31 elements or more)
    ROW_VEC: tl.constexpr,  # contiguous aligned runs along rows (L > 1), else 1: see _tile
    BLOCK_R: tl.constexpr,  # rows per loop step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # One sweep over this program's rows: each of the BLOCK_R row lanes keeps its own Welford
    # state (count, mean, M2) per channel, updated elementwise; the lanes are merged at the end.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, INT64)
    pid_r = tl.program_id(1)
    r0, r_end = _row_chunk(pid_r, R, ROWS_PER_PROG, INT64)
    count = tl.zeros([BLOCK_R, 1], dtype=tl.float32)
    mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        off, mask = _tile(rows, rmask, cols, cmask, C, L, INT64, ROW_VEC)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        valid = rmask[:, None]
        count += valid.to(tl.float32)
        delta = x - mean
        mean = tl.where(valid, mean + delta * (1.0 / tl.maximum(count, 1.0)), mean)
        m2 = tl.where(valid, m2 + delta * (x - mean), m2)
    n = tl.sum(count, axis=0)  # rows of this program: (1,)
    chunk_mean = tl.sum(count * mean, axis=0) / n
    d = mean - chunk_mean[None, :]
    chunk_m2 = tl.sum(m2 + count * d * d, axis=0)
    tl.store(PMEAN + pid_r * C + cols, chunk_mean, mask=cmask)
    tl.store(PM2 + pid_r * C + cols, chunk_m2, mask=cmask)


@triton.jit
def _chunk_sizes(ps, R, ROWS_PER_PROG):
    # Rows in chunks ps (the last chunk may be short, chunks past the end have none), (P, 1).
    # int64: ps * ROWS_PER_PROG can pass 2^31 when R is close to it.
    ps = ps.to(tl.int64)
    return tl.maximum(tl.minimum(ROWS_PER_PROG, R - ps * ROWS_PER_PROG), 0).to(tl.float32)[:, None]


@triton.jit
def _stats_combine(
    PMEAN,  # (P, C) float32: the chunks' means
    PM2,  # (P, C) float32: the chunks' sums of squared deviations
    MEAN,  # out (C,) float32: batch mean
    VAR,  # out (C,) float32: biased batch variance
    RSTD,  # out (C,) float32: 1 / sqrt(var + eps)
    P,  # row chunks
    R,  # rows per channel
    C,  # channels
    ROWS_PER_PROG,  # rows of each chunk (the last one may be short)
    eps,  # added to the variance under the square root
    BLOCK_P: tl.constexpr,  # chunks merged per loop step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # Chan et al.'s merge of the programs' (count, mean, M2), BLOCK_P partials at a time.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, False)
    total = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        n_p = _chunk_sizes(ps, R, ROWS_PER_PROG)
        mask = (ps < P)[:, None] & cmask[None, :]
        total += n_p * tl.load(PMEAN + ps[:, None] * C + cols[None, :], mask=mask, other=0.0)
    mean = tl.sum(total, axis=0) / R
    m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        n_p = _chunk_sizes(ps, R, ROWS_PER_PROG)
        mask = (ps < P)[:, None] & cmask[None, :]
        off = ps[:, None] * C + cols[None, :]
        d = tl.where(mask, tl.load(PMEAN + off, mask=mask, other=0.0) - mean[None, :], 0.0)
        m2 += tl.load(PM2 + off, mask=mask, other=0.0) + n_p * d * d
    var = tl.sum(m2, axis=0) / R
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(VAR + cols, var, mask=cmask)
    tl.store(RSTD + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)


@triton.jit
def _normalize(
    X,  # input (N, C, L) view
    Y,  # out, same layout and dtype as X
    MEAN,  # (C,) float32 batch mean
    RSTD,  # (C,) float32 1 / sqrt(var + eps)
    W,  # (C,) contiguous affine weight (unused without HAS_W)
    B,  # (C,) contiguous affine bias (unused without HAS_B)
    R,  # rows per channel: N * L
    C,  # channels
    L,  # length of the view's last axis
    ROWS_PER_PROG,  # rows of each chunk (a multiple of BLOCK_R)
    HAS_W: tl.constexpr,  # scale by W
    HAS_B: tl.constexpr,  # add B
    INT64: tl.constexpr,  # element offsets in int64
    ROW_VEC: tl.constexpr,  # contiguous aligned runs along rows, see _tile
    BLOCK_R: tl.constexpr,  # rows per loop step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # y = (x - mean) * (rstd * weight) + bias over this program's tile of rows and channels.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, INT64)
    mean = _per_channel(MEAN, cols, cmask)
    scale = _times_weight(_per_channel(RSTD, cols, cmask), W, cols, cmask, HAS_W)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        shift = _per_channel(B, cols, cmask)
    r0, r_end = _row_chunk(tl.program_id(1), R, ROWS_PER_PROG, INT64)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        off, mask = _tile(rows, rows < r_end, cols, cmask, C, L, INT64, ROW_VEC)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_partial(
    DY,  # upstream gradient, same layout as X
    X,  # forward input (N, C, L) view
    MEAN,  # (C,) float32 batch mean
    RSTD,  # (C,) float32 1 / sqrt(var + eps)
    PDB,  # out (P, C) float32: each chunk's sum of dy
    PDW,  # out (P, C) float32: each chunk's sum of dy * xhat
    R,  # rows per channel: N * L
    C,  # channels
    L,  # length of the view's last axis
    ROWS_PER_PROG,  # rows of each chunk (a multiple of BLOCK_R)
    INT64: tl.constexpr,  # element offsets in int64
    ROW_VEC: tl.constexpr,  # contiguous aligned runs along rows, see _tile
    BLOCK_R: tl.constexpr,  # rows per loop step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # This chunk's sum(dy) and sum(dy * xhat) per channel.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, INT64)
    pid_r = tl.program_id(1)
    mean = _per_channel(MEAN, cols, cmask)
    rstd = _per_channel(RSTD, cols, cmask)
    db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    r0, r_end = _row_chunk(pid_r, R, ROWS_PER_PROG, INT64)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        off, mask = _tile(rows, rows < r_end, cols, cmask, C, L, INT64, ROW_VEC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        db += dy
        dw += dy * tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    tl.store(PDB + pid_r * C + cols, tl.sum(db, axis=0), mask=cmask)
    tl.store(PDW + pid_r * C + cols, tl.sum(dw, axis=0), mask=cmask)


@triton.jit
def _backward_combine(
    PDB,  # (P, C) float32: the chunks' sums of dy
    PDW,  # (P, C) float32: the chunks' sums of dy * xhat
    DB,  # out (C,) float32: dbias = sum(dy)
    DW,  # out (C,) float32: dweight = sum(dy * xhat)
    P,  # row chunks
    C,  # channels
    BLOCK_P: tl.constexpr,  # chunks summed per loop step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # Sums the chunks' partial sums per channel.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, False)
    db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        off = ps[:, None] * C + cols[None, :]
        db += tl.load(PDB + off, mask=mask, other=0.0)
        dw += tl.load(PDW + off, mask=mask, other=0.0)
    tl.store(DB + cols, tl.sum(db, axis=0), mask=cmask)
    tl.store(DW + cols, tl.sum(dw, axis=0), mask=cmask)


@triton.jit
def _backward_dx(
    DY,  # upstream gradient, same layout as X
    X,  # forward input (N, C, L) view
    DX,  # out, same layout as X, dtype of DY
    MEAN,  # (C,) float32 batch mean
    RSTD,  # (C,) float32 1 / sqrt(var + eps)
    W,  # (C,) contiguous affine weight (unused without HAS_W)
    DB,  # (C,) float32 sum(dy)
    DW,  # (C,) float32 sum(dy * xhat)
    R,  # rows per channel: N * L
    C,  # channels
    L,  # length of the view's last axis
    ROWS_PER_PROG,  # rows of each chunk (a multiple of BLOCK_R)
    HAS_W: tl.constexpr,  # scale by W
    INT64: tl.constexpr,  # element offsets in int64
    ROW_VEC: tl.constexpr,  # contiguous aligned runs along rows, see _tile
    BLOCK_R: tl.constexpr,  # rows per loop step
    BLOCK_C: tl.constexpr,  # channels per program
):
    # dx = weight * rstd * (dy - sum(dy) / R - xhat * sum(dy * xhat) / R).
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, INT64)
    mean = _per_channel(MEAN, cols, cmask)
    rstd = _per_channel(RSTD, cols, cmask)
    g = _times_weight(rstd, W, cols, cmask, HAS_W)
    db_m = _per_channel(DB, cols, cmask) / R
    dw_m = _per_channel(DW, cols, cmask) / R
    r0, r_end = _row_chunk(tl.program_id(1), R, ROWS_PER_PROG, INT64)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        off, mask = _tile(rows, rows < r_end, cols, cmask, C, L, INT64, ROW_VEC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dx = g[None, :] * (dy - db_m[None, :] - xhat * dw_m[None, :])
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _small_forward(
    X,  # input (N, C, L) view
    Y,  # out, same layout and dtype as X
    MEAN,  # out (C,) float32 batch mean
    VAR,  # out (C,) float32 biased batch variance
    W,  # (C,) contiguous affine weight (unused without HAS_W)
    B,  # (C,) contiguous affine bias (unused without HAS_B)
    R,  # rows per channel: N * L (at most BLOCK_R)
    C,  # channels
    L,  # length of the view's last axis
    eps,  # added to the variance under the square root
    HAS_W: tl.constexpr,  # scale by W
    HAS_B: tl.constexpr,  # add B
    INT64: tl.constexpr,  # element offsets in int64
    ROW_VEC: tl.constexpr,  # contiguous aligned runs along rows, see _tile
    BLOCK_R: tl.constexpr,  # rows in the tile: all of them
    BLOCK_C: tl.constexpr,  # channels per program
):
    # Whole columns fit in one program: load x once, exact two-pass statistics in registers,
    # normalize and store. One launch; one read and one write of x.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, INT64)
    rows = tl.arange(0, BLOCK_R)
    off, mask = _tile(rows, rows < R, cols, cmask, C, L, INT64, ROW_VEC)
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / R
    d = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(d * d, axis=0) / R
    scale = _times_weight(1.0 / tl.sqrt(var + eps), W, cols, cmask, HAS_W)
    y = d * scale[None, :]
    if HAS_B:
        y += _per_channel(B, cols, cmask)[None, :]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(VAR + cols, var, mask=cmask)


@triton.jit
def _small_backward(
    DY,  # upstream gradient, same layout as X
    X,  # forward input (N, C, L) view
    DX,  # out, same layout as X, dtype of DY
    MEAN,  # (C,) float32 batch mean
    RSTD,  # (C,) float32 1 / sqrt(var + eps)
    W,  # (C,) contiguous affine weight (unused without HAS_W)
    DB,  # out (C,) float32: dbias = sum(dy)
    DW,  # out (C,) float32: dweight = sum(dy * xhat)
    R,  # rows per channel: N * L (at most BLOCK_R)
    C,  # channels
    L,  # length of the view's last axis
    HAS_W: tl.constexpr,  # scale dx by W
    INT64: tl.constexpr,  # element offsets in int64
    ROW_VEC: tl.constexpr,  # contiguous aligned runs along rows, see _tile
    BLOCK_R: tl.constexpr,  # rows in the tile: all of them
    BLOCK_C: tl.constexpr,  # channels per program
):
    # Whole columns in one program: both reductions and dx from one read of dy and x.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C, INT64)
    rows = tl.arange(0, BLOCK_R)
    off, mask = _tile(rows, rows < R, cols, cmask, C, L, INT64, ROW_VEC)
    mean = _per_channel(MEAN, cols, cmask)
    rstd = _per_channel(RSTD, cols, cmask)
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :], 0.0)
    db = tl.sum(dy, axis=0)
    dw = tl.sum(dy * xhat, axis=0)
    g = _times_weight(rstd, W, cols, cmask, HAS_W)
    dx = g[None, :] * (dy - db[None, :] / R - xhat * dw[None, :] / R)
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DB + cols, db, mask=cmask)
    tl.store(DW + cols, dw, mask=cmask)


PROGRAMS_PER_SM = 4  # chunks of rows x channel blocks: about this many programs per SM
CPU_PROGRAMS = 4  # the interpreter's "SMs" (tests raise it to exercise many partials)
COMBINE_TILE = 4096  # partial values merged per step of a combine kernel
TILE_ELEMENTS = 4096  # elements of x one program holds per loop step (BLOCK_R x BLOCK_C)
SMALL_ELEMENTS = 8192  # whole columns up to this tile size take the one-launch kernels
SMALL_MIN_COLS = 32  # ... if the tile still spans this many channels (128-byte rows: coalesced)
SMALL_WARPS = 8  # 8192 float32 values over 256 threads: 32 registers of data each
CHUNKED_WARPS = 4
INT32_LIMIT = 2**31 - 1
MAX_VEC = 16  # largest run length the vector hints claim (16 elements: 128 bits of bfloat16 is 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the float32 arithmetic serves at full precision


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: Tensor) -> bool:
    """Whether the kernels compute batch norm of x at x's precision and can run on its device.

    True for (N, C, *) input of float32, float16 or bfloat16 with at least one element, on CUDA
    (or on CPU while Triton's interpreter is on, TRITON_INTERPRET=1). False for float64 (the
    kernels compute in float32: it must stay on the tensor-op path), integer and complex dtypes,
    empty or 1D input. Any memory layout and size is supported.
    """
    return _computable(x) and (x.is_cuda or (x.device.type == "cpu" and _interpreting()))


def _computable(x: Tensor) -> bool:
    return x.dtype in DTYPES and x.dim() >= 2 and x.numel() > 0


def _check(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"torch_bn Triton kernels compute in float32 and take float32, float16 or bfloat16 "
                        f"input, not {x.dtype}: route it elsewhere (torch_bn.triton_kernels.supports(x) is False)")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"torch_bn Triton kernels need non-empty (N, C, *) input, got shape {tuple(x.shape)}")


def _ncl_layout(x: Tensor) -> tuple[int, int, int] | None:
    """(R, C, L) of x read in place as an (R // L, C, L) contiguous array, or None when x is in no
    such layout and must be copied. In order: contiguous (L = the trailing size); channel dimension
    innermost over dense rows, as channels-last 4D input or an (N, L, C) tensor transposed to
    (N, C, L) (L = 1); channel dimension outermost, as a transposed (C, N) matrix (L = R)."""
    c = x.shape[1]
    r = x.numel() // c
    if x.is_contiguous():
        return r, c, r // x.shape[0]
    if x.movedim(1, -1).is_contiguous():
        return r, c, 1
    if x.movedim(1, 0).is_contiguous():
        return r, c, r
    return None


def _kernel_input(x: Tensor) -> Tensor:
    """x itself when the kernels read it in place, else a contiguous copy."""
    return x if _ncl_layout(x) is not None else x.contiguous()


def _output_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor in the layout the kernels write for input x (x's own, as the kernels read
    in-place inputs; contiguous for inputs they copy). The fake implementations use it too, so
    that their strides are the real ops' strides."""
    if _ncl_layout(x) is None:
        return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.empty_like(x, dtype=dtype)  # dense, so empty_like keeps x's strides


def _pow2_factor(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    return min(n & -n, cap)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one forward or backward launches, for input whose in-place view is (R // L, C, L)."""

    small: bool  # whole columns fit one tile: the one-launch kernels (_small_forward / _small_backward)
    r: int  # rows per channel: N * L
    c: int  # channels
    l: int  # length of the view's last axis (1 for 2D and channels-last input)
    block_r: int  # rows per tile (small: all rows)
    block_c: int  # channels per program
    rows_per_prog: int  # chunked: rows each program reduces (a multiple of block_r); small: block_r
    partials: int  # chunked: row chunks P, whose partial results the combine kernels merge; small: 1
    block_p: int  # chunked: partials merged per step of a combine kernel; small: 1
    grid: tuple[int, ...]  # the data kernels' grid: (channel blocks,) or (channel blocks, row chunks)
    num_warps: int  # of the data kernels
    int64: bool  # element offsets in int64: tensors of about 2^31 elements or more
    row_vec: int  # aligned contiguous run length along rows claimed to the compiler (L > 1), else 1

    def kernel_layout(self) -> dict[str, object]:
        """The layout constexprs every data kernel takes."""
        return dict(INT64=self.int64, ROW_VEC=self.row_vec)


def needs_int64(r: int, c: int) -> bool:
    """Whether an (R, C) problem needs int64 element offsets: the largest index an unmasked lane
    computes is below R * C, and chunk ends and tile starts run up to about 2 R and C plus a tile."""
    return max(r * c, 2 * r, 2 * c) + 2 * max(SMALL_ELEMENTS, TILE_ELEMENTS) > INT32_LIMIT


def _block_p(p: int, block_c: int) -> int:
    """Partials merged per step: all of them when few, else a tile of about 4096 values."""
    fit = max(1, COMBINE_TILE // block_c)
    return min(triton.next_power_of_2(p), 1 << (fit.bit_length() - 1))  # powers of two for tl.arange


def _launch_config(x: Tensor, sm_count: int | None = None) -> LaunchConfig:
    """The launch for x, read in place where _ncl_layout allows, else as its contiguous copy.
    sm_count: the device's, read from x's device when not given (CPU: CPU_PROGRAMS programs)."""
    view = _ncl_layout(x)
    if view is None:
        view = _ncl_layout(torch.empty(x.shape, device="meta"))
    r, c, l_ = view
    int64 = needs_int64(r, c)

    def row_vec(block_r: int) -> int:
        # The runs _tile's hints may claim: L's power-of-two factor, within a tile.
        return _pow2_factor(l_, min(MAX_VEC, block_r)) if l_ > 1 else 1

    block_r = triton.next_power_of_2(r)
    block_c = min(triton.next_power_of_2(c), SMALL_ELEMENTS // block_r)
    # Small: the tile must still span SMALL_MIN_COLS channels when L == 1, else narrow column
    # tiles would read x with a stride of C.
    if block_c >= min(triton.next_power_of_2(c), SMALL_MIN_COLS if l_ == 1 else 1):
        return LaunchConfig(True, r, c, l_, block_r, block_c, block_r, 1, 1, (triton.cdiv(c, block_c),),
                            SMALL_WARPS, int64, row_vec(block_r))
    block_c = min(triton.next_power_of_2(c), 64 if l_ == 1 else 16)
    block_r = max(16, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(r)))
    c_blocks = triton.cdiv(c, block_c)
    if sm_count is None and x.is_cuda:
        sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    target = CPU_PROGRAMS if sm_count is None else PROGRAMS_PER_SM * sm_count
    chunks = max(1, min(triton.cdiv(r, block_r), triton.cdiv(target, c_blocks)))
    rows_per_prog = triton.cdiv(triton.cdiv(r, chunks), block_r) * block_r
    p = triton.cdiv(r, rows_per_prog)
    # Channel blocks on axis 0 (up to 2^31 - 1 programs); the row chunks (about target / c_blocks,
    # a few hundred at most) on axis 1, which CUDA limits to 65535.
    return LaunchConfig(False, r, c, l_, block_r, block_c, rows_per_prog, p, _block_p(p, block_c), (c_blocks, p),
                        CHUNKED_WARPS, int64, row_vec(block_r))


def _device_guard(device: torch.device):
    """Makes device current while the kernels launch: Triton launches on the current CUDA device,
    which need not be the tensor's. A no-op elsewhere (CPU under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _vector(v: Tensor | None) -> Tensor | None:
    """A (C,) weight or bias as the kernels read it: contiguous (a strided or expanded one is
    copied: C elements)."""
    return None if v is None else v.contiguous()


def _forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: y (x's dtype and layout), batch mean and biased var ((C,) float32)."""
    _check(x)
    y = _output_like(x)
    x = _kernel_input(x)
    weight, bias = _vector(weight), _vector(bias)
    cfg = _launch_config(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    mean, var = torch.empty(cfg.c, **f32), torch.empty(cfg.c, **f32)
    affine = dict(HAS_W=weight is not None, HAS_B=bias is not None)
    tile = dict(**cfg.kernel_layout(), BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    with _device_guard(x.device):
        if cfg.small:
            _small_forward[cfg.grid](x, y, mean, var, weight, bias, cfg.r, cfg.c, cfg.l, eps, **affine, **tile)
            return y, mean, var
        pmean, pm2 = torch.empty(cfg.partials, cfg.c, **f32), torch.empty(cfg.partials, cfg.c, **f32)
        rstd = torch.empty(cfg.c, **f32)
        _stats_partial[cfg.grid](x, pmean, pm2, cfg.r, cfg.c, cfg.l, cfg.rows_per_prog, **tile)
        _stats_combine[cfg.grid[:1]](pmean, pm2, mean, var, rstd, cfg.partials, cfg.r, cfg.c, cfg.rows_per_prog,
                                     eps, BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c)
        _normalize[cfg.grid](x, y, mean, rstd, weight, bias, cfg.r, cfg.c, cfg.l, cfg.rows_per_prog, **affine,
                             **tile)
    return y, mean, var


def _forward_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    _check(x)
    c = x.shape[1]
    return _output_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


def _backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward: dx (dy's dtype, x's layout), dweight, dbias ((C,) float32)."""
    _check(x)
    _check(dy)
    dx = _output_like(x, dtype=dy.dtype)
    x = _kernel_input(x)
    if dy.stride() != x.stride():  # an expanded or differently laid out dy: read it in x's layout
        dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
    weight = _vector(weight)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    cfg = _launch_config(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    db, dw = torch.empty(cfg.c, **f32), torch.empty(cfg.c, **f32)
    tile = dict(**cfg.kernel_layout(), BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    with _device_guard(x.device):
        if cfg.small:
            _small_backward[cfg.grid](dy, x, dx, mean, rstd, weight, db, dw, cfg.r, cfg.c, cfg.l,
                                      HAS_W=weight is not None, **tile)
            return dx, dw, db
        pdb, pdw = torch.empty(cfg.partials, cfg.c, **f32), torch.empty(cfg.partials, cfg.c, **f32)
        _backward_partial[cfg.grid](dy, x, mean, rstd, pdb, pdw, cfg.r, cfg.c, cfg.l, cfg.rows_per_prog, **tile)
        _backward_combine[cfg.grid[:1]](pdb, pdw, db, dw, cfg.partials, cfg.c, BLOCK_P=cfg.block_p,
                                        BLOCK_C=cfg.block_c)
        _backward_dx[cfg.grid](dy, x, dx, mean, rstd, weight, db, dw, cfg.r, cfg.c, cfg.l, cfg.rows_per_prog,
                               HAS_W=weight is not None, **tile)
    return dx, dw, db


def _backward_fake(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    _check(x)
    _check(dy)
    c = x.shape[1]
    return _output_like(x, dtype=dy.dtype), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


# Explicit schemas: no dependence on how a torch version infers them from the annotations.
try:
    triton_forward = torch.library.custom_op(
        "torch_bn::triton_forward", _forward, mutates_args=(),
        schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)")
    triton_forward.register_fake(_forward_fake)
    triton_backward = torch.library.custom_op(
        "torch_bn::triton_backward", _backward, mutates_args=(),
        schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight) -> (Tensor, Tensor, Tensor)")
    triton_backward.register_fake(_backward_fake)
except Exception as e:  # an unexpected torch.library: callers fall back to the tensor ops
    raise ImportError(f"torch_bn.triton_kernels could not register its custom ops on torch {torch.__version__} "
                      f"({type(e).__name__}: {e})") from e
