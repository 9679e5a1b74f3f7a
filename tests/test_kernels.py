"""The compiled CPU kernels (csrc/kernels.cpp) on every kind of input they have a loop for: the
"rows" loop ((R, C) row-major: 2D and channels-last input) and the "planes" loop ((N, C, L),
L > 1: contiguous NC*), at sizes that cross their tile edges (32 rows, 1024 channels, 2048 values
of a run, a partial last vector) and split over threads; float64, float32, float16, bfloat16.

Every test calls the ops directly (torch.ops.torch_bn_cpp.batch_norm_forward / _backward) or pins
them with use_path("cpp"), and compares with batch norm written from its equations in float64
(helpers.float64_reference, gradients by autograd through it) or with nn's own error against
float64 on the same input.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from torch.autograd import gradcheck
from torch.testing._internal.common_methods_invocations import op_db

import torch_bn
from torch_bn import cpp
from torch_bn.functional import batch_norm

from helpers import float64_reference

EPS = 1e-5
# (shape, layout) covering both loops and their edges; "strided" is a non-contiguous view.
CASES = [
    ((50, 100), "contiguous"), ((50, 50), "contiguous"), ((2, 1), "contiguous"), ((1000, 3), "contiguous"),
    ((70, 17), "contiguous"), ((33, 1030), "contiguous"), ((600, 130), "strided"),
    ((40, 48), "contiguous"), ((9, 1041), "contiguous"),  # rows of full packs only; a second tile of both
    ((4, 3, 5), "contiguous"), ((3, 2, 2100), "contiguous"), ((2, 3, 4100), "contiguous"), ((300, 2, 3), "contiguous"),
    ((4, 6, 5, 3), "contiguous"), ((2, 16, 8, 8), "contiguous"), ((4, 6, 5, 3), "channels_last"),
    ((8, 40, 6, 6), "channels_last"), ((2, 3, 4, 5, 6), "contiguous"), ((2, 3, 4, 5, 6), "channels_last"),
    ((5, 1030, 1, 1), "contiguous"), ((3, 5, 7, 2), "strided"),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def laid_out(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # same values, reversed order of dimensions in memory
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    return t.contiguous()


def make(shape, dtype, layout="contiguous", seed=0, scale=3.0, offset=1.0):
    """x, dy laid out as asked, in dtype; weight, bias (C,) in the op-math dtype."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).to(acc)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(acc)
    return laid_out(x, layout), laid_out(dy, layout), w, b


def equations(x, w, b, dy):
    """Float64 y, mean, biased var and the gradients (dx, dw, db) of the defining equations."""
    dims = [0] + list(range(2, x.dim()))
    xs = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = float64_reference(xs[0], xs[1], xs[2], EPS)
    grads = torch.autograd.grad(y, [t for t in xs if t is not None], dy.double())
    x64 = x.double()
    return (y.detach(), x64.mean(dims), x64.var(dims, correction=0), *grads)


def forward(ops, x, w, b):
    """y, mean, var, rstd of the forward op (no running statistics)."""
    return ops.forward(x, w, b, None, None, None, 0.1, EPS)


def ulp(dtype):
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", CASES)
def test_forward_and_backward_match_the_equations(ops, shape, layout, dtype):
    x, dy, w, b = make(shape, dtype, layout)
    y, mean, var, rstd = forward(ops, x, w, b)
    dx, dw, db = ops.backward(dy, x, w, mean, rstd, True)
    y64, mean64, var64, dx64, dw64, db64 = equations(x, w, b, dy)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    assert mean.dtype == var.dtype == rstd.dtype == dw.dtype == db.dtype == acc
    if layout == "channels_last":  # read in place, output in the input's layout
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    else:
        assert y.is_contiguous() and dx.is_contiguous()
    # Statistics in double: mean and var to the op-math type's rounding; y and dx to one rounding
    # of the result (plus the op-math arithmetic, float32 for the 16-bit types).
    tol = 1e-12 if dtype == torch.float64 else 4e-6
    m = x.numel() // x.shape[1]
    torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=tol * 4)
    torch.testing.assert_close(var.double(), var64, rtol=tol * 4, atol=0)
    torch.testing.assert_close(rstd.double(), (var64 + EPS).rsqrt(), rtol=tol * 4, atol=0)
    out_tol = max(tol, ulp(dtype))
    scale_y = y64.abs().max().item()
    assert (y.double() - y64).abs().max().item() <= out_tol * 2 * scale_y
    # dx is a difference of terms of size rstd * |weight| * |dy|: its rounding is relative to them.
    terms = ((var64 + EPS).rsqrt() * w.double().abs()).max().item() * dy.double().abs().max().item()
    assert (dx.double() - dx64).abs().max().item() <= out_tol * 4 * max(terms, dx64.abs().max().item())
    # dweight, dbias: sums over m values of dy (rounded to dtype) times xhat.
    sum_tol = tol * 4 * max(1.0, m ** 0.5)
    torch.testing.assert_close(dw.double(), dw64, rtol=sum_tol, atol=sum_tol * dy.double().abs().sum(
        [0] + list(range(2, x.dim()))).max().item())
    torch.testing.assert_close(db.double(), db64, rtol=sum_tol, atol=sum_tol * m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, layout", [((2, 16, 8, 8), "contiguous"), ((3, 2, 2100), "contiguous"),
                                           ((4, 3, 5), "contiguous"), ((50, 100), "contiguous"),
                                           ((8, 40, 6, 6), "channels_last")])
