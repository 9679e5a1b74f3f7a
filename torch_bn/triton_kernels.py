"""Fused Triton kernels for training-mode batch norm on CUDA (and on CPU under TRITON_INTERPRET=1).

The input is viewed as (N, C, L) (L = 1 for 2D input) and each channel reduces over the
R = N * L "rows" r = (n, l). Work is split over a 2D grid: blocks of BLOCK_C channels times
chunks of rows, so both tall-skinny (many rows, few channels) and wide shapes fill the GPU.

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
All arithmetic is float32 whatever the input dtype. The kernels are registered as
torch.library custom ops (``torch.ops.torch_bn.triton_forward`` / ``triton_backward``) so that
``torch.compile`` treats them as opaque calls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _offsets(rows, cols, C, L):
    # Element (r, c) of the (N, C, L) view with r = n * L + l.
    return (rows // L)[:, None] * (C * L) + cols[None, :] * L + (rows % L)[:, None]


@triton.jit
def _columns(pid_c, C, BLOCK_C: tl.constexpr):
    # This program's block of channels, and which of them exist.
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _row_chunk(pid_r, R, ROWS_PER_PROG):
    # This program's rows [r0, r_end) of the chunked grid.
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
def _stats_partial(X, PMEAN, PM2, R, C, L, ROWS_PER_PROG,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One sweep over this program's rows: each of the BLOCK_R row lanes keeps its own Welford
    # state (count, mean, M2) per channel, updated elementwise; the lanes are merged at the end.
    pid_r = tl.program_id(0)
    cols, cmask = _columns(tl.program_id(1), C, BLOCK_C)
    r0, r_end = _row_chunk(pid_r, R, ROWS_PER_PROG)
    count = tl.zeros([BLOCK_R, 1], dtype=tl.float32)
    mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = (rows < r_end)[:, None]
        mask = rmask & cmask[None, :]
        x = tl.load(X + _offsets(rows, cols, C, L), mask=mask, other=0.0).to(tl.float32)
        count += rmask.to(tl.float32)
        delta = x - mean
        mean = tl.where(rmask, mean + delta * (1.0 / tl.maximum(count, 1.0)), mean)
        m2 = tl.where(rmask, m2 + delta * (x - mean), m2)
    n = tl.sum(count, axis=0)  # rows of this program: (1,)
    chunk_mean = tl.sum(count * mean, axis=0) / n
    d = mean - chunk_mean[None, :]
    chunk_m2 = tl.sum(m2 + count * d * d, axis=0)
    tl.store(PMEAN + pid_r * C + cols, chunk_mean, mask=cmask)
    tl.store(PM2 + pid_r * C + cols, chunk_m2, mask=cmask)


@triton.jit
def _chunk_sizes(ps, R, ROWS_PER_PROG):
    # Rows in chunks ps (the last chunk may be short, chunks past the end have none), (P, 1).
    return tl.maximum(tl.minimum(ROWS_PER_PROG, R - ps * ROWS_PER_PROG), 0).to(tl.float32)[:, None]


@triton.jit
def _stats_combine(PMEAN, PM2, MEAN, VAR, RSTD, P, R, C, ROWS_PER_PROG, eps,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Chan et al.'s merge of the programs' (count, mean, M2), BLOCK_P partials at a time.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C)
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
def _normalize(X, Y, MEAN, RSTD, W, B, R, C, L, ROWS_PER_PROG,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols, cmask = _columns(tl.program_id(1), C, BLOCK_C)
    mean = _per_channel(MEAN, cols, cmask)
    scale = _times_weight(_per_channel(RSTD, cols, cmask), W, cols, cmask, HAS_W)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        shift = _per_channel(B, cols, cmask)
    r0, r_end = _row_chunk(tl.program_id(0), R, ROWS_PER_PROG)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        off = _offsets(rows, cols, C, L)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_partial(DY, X, MEAN, RSTD, PDB, PDW, R, C, L, ROWS_PER_PROG,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    cols, cmask = _columns(tl.program_id(1), C, BLOCK_C)
    mean = _per_channel(MEAN, cols, cmask)
    rstd = _per_channel(RSTD, cols, cmask)
    db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    r0, r_end = _row_chunk(pid_r, R, ROWS_PER_PROG)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        off = _offsets(rows, cols, C, L)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        db += dy
        dw += dy * tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    tl.store(PDB + pid_r * C + cols, tl.sum(db, axis=0), mask=cmask)
    tl.store(PDW + pid_r * C + cols, tl.sum(dw, axis=0), mask=cmask)


@triton.jit
def _backward_combine(PDB, PDW, DB, DW, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C)
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
def _backward_dx(DY, X, DX, MEAN, RSTD, W, DB, DW, R, C, L, ROWS_PER_PROG,
                 HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols, cmask = _columns(tl.program_id(1), C, BLOCK_C)
    mean = _per_channel(MEAN, cols, cmask)
    rstd = _per_channel(RSTD, cols, cmask)
    g = _times_weight(rstd, W, cols, cmask, HAS_W)
    db_m = _per_channel(DB, cols, cmask) / R
    dw_m = _per_channel(DW, cols, cmask) / R
    r0, r_end = _row_chunk(tl.program_id(0), R, ROWS_PER_PROG)
    for start in range(r0, r_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        off = _offsets(rows, cols, C, L)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dx = g[None, :] * (dy - db_m[None, :] - xhat * dw_m[None, :])
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _small_forward(X, Y, MEAN, VAR, W, B, R, C, L, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Whole columns fit in one program: load x once, exact two-pass statistics in registers,
    # normalize and store. One launch; one read and one write of x.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    mask = (rows < R)[:, None] & cmask[None, :]
    off = _offsets(rows, cols, C, L)
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
def _small_backward(DY, X, DX, MEAN, RSTD, W, DB, DW, R, C, L,
                    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Whole columns in one program: both reductions and dx from one read of dy and x.
    cols, cmask = _columns(tl.program_id(0), C, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    mask = (rows < R)[:, None] & cmask[None, :]
    off = _offsets(rows, cols, C, L)
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


def _view(x: Tensor) -> tuple[int, int, int]:
    """R, C, L of the (N, C, L) view the kernels index: R = N * L rows per channel."""
    l_ = x[0, 0].numel() if x.dim() > 2 else 1
    return x.shape[0] * l_, x.shape[1], l_


def _launch_config(x: Tensor, sm_count: int | None = None) -> tuple[int, int, int, int, int, int]:
    """R, C, L, block sizes and rows per program for the (row chunk, channel block) grid.
    sm_count: the device's, read from x's device when not given (CPU: CPU_PROGRAMS programs)."""
    r, c, l_ = _view(x)
    block_c = min(triton.next_power_of_2(c), 64 if l_ == 1 else 16)
    block_r = max(16, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(r)))
    c_blocks = triton.cdiv(c, block_c)
    if sm_count is None and x.is_cuda:
        sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    target = CPU_PROGRAMS if sm_count is None else PROGRAMS_PER_SM * sm_count
    chunks = max(1, min(triton.cdiv(r, block_r), triton.cdiv(target, c_blocks)))
    rows_per_prog = triton.cdiv(triton.cdiv(r, chunks), block_r) * block_r
    return r, c, l_, block_r, block_c, rows_per_prog


def _small_config(x: Tensor) -> tuple[int, int, int, int, int] | None:
    """R, C, L, BLOCK_R, BLOCK_C for the one-launch kernels when whole columns fit a tile, else None."""
    r, c, l_ = _view(x)
    block_r = triton.next_power_of_2(r)
    block_c = min(triton.next_power_of_2(c), SMALL_ELEMENTS // block_r)
    if block_c < min(triton.next_power_of_2(c), SMALL_MIN_COLS if l_ == 1 else 1):
        return None  # too many rows: a narrow column tile would read x with a stride of C
    return r, c, l_, block_r, block_c


def _block_p(p: int, block_c: int) -> int:
    """Partials merged per step: all of them when few, else a tile of about 4096 values."""
    fit = max(1, COMBINE_TILE // block_c)
    return min(triton.next_power_of_2(p), 1 << (fit.bit_length() - 1))  # powers of two for tl.arange


@torch.library.custom_op("torch_bn::triton_forward", mutates_args=())
def triton_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: y (like x), batch mean and biased var (C,, float32)."""
    x = x.contiguous()
    f32 = dict(dtype=torch.float32, device=x.device)
    small = _small_config(x)
    if small is not None:
        r, c, l_, block_r, block_c = small
        y, mean, var = torch.empty_like(x), torch.empty(c, **f32), torch.empty(c, **f32)
        _small_forward[(triton.cdiv(c, block_c),)](x, y, mean, var, weight, bias, r, c, l_, eps,
                                                   HAS_W=weight is not None, HAS_B=bias is not None,
                                                   BLOCK_R=block_r, BLOCK_C=block_c, num_warps=SMALL_WARPS)
        return y, mean, var
    r, c, l_, block_r, block_c, rows = _launch_config(x)
    p = triton.cdiv(r, rows)
    pmean, pm2 = torch.empty(p, c, **f32), torch.empty(p, c, **f32)
    mean, var, rstd = torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(c, **f32)
    grid = (p, triton.cdiv(c, block_c))
    _stats_partial[grid](x, pmean, pm2, r, c, l_, rows, BLOCK_R=block_r, BLOCK_C=block_c)
    _stats_combine[(grid[1],)](pmean, pm2, mean, var, rstd, p, r, c, rows, eps,
                               BLOCK_P=_block_p(p, block_c), BLOCK_C=block_c)
    y = torch.empty_like(x)
    _normalize[grid](x, y, mean, rstd, weight, bias, r, c, l_, rows, HAS_W=weight is not None,
                     HAS_B=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return y, mean, var


@triton_forward.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32))


