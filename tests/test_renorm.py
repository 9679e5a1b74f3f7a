"""Batch renormalization: torch_bn.BatchRenorm1d/2d/3d and torch_bn.functional.batch_renorm against
a float64 implementation of the issue's equations (tests/variant_references.py), gradcheck,
gradgradcheck and forward AD in float64, the plain-batch-norm cases, warm-up, modules and errors."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import torch_bn
from helpers import float64_inputs
from torch_bn.functional import batch_norm, batch_renorm, batch_renorm_stateless
from variant_references import renorm_reference

SHAPES = [(6, 3), (4, 3, 5), (3, 3, 2, 4), (2, 3, 2, 2, 3)]
EPS = 1e-5
SPREAD = torch.tensor([1.0, 6.0, 30.0], dtype=torch.float64)  # running variances relative to the batch's
MAX_ERROR = {}  # largest float64 error against the reference, printed at the end (-s)


def record(name, a, b):
    MAX_ERROR[name] = max(MAX_ERROR.get(name, 0.0), (a - b).abs().max().item())


def running_far(c, seed=1):
    """Running statistics far from the batch's (mean 2, std 3): r and d both clipped."""
    g = torch.Generator().manual_seed(seed)
    return 50 + torch.rand(c, generator=g, dtype=torch.float64), 1e4 * (1 + torch.rand(c, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("clipping", [(3.0, 5.0), (1.2, 0.3), (1.0, 0.0)])
def test_matches_float64_reference(shape, affine, clipping):
    rmax, dmax = clipping
    x, w, b, rm, rv = float64_inputs(shape, affine)
    rv = rv * SPREAD  # sigma_B / sigma above, near and below 1 over the channels
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rm1, rv1 = rm.clone(), rv.clone()
    y = batch_renorm(x, rm1, rv1, w, b, True, 0.1, EPS, rmax, dmax)
    y_ref, r, d, new_mean, new_var = renorm_reference(x, w, b, rm, rv, EPS, rmax, dmax)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm1, new_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv1, new_var, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(y_ref, inputs, dy)
    for g, r_ in zip(got, want):
        torch.testing.assert_close(g, r_, rtol=1e-10, atol=1e-10)
        record("renorm grad", g, r_)
    record("renorm y", y, y_ref)
    record("renorm running", torch.cat([rm1, rv1]), torch.cat([new_mean, new_var]))


def test_the_cases_cover_clipped_and_free_corrections():
    x, w, b, rm, rv = float64_inputs((6, 3), True)
    _, r, d, _, _ = renorm_reference(x, w, b, rm, rv * SPREAD, EPS, 1.2, 0.3)
    assert ((r == 1.2) | (r == 1 / 1.2)).any() and ((r < 1.2) & (r > 1 / 1.2)).any()
    assert (d.abs() == 0.3).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_rmax_1_dmax_0_is_batch_norm(shape):
    x, w, b, rm, rv = float64_inputs(shape, True)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = batch_renorm(x, rm1, rv1, w, b, True, 0.1, EPS, 1.0, 0.0)
    y_bn = batch_norm(x, rm2, rv2, w, b, True, 0.1, EPS)
    torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm1, rv1), (rm2, rv2), rtol=1e-14, atol=1e-14)
    dy = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_bn, (x, w, b), dy),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_warmed_up_with_r_and_d_clipped(shape):
    """A layer past warm-up whose running statistics are far from the batch's: r = 1/rmax and
    d = -dmax in every channel, and the output and running statistics are the reference's."""
    c = shape[1]
    bn = torch_bn.BatchRenorm1d if len(shape) <= 3 else (torch_bn.BatchRenorm2d if len(shape) == 4 else torch_bn.BatchRenorm3d)
    m = bn(c, rmax=2.0, dmax=0.2, warmup_steps=3, dtype=torch.float64)
    rm, rv = running_far(c)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        m.num_batches_tracked.fill_(3)
    x, w, b, _, _ = float64_inputs(shape, True)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    y = m(x)
    y_ref, r, d, new_mean, new_var = renorm_reference(x, w, b, rm, rv, EPS, 2.0, 0.2)
    assert torch.all(r == 0.5) and torch.all(d == -0.2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((m.running_mean, m.running_var), (new_mean, new_var), rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 4


def test_warmup_steps_are_plain_batch_norm_then_renormalization():
    """Batches 1..warmup_steps (num_batches_tracked after the increment) are batch norm, then r, d."""
    torch.manual_seed(0)
    m = torch_bn.BatchRenorm1d(3, rmax=1.5, dmax=0.2, warmup_steps=2, dtype=torch.float64)
    plain = torch_bn.BatchNorm1d(3, dtype=torch.float64)
    for step in range(1, 5):
        x = torch.randn(8, 3, dtype=torch.float64) * (1 + step) + 3 * step
        rm, rv = m.running_mean.clone(), m.running_var.clone()
        y, y_plain = m(x), plain(x)
        if step <= 2:
            torch.testing.assert_close(y, y_plain, rtol=1e-12, atol=1e-12)
        else:
            y_ref, r, d, _, _ = renorm_reference(x, m.weight.detach(), m.bias.detach(), rm, rv, EPS, 1.5, 0.2)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            assert not torch.allclose(y, y_plain)
        torch.testing.assert_close(m.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, plain.running_var, rtol=1e-12, atol=1e-12)


def test_warmup_0_renormalizes_from_the_first_batch():
    m = torch_bn.BatchRenorm1d(3, rmax=1.1, dmax=0.1, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64) * 5 + 4
    y_ref, *_ = renorm_reference(x, m.weight.detach(), m.bias.detach(), torch.zeros(3, dtype=torch.float64),
                                 torch.ones(3, dtype=torch.float64), EPS, 1.1, 0.1)
    torch.testing.assert_close(m(x), y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, training, affine):
    """Where r and d are clipped they are locally constant, so the paper's gradient is the
    derivative: finite differences check it, and the double backward."""
    x, w, b, _, _ = float64_inputs(shape, affine)
    rm, rv = running_far(shape[1])

    def f(x, w, b):
        return batch_renorm(x, rm.clone(), rv.clone(), w, b, training, 0.1, EPS, 3.0, 0.1)

    inputs = (x, w, b)
    assert gradcheck(f, inputs, check_forward_ad=True)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradcheck_without_clipping_where_batch_norm(shape):
    x, w, b, rm, rv = float64_inputs(shape, True)
    assert gradcheck(lambda x, w, b: batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, 1.0, 0.0), (x, w, b))
    assert gradgradcheck(lambda x, w, b: batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, 1.0, 0.0), (x, w, b))


