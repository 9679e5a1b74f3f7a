"""Ghost batch norm: torch_bn.GhostBatchNorm1d/2d/3d and batch_norm(..., virtual_batch_size=V)
against a float64 loop over chunks written from the issue's equations (tests/variant_references.py),
gradcheck, gradgradcheck and forward AD in float64, V >= N as batch norm, modules and errors; each
body pinned (the compiled CPU ops and the reference ops of torch_bn/ops.py) against that reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import torch_bn
from helpers import float64_inputs
from torch_bn import cpp
from torch_bn.functional import batch_norm, batch_norm_stateless
from torch_bn.ghost import GhostBatchNormFunction
from variant_references import _affine, _ch, assert_matches_reference, ghost_chunk_stats, ghost_reference

EPS = 1e-5
# (shape, virtual batch size): N a multiple of V, a smaller last chunk, V >= N
CASES = [((8, 3), 4), ((10, 3), 4), ((6, 3, 5), 3), ((8, 3, 4), 3), ((6, 3, 2, 3), 2), ((7, 3, 2, 2), 5),
         ((4, 3, 2, 2, 3), 2), ((5, 3, 2, 2, 2), 8)]
MAX_ERROR = {}


def record(name, a, b):
    MAX_ERROR[name] = max(MAX_ERROR.get(name, 0.0), (a - b).abs().max().item())


@pytest.mark.parametrize("shape,v", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_float64_reference(shape, v, affine):
    x, w, b, rm, rv = float64_inputs(shape, affine)
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rm1, rv1 = rm.clone(), rv.clone()
    y = batch_norm(x, rm1, rv1, w, b, True, 0.1, EPS, virtual_batch_size=v)
    y_ref, new_mean, new_var = ghost_reference(x, w, b, EPS, v, rm, rv)
    assert_matches_reference(record, "ghost", y, y_ref, (rm1, rv1), (new_mean, new_var),
                             [t for t in (x, w, b) if t is not None], dy)




@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), v=st.integers(2, 7), c=st.integers(1, 4), tail=st.lists(st.integers(1, 3), max_size=2),
       seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(n, v, c, tail, seed):
    """Any batch size and chunk size that leaves no chunk of one sample, 2D to 4D."""
    if min(v, n) == 1 or n % min(v, n) == 1:
        return
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, c, *tail), generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = batch_norm(x, rm, rv, w, None, True, 0.1, EPS, virtual_batch_size=v)
    y_ref, new_mean, new_var = ghost_reference(x, w, None, EPS, v, torch.zeros(c, dtype=torch.float64),
                                               torch.ones(c, dtype=torch.float64))
    torch.testing.assert_close((y, rm, rv), (y_ref, new_mean, new_var), rtol=1e-10, atol=1e-10)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4), (4, 3, 2, 3), (3, 3, 2, 2, 2)])
@pytest.mark.parametrize("v", [None, "N", "2N"])
def test_virtual_batch_size_at_least_n_is_batch_norm(shape, v):
    x, w, b, rm, rv = float64_inputs(shape, True)
    v = shape[0] * (1 if v == "N" else 2) if v else shape[0]
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = batch_norm(x, rm1, rv1, w, b, True, virtual_batch_size=v)
    y_bn = batch_norm(x, rm2, rv2, w, b, True)
    torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm1, rv1), (rm2, rv2), rtol=1e-13, atol=1e-13)
    dy = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_bn, (x, w, b), dy),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,v", CASES[:7])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, v, training, affine):
    x, w, b, rm, rv = float64_inputs(shape, affine)

    def f(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, EPS, virtual_batch_size=v)

    assert gradcheck(f, (x, w, b), check_forward_ad=True)
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape,v", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_ad_matches_reference(shape, v, affine):
    x, w, b, _, _ = float64_inputs(shape, affine)
    primals = tuple(t.detach() for t in (x, w, b) if t is not None)
    g = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in primals)
    wb = lambda p: p[1:] if affine else (None, None)
    y, t = torch.func.jvp(lambda *p: batch_norm(p[0], None, None, *wb(p), True, virtual_batch_size=v), primals, tangents)
    y_ref, t_ref = torch.func.jvp(lambda *p: ghost_reference(p[0], *wb(p), EPS, v)[0], primals, tangents)
    torch.testing.assert_close((y, t), (y_ref, t_ref), rtol=1e-10, atol=1e-10)
    record("ghost jvp", t, t_ref)


def test_module_eval_is_batch_norm_and_state_dict_is_nns():
    torch.manual_seed(0)
    m = torch_bn.GhostBatchNorm2d(4, virtual_batch_size=3, dtype=torch.float64)
    assert isinstance(m, nn.BatchNorm2d) and list(m.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert "virtual_batch_size=3" in repr(m)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    for _ in range(3):
        x = torch.randn(9, 4, 2, 2, dtype=torch.float64) * 3 + 1
        y = m(x)
        y_ref, rm, rv = ghost_reference(x, m.weight.detach(), m.bias.detach(), EPS, 3, rm, rv)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((m.running_mean, m.running_var), (rm, rv), rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 3
    m.eval()
    plain = nn.BatchNorm2d(4, dtype=torch.float64).eval()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(7, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-12, atol=1e-12)
    assert type(torch_bn.convert(nn.Sequential(m), to="torch")[0]) is nn.BatchNorm2d


def test_without_running_stats_eval_uses_the_chunks_as_training():
    m = torch_bn.GhostBatchNorm1d(3, 4, track_running_stats=False, affine=False, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train)
    torch.testing.assert_close(y_train, ghost_reference(x, None, None, EPS, 4)[0], rtol=1e-12, atol=1e-12)


def test_channels_last_and_half_precision():
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    y_ref = ghost_reference(x.double(), None, None, EPS, 4)[0]
    y = batch_norm(x.contiguous(memory_format=torch.channels_last), None, None, training=True, virtual_batch_size=4)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    y = batch_norm(x.bfloat16(), None, None, training=True, virtual_batch_size=4)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ghost_reference(x.bfloat16().double(), None, None, EPS, 4)[0],
                               rtol=1e-2, atol=2e-2)


def test_functional_call_and_stateless():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64), torch_bn.GhostBatchNorm1d(3, 5, dtype=torch.float64))
    twin = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64), torch_bn.GhostBatchNorm1d(3, 5, dtype=torch.float64))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(12, 4, dtype=torch.float64)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def loss(p):
        out, new = torch_bn.func.functional_call(model, {**p, **buffers}, (x,))
        return out.square().sum(), new

    grads, new = torch.func.grad(loss, has_aux=True)(params)
    twin(x).square().sum().backward()
    torch.testing.assert_close(grads["0.weight"], twin[0].weight.grad, rtol=1e-10, atol=1e-10)
    for k, v in twin.named_buffers():
        torch.testing.assert_close(new[k], v, rtol=1e-12, atol=1e-12)
    assert torch.all(model[1].running_mean == 0)  # nothing written
    y, mean, var = batch_norm_stateless(x[:, :3], torch.zeros(3, dtype=torch.float64),
                                        torch.ones(3, dtype=torch.float64), training=True, virtual_batch_size=4)
    y_ref, ref_mean, ref_var = ghost_reference(x[:, :3], None, None, EPS, 4, torch.zeros(3, dtype=torch.float64),
                                               torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close((y, mean, var), (y_ref, ref_mean, ref_var), rtol=1e-12, atol=1e-12)


def test_vmap_over_batches():
    xs = torch.randn(3, 8, 2, dtype=torch.float64)
    ys = torch.vmap(lambda x: batch_norm(x, None, None, training=True, virtual_batch_size=4))(xs)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y, ghost_reference(x, None, None, EPS, 4)[0], rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="more than 1 value per channel.*last chunk of 1 sample"):
        batch_norm(torch.randn(9, 3), None, None, training=True, virtual_batch_size=4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(5, 3, 4), None, None, training=True, virtual_batch_size=1)
    batch_norm(torch.randn(9, 3), torch.zeros(3), torch.ones(3), training=False, virtual_batch_size=4)  # eval: fine
    with pytest.raises(ValueError, match="int >= 2"):
        torch_bn.GhostBatchNorm1d(3, 1)
    with pytest.raises(ValueError, match="positive int"):
        batch_norm(torch.randn(8, 3), None, None, training=True, virtual_batch_size=2.5)
    with pytest.raises(ValueError, match="not both"):
        batch_norm(torch.randn(8, 3), None, None, training=True, virtual_batch_size=4,
                   mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not take a mask"):
        torch_bn.GhostBatchNorm1d(3, 4)(torch.randn(8, 3), mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="only for plain batch norm"):
        batch_norm(torch.randn(8, 3), None, None, training=True, virtual_batch_size=4, backward="staged")


# ---- Each body pinned: the compiled CPU ops and the reference ops --------------------------------

@pytest.fixture(params=["cpp", "reference"])
def pinned(request, monkeypatch):
    """(path, calls): the path pinned by use_path for the test, and the calls the compiled ghost
    ops received, counted by a spy around them (the proof of which body ran)."""
    calls = {"forward": 0, "backward": 0}
    if request.param == "cpp":
        if not cpp.ENABLED:
            pytest.skip("the compiled op is switched off by TORCH_BN_CPP=0")
        real = cpp.op()
        assert real is not None, "the compiled op could not be built (see the RuntimeWarning)"

        def counted(name, fn):
            def call(*args):
                calls[name] += 1
                return fn(*args)
            return call

        spy = type(real)(**vars(real))
        spy.ghost_forward, spy.ghost_backward = counted("forward", real.ghost_forward), counted("backward", real.ghost_backward)
        monkeypatch.setattr(cpp, "op", lambda: spy)
    with torch_bn.use_path(request.param):
        yield request.param, calls


def _check_pinned_path(pinned, backward_calls=1):
    path, calls = pinned
    expected = (1, backward_calls) if path == "cpp" else (0, 0)
    assert (calls["forward"], calls["backward"]) == expected, f"{path}: the compiled ghost ops ran {calls}"


# (shape, virtual batch size, layout): N a multiple of V or not, one chunk, 2D to 5D, channels-last
PINNED_CASES = [((256, 128), 32, "contiguous"), ((70, 5), 16, "contiguous"), ((9, 4), 9, "contiguous"),
                ((11, 3, 7), 4, "contiguous"), ((12, 3, 5), 12, "contiguous"), ((10, 3, 2, 3), 4, "contiguous"),
                ((10, 3, 2, 3), 4, "channels_last"), ((8, 5, 3, 2), 4, "channels_last"),
                ((8, 3, 2, 2, 3), 3, "contiguous"), ((8, 3, 2, 2, 3), 3, "channels_last"),
                ((6, 3, 4), 4, "strided")]


def _laid_out(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # same values, dims 0 and 1 swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


@pytest.mark.parametrize("shape,v,layout", PINNED_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_pinned_body_matches_float64_reference(pinned, shape, v, layout, affine):
    """y, the per-chunk statistics, the running statistics and dx, dweight, dbias of the pinned
    body, float64, against the loop over chunks of tests/variant_references.py."""
    x, w, b, rm, rv = float64_inputs(shape, affine)
    x = _laid_out(x.detach(), layout).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rm1, rv1 = rm.clone(), rv.clone()
    y = batch_norm(x, rm1, rv1, w, b, True, 0.1, EPS, virtual_batch_size=v)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    _check_pinned_path(pinned)
    y_ref, new_mean, new_var = ghost_reference(x, w, b, EPS, v, rm, rv)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm1, rv1), (new_mean, new_var), rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(y_ref, inputs, dy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
        record(f"ghost {pinned[0]} grad", g, r)
    record(f"ghost {pinned[0]} y", y, y_ref)
    if layout == "channels_last" and pinned[0] == "cpp":  # laid out as the plain compiled op lays out y, dx
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)

    means, variances, rstds = GhostBatchNormFunction.apply(x.detach(), None, None, EPS, v)[1:]
    mean_ref, var_ref = ghost_chunk_stats(x.detach(), v)
    torch.testing.assert_close((means, variances, rstds), (mean_ref, var_ref, torch.rsqrt(var_ref + EPS)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("need", ["x", "weight", "bias"])
def test_pinned_body_gradient_of_one_input(pinned, need):
    """Only the gradient asked for (the compiled backward skips dx when x needs none)."""
    x, w, b, _, _ = float64_inputs((10, 3, 4), True)
    inputs = {"x": x, "weight": w, "bias": b}
    for name, t in inputs.items():
        t.requires_grad_(name == need)
    dy = torch.randn(10, 3, 4, dtype=torch.float64)
    g = torch.autograd.grad(batch_norm(x, None, None, w, b, True, virtual_batch_size=4), inputs[need], dy)
    _check_pinned_path(pinned)
    ref = torch.autograd.grad(ghost_reference(x, w, b, EPS, 4)[0], inputs[need], dy)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,v,layout", [((64, 16), 16, "contiguous"), ((10, 4, 3, 3), 4, "channels_last")])
def test_pinned_body_low_precision(pinned, dtype, shape, v, layout):
    """Statistics and arithmetic in float32, one rounding of y and dx to the input's dtype: within
    a few of its ulps of the float64 reference on the rounded input."""
    g = torch.Generator().manual_seed(1)
    x = _laid_out((torch.randn(shape, generator=g) * 2 + 1).to(dtype), layout).requires_grad_()
    w = (torch.rand(shape[1], generator=g) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    y = batch_norm(x, None, None, w, b, True, virtual_batch_size=v)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    _check_pinned_path(pinned)
    assert y.dtype == grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = ghost_reference(x64, w64, b64, EPS, v)[0]
    refs = torch.autograd.grad(y_ref, (x64, w64, b64), dy.double())
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0].double(), refs[0], rtol=tol, atol=tol)
    for got, ref in zip(grads[1:], refs[1:]):  # sums over the batch, in float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * shape[0])


def test_compiled_path_follows_choose_path(pinned):
    """Double backward and torch.func transforms take the reference ops even with "cpp" pinned,
    as for plain batch norm (choose_path); the results still match the reference."""
    x, w, b, _, _ = float64_inputs((8, 3), True)
    y = batch_norm(x, None, None, w, b, True, virtual_batch_size=4)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) * torch.arange(3.0, dtype=torch.float64), create_graph=True)
    _check_pinned_path(pinned, backward_calls=0)  # the backward recorded a graph: reference
    y_ref = ghost_reference(x, w, b, EPS, 4)[0]
    (gx_ref,) = torch.autograd.grad(y_ref, x, torch.ones_like(y) * torch.arange(3.0, dtype=torch.float64),
                                    create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.square().sum(), w), torch.autograd.grad(gx_ref.square().sum(), w))
    batched = torch.func.vmap(lambda t: batch_norm(t, None, None, training=True, virtual_batch_size=4))(x.detach()[None])
    _check_pinned_path(pinned, backward_calls=0)  # vmap: no further compiled call
    torch.testing.assert_close(batched[0], ghost_reference(x.detach(), None, None, EPS, 4)[0])


def test_compiled_ops_errors_and_opcheck():
    if not cpp.ENABLED:
        pytest.skip("the compiled op is switched off by TORCH_BN_CPP=0")
    ops = cpp.op()
    assert ops is not None, "the compiled op could not be built (see the RuntimeWarning)"
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.ghost_forward(torch.randn(9, 3), None, None, 4, EPS)  # last ghost batch: 1 sample
    with pytest.raises(RuntimeError, match="positive number of samples"):
        ops.ghost_forward(torch.randn(8, 3), None, None, 0, EPS)
    x = torch.randn(8, 3, 2)
    _, mean, _, rstd = ops.ghost_forward(x, None, None, 4, EPS)
    with pytest.raises(RuntimeError, match=r"\(ghost batches, C\) = \(2, 3\)"):
        ops.ghost_backward(x, x, None, mean[:1], rstd[:1], 4, True)
    for x in (torch.randn(10, 3, 2, 2).contiguous(memory_format=torch.channels_last), torch.randn(7, 2, 3)):
        w, b = torch.rand(x.shape[1]) + 0.5, torch.randn(x.shape[1])
        _, mean, _, rstd = ops.ghost_forward(x, w, b, 4, EPS)
        torch.library.opcheck(torch.ops.torch_bn_cpp.ghost_batch_norm_forward.default, (x, w, b, 4, EPS))
        torch.library.opcheck(torch.ops.torch_bn_cpp.ghost_batch_norm_backward.default,
                              (torch.randn_like(x), x, w, mean, rstd, 4, True))


def test_print_largest_errors():
    print("\nghost batch norm, max |float64 - reference|:", {k: f"{v:.2g}" for k, v in MAX_ERROR.items()})