def test_16_bit_outputs_are_rounded_to_nearest(ops, shape, layout, dtype):
    """y in float16/bfloat16 is the value nearest the float64 result, except where that result lies
    within the float32 arithmetic's error of a midpoint between two neighbours (the planes loop
    writes bfloat16 with its own rounding of even and odd values); a NaN stays NaN."""
    x, dy, w, b = make(shape, dtype, layout)
    x[(0,) * x.dim()] = float("nan")  # channel 0's statistics NaN, so all its y; the others untouched
    y = forward(ops, x, w, b)[0]
    y64 = equations(x, w, b, dy)[0]
    assert y.select(1, 0).isnan().all() and not y.narrow(1, 1, shape[1] - 1).isnan().any()
    y, y64 = y.narrow(1, 1, shape[1] - 1).double(), y64.narrow(1, 1, shape[1] - 1)
    nearest = y64.to(dtype).double()
    differ = y != nearest
    terms = (x.narrow(1, 1, shape[1] - 1).double().abs().max() * w.double().abs().max() * 10 + b.double().abs().max())
    slack = 8 * 2.0 ** -24 * terms.item()  # float32 arithmetic on terms of that size
    assert ((y64 - (y + nearest) / 2).abs()[differ] <= slack).all(), (y[differ], nearest[differ], y64[differ])
    assert differ.double().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, layout", CASES)
def test_as_accurate_as_nn(ops, shape, layout, dtype):
    """y and the gradients within 2x of nn's own error against float64 (plus one unit of rounding)."""
    x, dy, w, b = make(shape, dtype, layout, seed=1)
    xg = x.detach().clone().requires_grad_()
    with torch_bn.use_path("cpp"):
        y = batch_norm(xg, None, None, w.clone().requires_grad_(), b.clone().requires_grad_(), True, 0.1, EPS)
    assert type(y.grad_fn).__name__.endswith("BatchNormFunctionBackward")
    ours = [y, *torch.autograd.grad(y, [xg], dy)]
    xn = x.detach().clone().requires_grad_()
    yn = F.batch_norm(xn, None, None, w.to(dtype), b.to(dtype), True, 0.1, EPS)
    theirs = [yn, *torch.autograd.grad(yn, [xn], dy)]
    y64, _, _, dx64, _, _ = equations(x, w, b, dy)
    for o, t, e in zip(ours, theirs, [y64, dx64]):
        err, err_nn = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * err_nn + ulp(dtype) * e.abs().max().item(), (err, err_nn)


