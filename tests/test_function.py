"""BatchNormFunction and torch_bn.functional: gradients, the notebook's checks, numerics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_bn
from torch_bn.functional import batch_norm

from helpers import float64_inputs, float64_reference

SHAPES = [(6, 3), (4, 3, 5), (3, 2, 3, 4)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The notebook's relative error: max |a - b| / max(1e-8, |a| + |b|)."""
    return ((a - b).abs() / (a.abs() + b.abs()).clamp_min(1e-8)).max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("backward", ["closed_form", "staged"])
def test_gradcheck_and_gradgradcheck(shape, training, affine, backward):
    x, w, b, rm, rv = float64_inputs(shape, affine)

    def f(x, w, b):
        # Copies so the in-place running-statistics update does not change later calls.
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backward=backward)

    inputs = (x, w, b)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("shape", SHAPES)
def test_function_matches_float64_definition(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4 + 7
    w = torch.randn(shape[1], generator=g, dtype=torch.float64)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    y, mean, var = torch_bn.BatchNormFunction.apply(x, w, b, 1e-5, "closed_form")
    torch.testing.assert_close(y, float64_reference(x, w, b, 1e-5), rtol=1e-12, atol=1e-12)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean, x.mean(dims))
    torch.testing.assert_close(var, x.var(dims, correction=0))
    assert not mean.requires_grad and not var.requires_grad


def notebook_activations(rng: np.random.RandomState, w1, w2, n=200, d1=50):
    """The notebook's two-layer activations a = relu(X W1) W2 for a fresh batch X."""
    x = rng.randn(n, d1)
    return torch.from_numpy(np.maximum(0, x.dot(w1)).dot(w2))


