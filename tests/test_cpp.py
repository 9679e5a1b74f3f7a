"""The compiled CPU ops (torch_bn_cpp::batch_norm_forward / batch_norm_backward) as the bodies of
BatchNormFunction, pinned with use_path("cpp"): against float64, nn.BatchNorm and gradcheck; the
ops themselves under torch.library.opcheck; and how the library is built and loaded."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.autograd import gradcheck, gradgradcheck

import torch_bn
from torch_bn import cpp
from torch_bn.functional import batch_norm

from helpers import float64_reference

SHAPES = [(50, 100), (50, 50), (6, 3), (4, 3, 5), (3, 2, 3, 4)]


@pytest.fixture(scope="module")
def op(ops):
    """A training-mode layer, op(x, weight, bias, running_mean, running_var, momentum, eps), run by
    torch_bn.functional.batch_norm with the compiled ops pinned as BatchNormFunction's bodies."""
    def layer(x, weight, bias, running_mean, running_var, momentum, eps):
        with torch_bn.use_path("cpp"):
            y = batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        assert y.grad_fn is None or issubclass(y.grad_fn._forward_cls, torch_bn.BatchNormFunction)
        return y
    return layer


def inputs(shape, dtype, seed=0, scale=3.0, offset=1.0):
    """x, weight, bias, dy with non-trivial values, rounded to dtype (parameters in float32 for
    half-precision input, as in a module)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    w = torch.randn(c, generator=g, dtype=torch.float64).to(pdtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(pdtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def float64_grads(x, w, b, dy, eps=1e-5):
    """Gradients of the float64 definition (autograd through helpers.float64_reference)."""
    xs = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = float64_reference(xs[0], xs[1], xs[2], eps)
    return y.detach(), torch.autograd.grad(y, [t for t in xs if t is not None], dy.double())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_float64_definition(op, shape, dtype, tol, affine):
    x, w, b, dy = inputs(shape, dtype)
    if not affine:
        w = b = None
    xr = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in (w, b) if p is not None]
    y = op(xr, *(params or [None, None]), None, None, 0.1, 1e-5)
    grads = torch.autograd.grad(y, [xr, *params], dy)
    y64, grads64 = float64_grads(x, w, b, dy)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=tol, atol=tol * max(1.0, g64.abs().max().item()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_as_accurate_as_torch_nn(op, shape, dtype):
    """Output, gradients and running statistics are within 2x (+1e-6) of PyTorch's own error against
    float64, on the same rounded inputs, for float32 and half-precision input with float32 state."""
    x, w, b, dy = inputs(shape, dtype, seed=1)
    c = shape[1]
    results = {}
    for name, fn, in_dtype in (("ours", op, dtype), ("nn", torch.batch_norm, dtype), ("exact", torch.batch_norm, torch.float64)):
        pdtype = torch.float64 if in_dtype == torch.float64 else w.dtype
        xm = x.to(in_dtype).requires_grad_()
        wm, bm = w.to(pdtype).requires_grad_(), b.to(pdtype).requires_grad_()
        rm, rv = torch.linspace(-1, 1, c, dtype=pdtype), torch.linspace(0.5, 2, c, dtype=pdtype)
        if name == "ours":
            y = op(xm, wm, bm, rm, rv, 0.1, 1e-5)
        else:
            y = F.batch_norm(xm, rm, rv, wm, bm, True, 0.1, 1e-5)
        results[name] = [y, *torch.autograd.grad(y, (xm, wm, bm), dy.to(in_dtype)), rm, rv]
    for ours, theirs, exact in zip(results["ours"], results["nn"], results["exact"]):
        assert ours.dtype == theirs.dtype
        err_ours, err_theirs = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        assert err_ours <= 2 * err_theirs + 1e-6, (err_ours.item(), err_theirs.item())


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(op, shape, affine):
    """The C++ backward, and its differentiable form when the backward is itself recorded."""
    x, w, b, _ = inputs(shape, torch.float64, seed=2)
    args = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])

    def f(x, w=None, b=None):
        return op(x, w, b, None, None, 0.1, 1e-5)

    # The first-order check runs the C++ backward; check_batched_grad (vmap over the backward)
    # and gradgradcheck (a recorded backward) run the reference's, as choose_path says.
    assert gradcheck(f, args, check_batched_grad=True)
    assert gradgradcheck(f, args, check_batched_grad=True)


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0, 0.7])
@pytest.mark.parametrize("shape", [(50, 100), (4, 3, 5)])
def test_running_statistics_move_as_pytorch_moves_them(op, momentum, shape):
    """lerp with the unbiased batch variance, over several steps, as F.batch_norm."""
    c = shape[1]
    ours = [torch.linspace(-1, 1, c), torch.linspace(0.5, 2, c)]
    theirs = [t.clone() for t in ours]
    for step in range(4):
        x, w, b, _ = inputs(shape, torch.float32, seed=10 + step, offset=step)
        op(x, w, b, *ours, momentum, 1e-5)
        F.batch_norm(x, *theirs, w, b, True, momentum, 1e-5)
        for a, t in zip(ours, theirs):
            torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-6)


def test_constant_and_offset_features_in_float32(op):
    """Two passes in double: constant features give beta exactly, x = 1e4 + noise unit std."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(512, 64, generator=g)
    x[:, :3] = 5.0
    b = torch.linspace(-1, 1, 64)
    y = op(x, None, b, None, None, 0.1, 1e-5)
    assert torch.equal(y[:, :3], b[:3].expand(512, 3))
    assert (y[:, 3:].std(0, correction=0) - 1).abs().max() < 1e-4