@pytest.mark.parametrize("shape", [(4096, 64), (50, 100), (1000, 3), (8, 4, 16, 16)])
def test_far_from_zero_keeps_its_accuracy(ops, shape):
    """x = 1e6 + randn in float32: y within 0.05 of float64 (issue 18's bound; nn: about 2.6 at
    (4096, 64)); measured about 5e-7, so the test holds it to 1e-4."""
    x = 1e6 + torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = forward(ops, x, None, None)[0]
    err = (y.double() - float64_reference(x, None, None, EPS)).abs().max().item()
    assert err <= 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_an_outlier_first_in_a_tile_keeps_the_variance(ops, layout):
    """Each tile's centre is its own mean, not its first value: an outlier there costs nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, 6, 6, generator=g)
    x[::32] += 1e4  # the first row of every 32-row tile
    x = laid_out(x, layout)
    _, mean, var, _ = forward(ops, x, None, None)
    x64 = x.double()
    torch.testing.assert_close(var.double(), x64.var([0, 2, 3], correction=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean([0, 2, 3]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["trend", "outlier block first"])
@pytest.mark.parametrize("shape, layout, first_tile", [((4096, 8), "contiguous", 32),
                                                       ((1024, 8, 2, 2), "channels_last", 8),
                                                       ((256, 4, 8, 8), "contiguous", 32)])
def test_a_far_centre_keeps_the_variance(ops, shape, layout, first_tile, case):
    """Tiles after the first (rows: 32 rows; planes: 2048 values of a channel, here 32 samples)
    take deviations from the mean of the values before them: data whose values drift along the
    batch (a trend of 100 a sample, as in sorted data) or whose first tile is far from the rest
    (1e4 against randn) puts that centre far from a tile's values, and the mean and variance still
    keep float precision (their error stays a few eps of what the merge adds for that tile)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if case == "trend":
        x += 100 * torch.arange(shape[0], dtype=torch.float32).view([-1] + [1] * (len(shape) - 1))
    else:
        x[:first_tile] += 1e4  # the samples of the first tile
    x = laid_out(x, layout)
    _, mean, var, _ = forward(ops, x, None, None)
    dims = [0, *range(2, len(shape))]
    x64 = x.double()
    torch.testing.assert_close(var.double(), x64.var(dims, correction=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean(dims), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [((64, 10), "contiguous"), ((4096, 3), "contiguous"),
                                           ((8, 4, 9, 9), "contiguous"), ((8, 4, 9, 9), "channels_last")])
def test_constant_features_give_exactly_beta(ops, shape, layout, dtype):
    x = torch.full(shape, 0.1, dtype=dtype)
    x[:, 1] = 12345.678
    x = laid_out(x, layout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.linspace(0.5, 2, shape[1], dtype=acc), torch.linspace(-1, 1, shape[1], dtype=acc)
    y, _, var, _ = forward(ops, x, w, b)
    beta = b.to(dtype).view([1, -1] + [1] * (len(shape) - 2)).expand(shape)
    assert torch.equal(var, torch.zeros_like(var))
    assert torch.equal(y, beta)


@pytest.mark.parametrize("shape, layout", [((4096, 64), "contiguous"), ((512, 300), "contiguous"),
                                           ((16, 8, 32, 32), "contiguous"), ((64, 32, 8, 8), "channels_last"),
                                           ((4096, 600), "contiguous"), ((16, 40, 64, 64), "channels_last")])
def test_one_and_two_threads_agree_with_the_equations(ops, shape, layout):
    """Large enough to split over two threads (rows: row chunks merged afterwards; planes: channels);
    the last two make y and dx of 9-10 MiB, which the kernels back by transparent huge pages."""
    x, dy, w, b = make(shape, torch.float32, layout, seed=2)
    y64, mean64, var64, dx64, dw64, db64 = equations(x, w, b, dy)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y, mean, var, rstd = forward(ops, x, w, b)
            dx, dw, db = ops.backward(dy, x, w, mean, rstd, True)
            torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-5 * y64.abs().max().item())
            torch.testing.assert_close(var.double(), var64, rtol=1e-6, atol=0)
            torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=1e-5 * dx64.abs().max().item())
            torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


def test_without_weight_bias_or_dx(ops):
    x, dy, _, _ = make((20, 30), torch.float32)
    y, mean, var, rstd = forward(ops, x, None, None)
    torch.testing.assert_close(y.double(), float64_reference(x, None, None, EPS), rtol=0, atol=2e-6)
    dx, dw, db = ops.backward(dy, x, None, mean, rstd, False)
    assert dx.numel() == 0
    torch.testing.assert_close(db.double(), dy.double().sum(0), rtol=1e-6, atol=1e-5)
    xhat = (x.double() - x.double().mean(0)) / (x.double().var(0, correction=0) + EPS).sqrt()
    torch.testing.assert_close(dw.double(), (dy.double() * xhat).sum(0), rtol=1e-5, atol=1e-5)


def test_a_gradient_in_another_layout_or_expanded(ops):
    """dy need not share x's layout: an expanded (stride 0) or contiguous dy for channels-last x."""
    x, _, w, b = make((4, 6, 5, 3), torch.float32, "channels_last")
    _, mean, _, rstd = forward(ops, x, w, b)
    for dy in (torch.ones(()).expand(x.shape), torch.randn(x.shape)):
        dx, dw, db = ops.backward(dy, x, w, mean, rstd, True)
        _, _, _, dx64, dw64, db64 = equations(x, w, b, dy)
        torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=1e-5)
        torch.testing.assert_close(db.double(), db64, rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 70), c=st.integers(1, 40), spatial=st.lists(st.integers(1, 9), max_size=3),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       dtype=st.sampled_from([torch.float64, torch.float32]),
       offset=st.sampled_from([0.0, 5.0, -1e3]), seed=st.integers(0, 2**16))