@torch.library.custom_op("torch_bn::triton_backward", mutates_args=())
def triton_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward: dx (like dy), dweight, dbias (C,, float32)."""
    dy, x = dy.contiguous(), x.contiguous()
    f32 = dict(dtype=torch.float32, device=x.device)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    small = _small_config(x)
    if small is not None:
        r, c, l_, block_r, block_c = small
        dx, db, dw = torch.empty_like(dy), torch.empty(c, **f32), torch.empty(c, **f32)
        _small_backward[(triton.cdiv(c, block_c),)](dy, x, dx, mean, rstd, weight, db, dw, r, c, l_,
                                                    HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                                                    num_warps=SMALL_WARPS)
        return dx, dw, db
    r, c, l_, block_r, block_c, rows = _launch_config(x)
    p = triton.cdiv(r, rows)
    pdb, pdw = torch.empty(p, c, **f32), torch.empty(p, c, **f32)
    db, dw = torch.empty(c, **f32), torch.empty(c, **f32)
    grid = (p, triton.cdiv(c, block_c))
    _backward_partial[grid](dy, x, mean, rstd, pdb, pdw, r, c, l_, rows, BLOCK_R=block_r, BLOCK_C=block_c)
    _backward_combine[(grid[1],)](pdb, pdw, db, dw, p, c, BLOCK_P=_block_p(p, block_c), BLOCK_C=block_c)
    dx = torch.empty_like(dy)
    _backward_dx[grid](dy, x, dx, mean, rstd, weight, db, dw, r, c, l_, rows, HAS_W=weight is not None,
                       BLOCK_R=block_r, BLOCK_C=block_c)
    return dx, dw, db


@triton_backward.register_fake
def _(dy, x, mean, rstd, weight):
    c = x.shape[1]
    return torch.empty_like(dy), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)