def test_gradients_only_where_needed_and_any_layout(op):
    """x without grad (weight's gradient only); non-contiguous x and an expanded dy (sum())."""
    x, w, b, _ = inputs((8, 6), torch.float64, seed=3)
    w.requires_grad_()
    y = op(x, w, b, None, None, 0.1, 1e-5)
    (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    _, (_, gw64, _) = float64_grads(x, w.detach(), b, torch.ones_like(y))
    torch.testing.assert_close(gw, gw64)

    xt = x.t().contiguous().t().requires_grad_()  # same values, column-major
    assert not xt.is_contiguous()
    y = op(xt, w, b, None, None, 0.1, 1e-5)
    gx, gw = torch.autograd.grad((y * torch.arange(6.0, dtype=y.dtype)).sum(), (xt, w))
    _, (gx64, gw64, _) = float64_grads(x, w.detach(), b, torch.arange(6.0, dtype=y.dtype).expand(8, 6))
    torch.testing.assert_close(gx, gx64)
    torch.testing.assert_close(gw, gw64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), c=st.integers(1, 7), spatial=st.lists(st.integers(1, 4), max_size=2),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), offset=st.sampled_from([0.0, 5.0, -1e3]),
       affine=st.booleans(), eps=st.sampled_from([1e-5, 0.1]))
def test_any_shape_and_scale_float64(op, n, c, spatial, scale, offset, affine, eps):
    shape = (n, c, *spatial)
    x, w, b, dy = inputs(shape, torch.float64, seed=n * 100 + c, scale=scale, offset=offset)
    if not affine:
        w = b = None
    xr = x.clone().requires_grad_()
    y = op(xr, w, b, None, None, 0.1, eps)
    (gx,) = torch.autograd.grad(y, xr, dy)
    y64, grads64 = float64_grads(x, w, b, dy, eps)
    torch.testing.assert_close(y, y64, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx, grads64[0], rtol=1e-7, atol=1e-7 * max(1.0, grads64[0].abs().max().item()))


@pytest.mark.parametrize("x, weight, message", [
    (torch.randn(4, 3), torch.ones(5), "has 5 elements but the input has 3 channels"),
    (torch.randn(1, 3), None, "Expected more than 1 value per channel when training"),
    (torch.randn(4), None, "expects input of shape"),
    (torch.randint(0, 5, (4, 3)), None, "expects a floating-point input"),
])
def test_bad_input_raises_clear_error(ops, x, weight, message):
    """The ops check their input themselves (torch_bn.functional checks it before them)."""
    with pytest.raises(RuntimeError, match=message):
        ops.forward(x, weight, None, None, None, None, 0.1, 1e-5)