def test_notebook_train_forward_means_and_stds():
    rng = np.random.RandomState(231)
    n, d1, d2, d3 = 200, 50, 60, 3
    x = rng.randn(n, d1)
    w1, w2 = rng.randn(d1, d2), rng.randn(d2, d3)
    a = torch.from_numpy(np.maximum(0, x.dot(w1)).dot(w2))
    assert a.std(0).min() > 10  # the raw activations are far from unit scale

    out = batch_norm(a, None, None, torch.ones(d3, dtype=a.dtype), torch.zeros(d3, dtype=a.dtype), True)
    torch.testing.assert_close(out.mean(0), torch.zeros(d3, dtype=a.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.std(0, correction=0), torch.ones(d3, dtype=a.dtype), rtol=0, atol=1e-6)

    gamma = torch.tensor([1.0, 2.0, 3.0], dtype=a.dtype)
    beta = torch.tensor([11.0, 12.0, 13.0], dtype=a.dtype)
    out = batch_norm(a, None, None, gamma, beta, True)
    torch.testing.assert_close(out.mean(0), beta, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.std(0, correction=0), gamma, rtol=0, atol=1e-6)


def test_notebook_test_time_forward_after_warmup():
    rng = np.random.RandomState(231)
    d1, d2, d3 = 50, 60, 3
    w1, w2 = rng.randn(d1, d2), rng.randn(d2, d3)
    bn = torch_bn.BatchNorm1d(d3, dtype=torch.float64)
    for _ in range(50):
        bn(notebook_activations(rng, w1, w2))
    bn.eval()
    with torch.no_grad():
        out = bn(notebook_activations(rng, w1, w2))
    # The notebook's figures: means within ~0.15 of 0, stds within ~0.05 of 1 (noisier than training).
    assert out.mean(0).abs().max() < 0.15
    assert (out.std(0, correction=0) - 1).abs().max() < 0.05


def test_closed_form_and_staged_backward_agree():
    rng = np.random.RandomState(231)
    n, d = 100, 500
    x = torch.from_numpy(5 * rng.randn(n, d) + 12).requires_grad_()
    gamma = torch.from_numpy(rng.randn(d)).requires_grad_()
    beta = torch.from_numpy(rng.randn(d)).requires_grad_()
    dout = torch.from_numpy(rng.randn(n, d))
    grads = {}
    for backward in ["closed_form", "staged"]:
        y = batch_norm(x, None, None, gamma, beta, True, backward=backward)
        grads[backward] = torch.autograd.grad(y, (x, gamma, beta), dout)
    for a, b in zip(grads["closed_form"], grads["staged"]):
        assert rel_error(a, b) < 1e-11  # the notebook: 9e-13 for dx, 0 for dgamma and dbeta


def test_notebook_numerical_gradient_check():
    """The notebook's check 1.2: the analytic gradient against central differences (the notebook: dx error 1.7e-9)."""
    rng = np.random.RandomState(231)
    x = torch.from_numpy(5 * rng.randn(4, 5) + 12).requires_grad_()
    gamma = torch.from_numpy(rng.randn(5)).requires_grad_()
    beta = torch.from_numpy(rng.randn(5)).requires_grad_()
    dout = torch.from_numpy(rng.randn(4, 5))
    analytic = torch.autograd.grad(batch_norm(x, None, None, gamma, beta, True), (x, gamma, beta), dout)
    for i, t in enumerate((x, gamma, beta)):
        numeric = torch.zeros_like(t)
        h = 1e-5
        with torch.no_grad():
            flat = t.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + h
                pos = (batch_norm(x, None, None, gamma, beta, True) * dout).sum()
                flat[j] = old - h
                neg = (batch_norm(x, None, None, gamma, beta, True) * dout).sum()
                flat[j] = old
                numeric.view(-1)[j] = (pos - neg) / (2 * h)
        assert rel_error(numeric, analytic[i]) < 1e-7


def test_large_offset_is_stable_in_float32():
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(512, 64, generator=g)
    y = batch_norm(x, None, None, None, None, True)
    assert (y.std(0, correction=0) - 1).abs().max() < 1e-3
    # The naive E[x^2] - E[x]^2 loses every digit here; prove the test would catch it.
    naive_var = (x * x).mean(0) - x.mean(0) ** 2
    assert (naive_var - x.var(0, correction=0)).abs().max() > 1


def test_constant_feature_gives_beta_and_finite_gradients():
    x = torch.full((8, 3), 5.0)
    x[:, 0] = torch.arange(8.0)  # one varying feature beside two constant ones
    x.requires_grad_()
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = torch.tensor([0.5, -1.0, 4.0], requires_grad=True)
    for backward in ["closed_form", "staged"]:
        y = batch_norm(x, None, None, w, b, True, backward=backward)
        torch.testing.assert_close(y[:, 1:], b[1:].detach().expand(8, 2))
        grads = torch.autograd.grad(y, (x, w, b), torch.randn(8, 3))
        assert all(torch.isfinite(g).all() for g in grads)


def test_running_stats_update_matches_pytorch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    ours = (torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64))
    theirs = tuple(t.clone() for t in ours)
    y = batch_norm(x, *ours, training=True, momentum=0.3)
    ref = F.batch_norm(x, *theirs, training=True, momentum=0.3)
    torch.testing.assert_close(y, ref)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_eval_mode_matches_pytorch_with_gradients():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    dy = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    y = batch_norm(x, rm, rv, w, b, False)
    ref = F.batch_norm(x, rm, rv, w, b, False)
    torch.testing.assert_close(y, ref)
    for a, c in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(ref, (x, w, b), dy)):
        torch.testing.assert_close(a, c)


def test_unknown_backward_is_rejected():
    with pytest.raises(ValueError, match="backward must be one of"):
        batch_norm(torch.randn(4, 3), None, None, training=True, backward="fast")


def test_gradient_dtypes_follow_their_parameters():
    x = torch.randn(6, 3, dtype=torch.float16, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float32, requires_grad=True)  # bias without weight
    y = batch_norm(x, None, None, None, b, True)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, torch.full((3,), 6.0, dtype=torch.float32))