def test_double_backward_matches_the_reference_with_free_corrections():
    """With r and d unclipped the gradient is not the forward's derivative (r, d are constants for
    it); its own derivative (double backward) is the reference's, d and r detached."""
    x, w, b, rm, rv = float64_inputs((6, 3, 2), True)
    rv = rv * SPREAD
    dy = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    out = []
    for fn in (lambda: batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, 3.0, 5.0),
               lambda: renorm_reference(x, w, b, rm, rv, EPS, 3.0, 5.0)[0]):
        gx, gw = torch.autograd.grad(fn(), (x, w), dy, create_graph=True)
        out.append(torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w, b, dy), allow_unused=True))
    for a, b_ in zip(*out):
        if a is None:
            assert b_ is None or torch.all(b_ == 0)
        else:
            torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_ad_matches_reference(shape, training, affine):
    x, w, b, rm, rv = float64_inputs(shape, affine)
    rv = rv * SPREAD
    primals = tuple(t.detach() for t in (x, w, b) if t is not None)
    g = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in primals)

    def ours(*p):
        return batch_renorm(p[0], rm.clone(), rv.clone(), *(p[1:] if affine else (None, None)), training, 0.1, EPS, 1.3, 0.2)

    def ref(*p):
        if not training:
            from variant_references import _affine, _ch
            return _affine((p[0] - _ch(rm, p[0])) / torch.sqrt(_ch(rv, p[0]) + EPS), *(p[1:] if affine else (None, None)))
        return renorm_reference(p[0], *(p[1:] if affine else (None, None)), rm, rv, EPS, 1.3, 0.2)[0]

    y, t = torch.func.jvp(ours, primals, tangents)
    y_ref, t_ref = torch.func.jvp(ref, primals, tangents)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, t_ref, rtol=1e-10, atol=1e-10)
    record("renorm jvp", t, t_ref)


def test_eval_and_no_running_stats_are_batch_norm():
    torch.manual_seed(0)
    m = torch_bn.BatchRenorm2d(4, rmax=1.5, dmax=0.5, dtype=torch.float64)
    plain = nn.BatchNorm2d(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 2 + 1
        m(x), plain(x)
    m.eval(), plain.eval()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    plain.running_mean.copy_(m.running_mean), plain.running_var.copy_(m.running_var)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-12, atol=1e-12)
    free = torch_bn.BatchRenorm1d(4, track_running_stats=False, rmax=1.1, dmax=0.0, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64) * 3 + 2
    assert free.running_mean is None
    torch.testing.assert_close(free(x), nn.BatchNorm1d(4, track_running_stats=False, dtype=torch.float64)(x))
    free.eval()
    torch.testing.assert_close(free(x), nn.BatchNorm1d(4, track_running_stats=False, dtype=torch.float64)(x))


def test_state_dict_like_nn_and_convert_to_torch():
    m = torch_bn.BatchRenorm2d(4, warmup_steps=5)
    ref = nn.BatchNorm2d(4)
    assert isinstance(m, nn.BatchNorm2d)
    assert list(m.state_dict()) == list(ref.state_dict())
    ref.running_mean.fill_(2.0)
    ref.num_batches_tracked.fill_(7)
    m.load_state_dict(ref.state_dict())
    assert m.num_batches_tracked.item() == 7 and torch.all(m.running_mean == 2)
    assert "rmax=3.0, dmax=5.0, warmup_steps=5" in repr(m)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), m)
    plain = torch_bn.convert(model, to="torch")  # nn's BatchNorm2d, same tensors, the same in eval
    assert type(plain[1]) is nn.BatchNorm2d and plain[1].running_mean is m.running_mean
    assert type(torch_bn.convert(nn.Sequential(torch_bn.BatchRenorm1d(3)))[0]) is torch_bn.BatchRenorm1d