def refused_training_calls():
    """Training-mode calls that torch_bn.functional.check_input refuses, as (name, x, weight, bias,
    running_mean, running_var, eps)."""
    x, c = torch.randn(6, 4), 4
    one, zero = torch.ones(c), torch.zeros(c)
    bf = torch.randn(6, 4).bfloat16()
    return [
        ("eps zero", x, one, zero, zero.clone(), one.clone(), 0.0),
        ("eps negative", x, one, zero, zero.clone(), one.clone(), -1e-5),
        ("running_var missing", x, one, zero, zero.clone(), None, 1e-5),
        ("running_mean missing", x, one, zero, None, one.clone(), 1e-5),
        ("float64 weight", x, one.double(), zero, zero.clone(), one.clone(), 1e-5),
        ("float64 running stats", x, one, zero, zero.double(), one.double(), 1e-5),
        ("bfloat16 and float32 parameters mixed", bf, one.bfloat16(), zero, zero.clone(), one.clone(), 1e-5),
        ("float64 parameters for bfloat16 input", bf, one.double(), zero.double(), None, None, 1e-5),
        ("bias size", x, one, torch.zeros(5), zero.clone(), one.clone(), 1e-5),
        ("running_var size", x, one, zero, zero.clone(), torch.ones(5), 1e-5),
        ("one value per channel", torch.randn(1, 4), one, zero, zero.clone(), one.clone(), 1e-5),
        ("integer input", torch.randint(0, 5, (6, 4)), None, None, None, None, 1e-5),
        ("1-D input", torch.randn(6), None, None, None, None, 1e-5),
    ]