# Each path pinned ---------------------------------------------------------------------------
# torch_bn.use_path pins the body BatchNormFunction runs, so each is checked whatever the machine
# would pick: the reference ops, the compiled CPU op and the slab-fused ops here; the Triton
# kernels in tests/test_triton.py (Triton's interpreter on CPU).

def pinned(path):
    """use_path(path), or a skip that says why the path is missing here."""
    if path == "cpp" and torch_bn.cpp.op() is None:
        pytest.skip("the compiled op is switched off (TORCH_BN_CPP=0) or cannot be built here")
    return torch_bn.use_path(path)


CPU_PATHS = ["reference", "cpp", "fused"]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_each_path_gradcheck(path, shape, affine):
    """First-order gradients of the pinned body (gradgradcheck: the recorded backward is the
    reference's on every path, checked here too), through functional.batch_norm with running
    statistics and through BatchNormFunction itself."""
    x, w, b, rm, rv = float64_inputs(shape, affine)

    def f(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)

    with pinned(path):
        assert gradcheck(f, (x, w, b))
        assert gradcheck(lambda x, w, b: torch_bn.BatchNormFunction.apply(x, w, b, 1e-5)[0], (x, w, b))
        assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("shape, fmt", [((50, 100), None), ((8, 6, 5), None), ((4, 6, 3, 5), torch.channels_last),
                                        ((3, 4, 2, 3, 2), torch.channels_last_3d)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_each_path_matches_float64_definition(path, shape, fmt, dtype, tol):
    """y, dx, dweight, dbias and the running statistics of the pinned body against the float64
    definition (helpers.float64_reference, differentiated by autograd); output layout kept."""
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    w64, b64 = torch.randn(shape[1], generator=g, dtype=torch.float64), torch.randn(shape[1], generator=g, dtype=torch.float64)
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x64.to(dtype)
    dy = dy64.to(dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x.requires_grad_()
    w, b = w64.to(dtype).requires_grad_(), b64.to(dtype).requires_grad_()
    rm, rv = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    with pinned(path):
        y = batch_norm(x, rm, rv, w, b, True, 0.5, 1e-5)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    assert issubclass(y.grad_fn._forward_cls, torch_bn.BatchNormFunction)
    xr = x64.clone().requires_grad_()
    wr, br = w64.clone().requires_grad_(), b64.clone().requires_grad_()
    y_ref = float64_reference(xr, wr, br, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, (xr, wr, br), dy64)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    dims = [0] + list(range(2, len(shape)))
    torch.testing.assert_close(rm.double(), 0.5 * x64.mean(dims), rtol=tol, atol=tol)
    torch.testing.assert_close(rv.double(), 0.5 + 0.5 * x64.var(dims), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("shape", [(50, 100), (4096, 1024)])
def test_the_reference_switch_runs_an_edited_closed_form(shape, monkeypatch):
    """A learner's edit of torch_bn.ops.closed_form_backward reaches the gradients of a CPU layer
    under use_path("reference"), at the MLP's size and at a size the fused or compiled path would
    take; under "auto" those paths run their own code, so the edit does not reach them."""
    real = torch_bn.ops.closed_form_backward

    def edited(dy, xhat, rstd, weight):
        dx, dweight, dbias = real(dy, xhat, rstd, weight)
        return 2 * dx, 3 * dweight, 5 * dbias

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    dy = torch.randn(shape, generator=g)
    layer = torch_bn.BatchNorm1d(shape[1])

    def grads():
        return torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), dy)

    with torch_bn.use_path("reference"):
        before = grads()
        monkeypatch.setattr(torch_bn.ops, "closed_form_backward", edited)
        after = grads()
    for factor, a, b in zip((2, 3, 5), after, before):
        torch.testing.assert_close(a, factor * b)
    if torch_bn.dispatch.choose_path(x) != "reference":
        auto = grads()
        for a, b in zip(auto, before):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