@example(n=2, c=26, spatial=[], layout="contiguous", dtype=torch.float32, offset=0.0, seed=1521)  # var near eps
@example(n=2, c=10, spatial=[], layout="contiguous", dtype=torch.float32, offset=-1e3, seed=5386)  # small var at -1000
def test_any_shape(ops, n, c, spatial, layout, dtype, offset, seed):
    shape = (n, c, *spatial)
    if layout == "channels_last" and len(shape) not in (4, 5):
        layout = "contiguous"
    x, dy, w, b = make(shape, dtype, layout, seed=seed, offset=offset)
    y, mean, var, rstd = forward(ops, x, w, b)
    dx, dw, db = ops.backward(dy, x, w, mean, rstd, True)
    y64, mean64, var64, dx64, dw64, db64 = equations(x, w, b, dy)
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    scale = max(1.0, abs(offset))
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=tol * y64.abs().max().item())
    torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=tol * scale)
    # dx of a channel whose variance is near eps is ill-conditioned (few samples: 1 - xhat^2 cancels),
    # and xhat itself is only as good as x - mean in the input's precision: a channel of variance
    # 3e-3 at -1000 has float32 x and mean 6e-5 apart per unit of rounding, xhat off by 1e-3, and
    # dweight = sum(dy * xhat) with it (nn's as much). There the bound is twice nn's own error.
    xn = x.detach().clone().requires_grad_()
    wn = None if w is None else w.detach().clone().requires_grad_()
    torch.nn.functional.batch_norm(xn, None, None, wn, b, True, 0.1, EPS).backward(dy)
    err_nn = (xn.grad.double() - dx64).abs().max().item()
    atol_dx = max(tol * (1 + dx64.abs().max().item()) * scale, 2 * err_nn)
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=atol_dx)
    torch.testing.assert_close(db.double(), db64, rtol=0, atol=tol * dy.double().abs().sum().item())
    err_nn_w = 0.0 if wn is None else (wn.grad.double() - dw64).abs().max().item()
    atol_dw = max(tol * (1 + dy.double().abs().sum().item()), 2 * err_nn_w)
    torch.testing.assert_close(dw.double(), dw64, rtol=0, atol=atol_dw)


@pytest.mark.parametrize("shape, layout", [((6, 40), "contiguous"), ((40, 3), "contiguous"), ((3, 4, 5), "contiguous"),
                                           ((2, 3, 4, 4), "channels_last"), ((2, 2, 3, 2, 2), "channels_last")])
def test_gradcheck_through_the_op(ops, shape, layout):
    x, _, w, b = make(shape, torch.float64, layout, seed=4)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]

    def layer(x, w, b):
        with torch_bn.use_path("cpp"):
            y = batch_norm(x, None, None, w, b, True, 0.1, EPS)
        assert type(y.grad_fn).__name__.endswith("BatchNormFunctionBackward")
        return y

    assert gradcheck(layer, tuple(leaves))


OP = next(op for op in op_db if op.name == "nn.functional.batch_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pytorch_sample_inputs_within_twice_nns_error(ops, dtype):
    """PyTorch's OpInfo samples of nn.functional.batch_norm in training mode, on the compiled path:
    y and the input's gradient within 2x of nn's error against float64, plus 4 units of rounding
    at the result's scale."""
    checked = 0
    for s in OP.sample_inputs("cpu", dtype, requires_grad=True):
        if not s.kwargs.get("training", False) or s.input.numel() == 0:
            continue
        rm, rv, w, b = s.args

        def run(fn, dt, path="auto"):
            x = s.input.detach().clone().to(dt).requires_grad_()
            conv = [None if t is None else t.detach().clone().to(dt) for t in (rm, rv, w, b)]
            with torch_bn.use_path(path):
                y = fn(x, *conv, **s.kwargs)
            dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.dtype)
            return y.detach(), torch.autograd.grad(y, x, dy)[0]

        ours = run(torch_bn.functional.batch_norm, dtype, "cpp")
        theirs = run(F.batch_norm, dtype)
        exact = run(F.batch_norm, torch.float64)
        for o, t, e in zip(ours, theirs, exact):
            err, err_nn = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
            assert err <= 2 * err_nn + 4 * ulp(dtype) * max(1.0, e.abs().max().item()), (s.input.shape, err, err_nn)
        checked += 1
    assert checked >= 3


def test_cpu_flags_follow_atens_capability_and_name_the_build(monkeypatch):
    """AVX2 flags only where ATen itself runs AVX2/AVX-512 on an x86 CPU; the flags are part of the
    build's name, so a build for one CPU is never loaded on a CPU that lacks its instructions."""
    monkeypatch.setattr(cpp.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert cpp.cpu_flags() == []
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert {"-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"} <= set(cpp.cpu_flags())
    monkeypatch.setattr(cpp.platform, "machine", lambda: "aarch64")
    assert cpp.cpu_flags() == []
    name = cpp.extension_name()
    monkeypatch.setattr(cpp, "CFLAGS", [*cpp.CFLAGS, "-mavx2"] if "-mavx2" not in cpp.CFLAGS else ["-O3"])
    assert cpp.extension_name() != name