@pytest.mark.parametrize("case", range(len(refused_training_calls())))
def test_the_forward_op_refuses_what_check_input_refuses(ops, case):
    """torch_bn.functional.batch_norm runs a training-mode call on the compiled op without its
    Python checks, and runs check_input only where the op refuses: so the op must refuse every
    call check_input refuses, before it writes anything; batch_norm then raises check_input's
    error, with its type and message."""
    name, x, weight, bias, running_mean, running_var, eps = refused_training_calls()[case]
    count = torch.tensor(7)
    before = [None if t is None else t.clone() for t in (running_mean, running_var)]
    with pytest.raises(Exception) as expected:
        torch_bn.functional.check_input(x, True, eps, running_mean, running_var, weight, bias)
    with pytest.raises(RuntimeError):
        ops.forward(x, weight, bias, running_mean, running_var, count, 0.1, eps)
    assert int(count) == 7, name
    for t, b in zip((running_mean, running_var), before):
        assert t is None or torch.equal(t, b), name
    with pytest.raises(type(expected.value)) as got:
        batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, eps, num_batches_tracked=count)
    assert str(got.value) == str(expected.value), name
    assert int(count) == 7, name


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_valid_training_calls_skip_the_python_checks(ops, monkeypatch, dtype, param_dtype):
    """A valid training-mode call of a layer on CPU takes the compiled op with its C++ checks alone
    (check_input, made to fail here, is not called), forward and backward, and matches nn."""
    def not_called(*args, **kwargs):
        raise AssertionError("check_input ran on a valid training-mode call")
    x = torch.randn(8, 5, dtype=dtype)
    ours = torch_bn.BatchNorm1d(5).to(param_dtype)
    ref = torch.nn.BatchNorm1d(5).to(param_dtype)
    monkeypatch.setattr(torch_bn.functional, "check_input", not_called)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ours(xa), ref(xb)
    assert type(y.grad_fn).__name__ == "EagerBatchNormFunctionBackward"
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(xa.grad, xb.grad, atol=tol * 5, rtol=tol * 5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert int(ours.num_batches_tracked) == 1
    with torch.no_grad():
        ours(x)
    assert int(ours.num_batches_tracked) == 2


def test_bad_backward_input_raises_clear_error(ops):
    x = torch.randn(6, 3)
    _, mean, _, rstd = ops.forward(x, None, None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="gradient's dtype"):
        ops.backward(x.double(), x, None, mean, rstd, True)
    with pytest.raises(RuntimeError, match="mean and rstd must be"):
        ops.backward(x, x, None, mean.double(), rstd, True)


def opcheck_inputs():
    """(forward args, backward args) for opcheck: dtypes, layouts, with and without affine."""
    cases = []
    for shape, dtype, fmt, affine in [((6, 3), torch.float32, None, True), ((5, 4, 3), torch.float64, None, False),
                                      ((2, 3, 4, 5), torch.float32, torch.channels_last, True),
                                      ((2, 3, 2, 3, 2), torch.float64, torch.channels_last_3d, True),
                                      ((4, 3, 2), torch.bfloat16, None, True), ((8, 5), torch.float16, None, False)]:
        x, w, b, dy = inputs(shape, dtype)
        if fmt is not None:
            x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        if not affine:
            w = b = None
        strided_dy = dy.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
        c = shape[1]
        stats = (torch.zeros(c, dtype=w.dtype if affine else x.dtype), torch.ones(c, dtype=w.dtype if affine else x.dtype))
        count = torch.tensor(3) if len(cases) % 4 == 0 else None  # a module's num_batches_tracked
        running = (*stats, count) if len(cases) % 2 == 0 else (None, None, None)
        cases.append(((x, w, b, *running, 0.1, 1e-5), (dy, x, w, True), (strided_dy, x, w, False)))
    return cases


@pytest.mark.parametrize("case", range(len(opcheck_inputs())))
def test_opcheck(ops, case):
    """torch.library.opcheck: schema, fake (Meta) kernels against the real outputs' shapes,
    dtypes and strides, and torch.compile's view of the ops. The ops have no autograd formula by
    design (BatchNormFunction is the node), so the inputs do not require grad."""
    forward_args, backward_args, backward_other = opcheck_inputs()[case]
    torch.library.opcheck(ops.forward_op, forward_args)
    _, mean, _, rstd = ops.forward(*forward_args)
    for dy, x, w, need_dx in (backward_args, backward_other):
        torch.library.opcheck(ops.backward_op, (dy, x, w, mean, rstd, need_dx))


def _clone_args(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", range(len(opcheck_inputs())))
def test_bindings_compute_what_the_ops_compute(ops, case):
    """ops.forward / ops.backward (the typed bindings torch_bn calls) against the torch.ops
    overloads on copies of the same inputs: the same outputs bit for bit, the same running
    statistics and batch counter afterwards, the same layout."""
    forward_args, backward_args, _ = opcheck_inputs()[case]
    via_binding, via_op = _clone_args(forward_args), _clone_args(forward_args)
    got, want = ops.forward(*via_binding), ops.forward_op(*via_op)
    for g, w in zip(got, want):
        assert torch.equal(g, w) and g.stride() == w.stride()
    for g, w in zip(via_binding, via_op):  # running_mean, running_var, num_batches_tracked
        assert not isinstance(g, torch.Tensor) or torch.equal(g, w)
    _, mean, _, rstd = want
    dy, x, w, need_dx = backward_args
    for g, w_ in zip(ops.backward(dy, x, w, mean, rstd, need_dx), ops.backward_op(dy, x, w, mean, rstd, need_dx)):
        assert torch.equal(g, w_)


def test_ghost_bindings_compute_what_the_ops_compute(ops):
    x, w, b, dy = inputs((10, 3, 4), torch.float32)
    got, want = ops.ghost_forward(x, w, b, 4, 1e-5), ops.ghost_forward_op(x, w, b, 4, 1e-5)
    assert all(torch.equal(g, v) for g, v in zip(got, want))
    _, mean, _, rstd = want
    got = ops.ghost_backward(dy, x, w, mean, rstd, 4, True)
    assert all(torch.equal(g, v) for g, v in zip(got, ops.ghost_backward_op(dy, x, w, mean, rstd, 4, True)))


def test_bindings_go_through_the_dispatcher(ops):
    """The bindings call the ops through the dispatcher, as torch.ops does: a Python dispatch mode
    sees them, the profiler records them by name in a training step, and a refused input raises
    the op's RuntimeError with the op's message."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, _, dy = inputs((6, 3), torch.float32)
    with Seen() as seen:
        _, mean, _, rstd = ops.forward(x, w, None, None, None, None, 0.1, 1e-5)
        ops.backward(dy, x, w, mean, rstd, True)
    assert seen.names == ["torch_bn_cpp.batch_norm_forward.default", "torch_bn_cpp.batch_norm_backward.default"]

    layer = torch_bn.BatchNorm1d(3)
    with torch_bn.use_path("cpp"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x.requires_grad_()).backward(dy)
    names = {e.key for e in prof.key_averages()}
    assert {"torch_bn_cpp::batch_norm_forward", "torch_bn_cpp::batch_norm_backward"} <= names

    one = torch.randn(1, 3)
    messages = []
    for f in (ops.forward, ops.forward_op):
        with pytest.raises(RuntimeError, match="Expected more than 1 value per channel") as info:
            f(one, None, None, None, None, None, 0.1, 1e-5)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_backward_without_dx_returns_an_empty_tensor(ops):
    x, w, _, dy = inputs((6, 3), torch.float32)
    _, mean, _, rstd = ops.forward(x, w, None, None, None, None, 0.1, 1e-5)
    dx, dw, db = ops.backward(dy, x, w, mean, rstd, False)
    full = ops.backward(dy, x, w, mean, rstd, True)
    assert dx.shape == (0,)
    torch.testing.assert_close((dw, db), full[1:])


@pytest.mark.slow
def test_without_a_compiler_the_package_still_trains(tmp_path):
    """No compiler (CXX points nowhere) and no cached build: one warning saying what to do,
    op() is None, and a layer still trains, equal to nn.BatchNorm1d."""
    code = ("import warnings, torch, torch_bn\n"
            "from torch_bn import cpp\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert cpp.op() is None and cpp.op() is None\n"
            "msgs = [str(m.message) for m in w if 'torch_bn' in str(m.message)]\n"
            "assert len(msgs) == 1 and 'pip install ninja' in msgs[0], msgs\n"
            "torch.manual_seed(0)\n"
            "ours, theirs = torch_bn.BatchNorm1d(100), torch.nn.BatchNorm1d(100)\n"
            "x = torch.randn(50, 100, requires_grad=True)\n"
            "ya, yb = ours(x), theirs(x)\n"
            "torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)\n"
            "ga, gb = (torch.autograd.grad(y.square().sum(), x)[0] for y in (ya, yb))\n"
            "torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)\n"
            "torch.testing.assert_close(ours.running_var, theirs.running_var)\n"
            "print('ok')\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               TORCH_BN_CPP="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_without_autograd(op, mode):
    """Under no_grad and inference_mode (the op's CPU kernel, below autograd) the forward and the
    running statistics are those of F.batch_norm."""
    x, w, b, _ = inputs((50, 100), torch.float32, seed=4)
    ours = [torch.zeros(100), torch.ones(100)]
    theirs = [t.clone() for t in ours]
    with mode():
        y = op(x, w, b, *ours, 0.1, 1e-5)
        ref = F.batch_norm(x, *theirs, w, b, True, 0.1, 1e-5)
    assert not y.requires_grad
    torch.testing.assert_close(y, ref)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t)


@pytest.mark.parametrize("shape, fmt", [((4, 3, 5, 6), torch.channels_last), ((3, 4, 2, 3, 2), torch.channels_last_3d)])
def test_channels_last_is_read_in_place_and_kept(op, shape, fmt):
    """Channels-last input is rows of C values: computed in place, y and dx channels-last, as PyTorch."""
    x, w, b, dy = inputs(shape, torch.float64, seed=5)
    xs = x.contiguous(memory_format=fmt).requires_grad_()
    y = op(xs, w, b, None, None, 0.1, 1e-5)
    (gx,) = torch.autograd.grad(y, xs, dy.contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    y64, grads64 = float64_grads(x, w, b, dy)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, grads64[0], rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_a_built_op_loads_directly(op, tmp_path):
    """Once built, a new process loads the library itself: cpp_extension (ninja run, compiler
    probe) stays unimported; a broken library file falls back to cpp_extension, here without a
    compiler, so to the warning."""
    code = ("import sys, warnings, torch\n"
            "from torch_bn import cpp\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    found = cpp.op()\n"
            "print(found is not None, 'torch.utils.cpp_extension' in sys.modules, len(w))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["True", "False", "0"], result.stdout + result.stderr

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    folder = subprocess.run([sys.executable, "-c", "from torch_bn import cpp; print(cpp.build_directory())"],
                            capture_output=True, text=True, env=env).stdout.strip()
    assert folder.startswith(str(tmp_path))
    os.makedirs(folder)
    with open(os.path.join(folder, os.path.basename(folder) + ".so"), "wb") as f:
        f.write(b"not a library")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["False", "True", "1"], result.stdout + result.stderr


LAYER_CODE = ("import torch, torch_bn\n"
              "x = torch.randn(50, 100, dtype=torch.float64, requires_grad=True)\n"
              "with torch_bn.use_path('cpp'):\n"
              "    y = torch_bn.BatchNorm1d(100, dtype=torch.float64)(x)\n"
              "    y.square().sum().backward()\n"
              "ref = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)\n"
              "torch.testing.assert_close(y, ref)\n"
              "print('ok')\n")


@pytest.mark.slow
def test_two_processes_start_with_an_empty_cache(tmp_path):
    """`python -m torch_bn.build` and a training process start at once with an empty
    TORCH_EXTENSIONS_DIR: one builds (a line on stderr when it starts and one when it ends), the
    other waits for it and loads the same library; both finish, the layer's result equal to
    F.batch_norm's."""
    if not cpp.ENABLED:
        pytest.skip("the compiled op is switched off by TORCH_BN_CPP=0")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    procs = [subprocess.Popen([sys.executable, "-m", "torch_bn.build"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen([sys.executable, "-c", LAYER_CODE], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    (build_out, build_err), (layer_out, layer_err) = (p.communicate(timeout=900) for p in procs)
    report = "\n".join([build_out, build_err, layer_out, layer_err])
    assert [p.returncode for p in procs] == [0, 0], report
    assert layer_out.strip() == "ok", report
    stderr = build_err + layer_err
    assert stderr.count("torch_bn: building the compiled CPU op") == 1, report
    assert stderr.count("torch_bn: built the compiled CPU op in") == 1, report
    assert "TORCH_BN_CPP=0" in stderr  # the start line says how to skip the build
    libraries = list((tmp_path / "ext").rglob("*.so"))
    assert len(libraries) == 1 and str(libraries[0]) in build_out + build_err, report
    # The build command again: found, loaded, nothing rebuilt.
    again = subprocess.run([sys.executable, "-m", "torch_bn.build"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already built" in again.stdout and "building" not in again.stderr, again


def test_build_command_without_a_compiler_says_why(tmp_path):
    """No compiler and no cached build: exit status 1 and the reason, what is needed, on stderr."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(tmp_path / "no-such-compiler"))
    result = subprocess.run([sys.executable, "-m", "torch_bn.build"], env=env, capture_output=True, text=True)
    assert result.returncode == 1, result
    assert "cannot build the compiled CPU op" in result.stderr and "pip install ninja" in result.stderr, result.stderr


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="PyTorch's CPU threads are OpenMP's only in the Linux builds this test reads")
def test_the_kernels_run_on_torchs_threads(ops):
    """at::parallel_for has threads only in code compiled with -fopenmp: with 2 threads set, the
    calling thread does well under all of a large forward's and backward's CPU work (the rest
    runs on PyTorch's OpenMP threads). Built without OpenMP, it does all of it."""
    import resource
    import time

    assert "-fopenmp" in cpp.CFLAGS
    x, dy = torch.randn(4096, 1024), torch.randn(4096, 1024)
    w, b = torch.ones(1024), torch.zeros(1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops.forward(x, w, b, None, None, None, 0.0, 1e-5)
        time.sleep(0.5)  # OpenMP's threads stop spinning: their CPU time from here is our kernels'
        me0, all0 = resource.getrusage(resource.RUSAGE_THREAD), resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(20):
            _, mean, _, rstd = ops.forward(x, w, b, None, None, None, 0.0, 1e-5)
            ops.backward(dy, x, w, mean, rstd, True)
        me1, all1 = resource.getrusage(resource.RUSAGE_THREAD), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        torch.set_num_threads(threads)
    mine, total = me1.ru_utime - me0.ru_utime, all1.ru_utime - all0.ru_utime
    assert mine < 0.8 * total, f"the calling thread did {mine:.3f} s of {total:.3f} s: the kernels ran on one thread"