def test_functional_call_and_stateless_form():
    """torch_bn.func.functional_call: the eager layer's output and buffers, nothing mutated, under
    torch.func.grad too; warm-up counts the given num_batches_tracked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, dtype=torch.float64),
                          torch_bn.BatchRenorm1d(3, rmax=1.2, dmax=0.1, warmup_steps=1, dtype=torch.float64))
    twin = nn.Sequential(nn.Linear(5, 3, dtype=torch.float64),
                         torch_bn.BatchRenorm1d(3, rmax=1.2, dmax=0.1, warmup_steps=1, dtype=torch.float64))
    twin.load_state_dict(model.state_dict())
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for _ in range(3):
        x = torch.randn(8, 5, dtype=torch.float64) * 3
        before = {k: v.clone() for k, v in buffers.items()}

        def loss(p, bufs):
            out, new = torch_bn.func.functional_call(model, {**p, **bufs}, (x,))
            return out.square().sum(), (out, new)

        grads, (out, new) = torch.func.grad(loss, has_aux=True)(params, buffers)
        assert all(torch.equal(before[k], buffers[k]) for k in buffers)  # nothing written
        y = twin(x)
        torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)
        y.square().sum().backward()
        torch.testing.assert_close(grads["0.weight"], twin[0].weight.grad, rtol=1e-10, atol=1e-10)
        twin.zero_grad()
        for k in buffers:
            torch.testing.assert_close(new[k], dict(twin.named_buffers())[k], rtol=1e-12, atol=1e-12)
        buffers = new
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    y, new_mean, new_var = batch_renorm_stateless(x, rm, rv, training=True, rmax=1.2, dmax=0.1)
    y_ref, _, _, ref_mean, ref_var = renorm_reference(x, None, None, rm, rv, EPS, 1.2, 0.1)
    torch.testing.assert_close((y, new_mean, new_var), (y_ref, ref_mean, ref_var), rtol=1e-12, atol=1e-12)
    assert torch.all(rm == 0) and torch.all(rv == 1)  # the given statistics are not written


def test_half_precision_computes_in_float32():
    x = torch.randn(16, 4, 3) * 2 + 1
    rm, rv = torch.zeros(4), torch.ones(4) * 3
    y = batch_renorm(x.bfloat16(), rm.clone(), rv.clone(), torch.ones(4), torch.zeros(4), True, 0.1, EPS, 1.5, 0.2)
    y_ref, *_ = renorm_reference(x.bfloat16().double(), None, None, rm.double(), rv.double(), EPS, 1.5, 0.2)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=2e-2)


def test_errors():
    with pytest.raises(ValueError, match="rmax >= 1"):
        batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, rmax=0.5)
    with pytest.raises(ValueError, match="dmax >= 0"):
        batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, dmax=-1.0)
    with pytest.raises(ValueError, match="rmax >= 1 and dmax >= 0"):
        torch_bn.BatchRenorm1d(3, rmax=0.9)
    with pytest.raises(ValueError, match="warmup_steps"):
        torch_bn.BatchRenorm1d(3, warmup_steps=-1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch_bn.BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="does not take a mask"):
        torch_bn.BatchRenorm1d(3)(torch.randn(4, 3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected 4D input"):
        torch_bn.BatchRenorm2d(3)(torch.randn(4, 3))
    with pytest.raises(torch_bn.functional.ChannelMismatchError):
        batch_renorm(torch.randn(4, 5), torch.zeros(3), torch.ones(3), training=True)


def test_print_largest_errors():
    print("\nbatch renormalization, max |float64 - reference|:", {k: f"{v:.2g}" for k, v in MAX_ERROR.items()})


def test_freeze_fold_and_recalibrate_see_the_evaluation_function():
    """The toolbox finds the variants by isinstance and uses their evaluation function (plain batch
    norm with the running statistics), the same for renormalized and ghost layers."""
    torch.manual_seed(0)
    for layer in (torch_bn.BatchRenorm1d(4, rmax=1.5, dmax=0.5, dtype=torch.float64),
                  torch_bn.GhostBatchNorm1d(4, 4, dtype=torch.float64)):
        model = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), layer)
        for _ in range(3):
            model(torch.randn(8, 3, dtype=torch.float64) * 2 + 1)
        model.eval()
        x = torch.randn(5, 3, dtype=torch.float64)
        want = model(x)
        torch.testing.assert_close(torch_bn.fold(model)(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch_bn.freeze(nn.Sequential(model[0], layer))(x), want, rtol=1e-12, atol=1e-12)
        batches = [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]
        torch_bn.recalibrate(model, batches)
        h = model[0](torch.cat(batches)).detach()
        torch.testing.assert_close((layer.running_mean, layer.running_var), (h.mean(0), h.var(0)), rtol=1e-10, atol=1e-10)
