"""Masked statistics: batch_norm(..., mask=), batch_norm_stateless and the layers' forward(input,
mask) against a float64 implementation by boolean indexing (tests/variant_references.py),
gradcheck, gradgradcheck and forward AD in float64, all-True and padded masks, modules, errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import torch_bn
from helpers import float64_inputs
from torch_bn.functional import batch_norm, batch_norm_stateless
from variant_references import assert_matches_reference, bn_reference, masked_reference

EPS = 1e-5
SHAPES = [(8, 3), (4, 3, 5), (3, 3, 2, 4), (2, 3, 2, 2, 3)]
MAX_ERROR = {}


def record(name, a, b):
    MAX_ERROR[name] = max(MAX_ERROR.get(name, 0.0), (a - b).abs().max().item())


def random_mask(shape, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < p
    mask.view(-1)[:2] = True  # at least two counted values
    return mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_float64_reference(shape, affine):
    x, w, b, rm, rv = float64_inputs(shape, affine)
    mask = random_mask(shape)
    assert not mask.all() and mask.sum() >= 2
    with torch.no_grad():
        x[~mask.unsqueeze(1).expand_as(x)] *= 50  # padding far from the counted values
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rm1, rv1 = rm.clone(), rv.clone()
    y = batch_norm(x, rm1, rv1, w, b, True, 0.1, EPS, mask=mask)
    y_ref, new_mean, new_var = masked_reference(x, w, b, mask, EPS, rm, rv)
    assert_matches_reference(record, "masked", y, y_ref, (rm1, rv1), (new_mean, new_var),
                             [t for t in (x, w, b) if t is not None], dy, atol_y=1e-11)


@pytest.mark.parametrize("shape", SHAPES)
def test_all_true_is_batch_norm(shape):
    x, w, b, rm, rv = float64_inputs(shape, True)
    mask = torch.ones((shape[0], *shape[2:]), dtype=torch.bool)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = batch_norm(x, rm1, rv1, w, b, True, mask=mask)
    y_bn = batch_norm(x, rm2, rv2, w, b, True)
    torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm1, rv1), (rm2, rv2), rtol=1e-13, atol=1e-13)
    dy = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_bn, (x, w, b), dy),
                               rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), c=st.integers(1, 4), tail=st.lists(st.integers(1, 3), max_size=2),
       p=st.floats(0.1, 1.0), seed=st.integers(0, 2**16))
def test_random_shapes_and_masks_match_reference(n, c, tail, p, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *tail)
    mask = torch.rand((n, *tail), generator=g) < p
    if mask.sum() < 2:
        return
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = batch_norm(x, rm, rv, None, b, True, 0.1, EPS, mask=mask)
    y_ref, new_mean, new_var = masked_reference(x, None, b, mask, EPS, torch.zeros(c, dtype=torch.float64),
                                                torch.ones(c, dtype=torch.float64))
    torch.testing.assert_close((y, rm, rv), (y_ref, new_mean, new_var), rtol=1e-10, atol=1e-10)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, b), dy), torch.autograd.grad(y_ref, (x, b), dy),
                               rtol=1e-9, atol=1e-9)


def test_mask_none_is_todays_path():
    """mask=None takes batch norm's own path: the same autograd node and bitwise the same numbers."""
    x = torch.randn(50, 100, requires_grad=True)
    a, b = torch_bn.BatchNorm1d(100), torch_bn.BatchNorm1d(100)
    y, y_none = a(x), b(x, mask=None)
    assert type(y.grad_fn) is type(y_none.grad_fn)
    assert torch.equal(y, y_none) and torch.equal(a.running_var, b.running_var)
    y2 = batch_norm(x, None, None, training=True, mask=None)
    assert type(y2.grad_fn) is type(batch_norm(x, None, None, training=True).grad_fn)


def test_padded_sequences_are_batch_norm_over_the_unpadded_positions():
    """(N, C, L) sequences of lengths 5, 3, 4 padded to 6: the outputs and gradients at the real
    positions are batch norm's over the real positions alone (packed as (12, C)), padding
    holding anything (here nan-free garbage)."""
    torch.manual_seed(0)
    lengths = [5, 3, 4]
    x = torch.randn(3, 4, 6, dtype=torch.float64) * 2 + 1
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        x[~mask.unsqueeze(1).expand_as(x)] = 1e3
    x.requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y = batch_norm(x, rm, rv, w, b, True, mask=mask)
    packed = x.detach().transpose(1, 2)[mask].requires_grad_()  # (12, 4)
    rm2, rv2 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y_packed = batch_norm(packed, rm2, rv2, w, b, True)
    torch.testing.assert_close(y.transpose(1, 2)[mask], y_packed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm, rv), (rm2, rv2), rtol=1e-12, atol=1e-12)
    dy = torch.randn(12, 4, dtype=torch.float64)
    full_dy = torch.zeros(3, 6, 4, dtype=torch.float64)
    full_dy[mask] = dy
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), full_dy.transpose(1, 2))
    px, pw, pb = torch.autograd.grad(y_packed, (packed, w, b), dy)
    torch.testing.assert_close(gx.transpose(1, 2)[mask], px, rtol=1e-10, atol=1e-10)
    assert torch.all(gx.transpose(1, 2)[~mask] == 0)  # no gradient reaches padding through the statistics
    torch.testing.assert_close((gw, gb), (pw, pb), rtol=1e-10, atol=1e-10)


def test_masked_out_positions_get_gradient_through_their_own_output():
    x, w, b, _, _ = float64_inputs((6, 3), True)
    mask = torch.tensor([True, True, True, True, False, False])
    y = batch_norm(x, None, None, w, b, True, mask=mask)
    dy = torch.zeros(6, 3, dtype=torch.float64)
    dy[5] = 1.0
    gx, = torch.autograd.grad(y, x, dy, retain_graph=True)
    var = x[:4].var(0, correction=0)
    torch.testing.assert_close(gx[5], (w / torch.sqrt(var + EPS)).detach())  # d y_5 / d x_5
    assert torch.all(gx[4] == 0)  # the other masked-out position: y_5 does not depend on it
    assert torch.all(gx[:4] != 0)  # the counted ones: through the statistics
    dy = torch.zeros(6, 3, dtype=torch.float64)
    dy[:4] = torch.randn(4, 3, dtype=torch.float64)
    gx, = torch.autograd.grad(y, x, dy)
    assert torch.all(gx[4:] == 0)  # nothing reaches padding through the statistics


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, training, affine):
    x, w, b, rm, rv = float64_inputs(shape, affine)
    mask = random_mask(shape, seed=1)

    def f(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, EPS, mask=mask)

    assert gradcheck(f, (x, w, b), check_forward_ad=True)
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_ad_matches_reference(shape, affine):
    x, w, b, _, _ = float64_inputs(shape, affine)
    mask = random_mask(shape, seed=2)
    primals = tuple(t.detach() for t in (x, w, b) if t is not None)
    g = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in primals)
    wb = lambda p: p[1:] if affine else (None, None)
    y, t = torch.func.jvp(lambda *p: batch_norm(p[0], None, None, *wb(p), True, mask=mask), primals, tangents)
    y_ref, t_ref = torch.func.jvp(lambda *p: masked_reference(p[0], *wb(p), mask, EPS)[0], primals, tangents)
    torch.testing.assert_close((y, t), (y_ref, t_ref), rtol=1e-10, atol=1e-10)
    record("masked jvp", t, t_ref)


@pytest.mark.parametrize("cls,shape", [(torch_bn.BatchNorm1d, (6, 3)), (torch_bn.BatchNorm1d, (4, 3, 5)),
                                       (torch_bn.BatchNorm2d, (3, 3, 2, 4)), (torch_bn.BatchNorm3d, (2, 3, 2, 2, 3))])
def test_module_forward_with_mask_train_and_eval(cls, shape):
    m = cls(3, dtype=torch.float64)
    x, _, _, _, _ = float64_inputs(shape, False)
    mask = random_mask(shape, seed=4)
    y = m(x, mask=mask)
    y_ref, rm, rv = masked_reference(x, m.weight, m.bias, mask, EPS, torch.zeros(3, dtype=torch.float64),
                                     torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((m.running_mean, m.running_var), (rm, rv), rtol=1e-12, atol=1e-12)
    m.eval()  # evaluation: the running statistics at every position, the mask changes nothing
    torch.testing.assert_close(m(x, mask=mask), m(x))
    free = cls(3, track_running_stats=False, dtype=torch.float64).eval()  # batch statistics in eval: masked
    torch.testing.assert_close(free(x, mask), masked_reference(x, free.weight, free.bias, mask, EPS)[0],
                               rtol=1e-12, atol=1e-12)


def test_functional_call_and_stateless_with_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 1, dtype=torch.float64), torch_bn.BatchNorm1d(3, dtype=torch.float64))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    mask = random_mask((4, 3, 5), seed=6)

    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = model[0], model[1]

        def forward(self, x, mask):
            return self.bn(self.conv(x), mask=mask)

    net = WithMask()
    params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
    out, new = torch_bn.func.functional_call(net, {**params, **buffers}, (x, mask))
    y_ref, rm, rv = masked_reference(net.conv(x), net.bn.weight, net.bn.bias, mask, EPS,
                                     torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((new["bn.running_mean"], new["bn.running_var"]), (rm, rv), rtol=1e-12, atol=1e-12)
    assert torch.all(net.bn.running_mean == 0)
    xs = torch.randn(3, 6, 2, dtype=torch.float64)  # vmap over batches, one mask
    m = torch.tensor([True, True, False, True, False, True])
    ys, means, vars_ = torch.vmap(lambda x: batch_norm_stateless(x, torch.zeros(2, dtype=torch.float64),
                                                                 torch.ones(2, dtype=torch.float64), training=True,
                                                                 mask=m))(xs)
    for x, y, mean, var in zip(xs, ys, means, vars_):
        y_ref, rm, rv = masked_reference(x, None, None, m, EPS, torch.zeros(2, dtype=torch.float64),
                                         torch.ones(2, dtype=torch.float64))
        torch.testing.assert_close((y, mean, var), (y_ref, rm, rv), rtol=1e-12, atol=1e-12)


def test_half_precision_and_padding_with_inf():
    x = torch.randn(8, 3, 5) * 2 + 1
    mask = random_mask((8, 3, 5), seed=7)
    y = batch_norm(x.bfloat16(), None, None, training=True, mask=mask)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), masked_reference(x.bfloat16().double(), None, None, mask, EPS)[0],
                               rtol=1e-2, atol=2e-2)
    x_inf = x.clone()
    x_inf[~mask.unsqueeze(1).expand_as(x)] = float("inf")  # padding never reaches the statistics
    y = batch_norm(x_inf, None, None, training=True, mask=mask)
    torch.testing.assert_close(y.transpose(1, 2)[mask], batch_norm(x, None, None, training=True, mask=mask).transpose(1, 2)[mask])


def test_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="at least 2 counted values.*got 1"):
        batch_norm(x, None, None, training=True, mask=torch.zeros(4, 5, dtype=torch.bool).index_fill_(0, torch.tensor([0]), False)
                   .index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(True)))
    with pytest.raises(ValueError, match="got 0"):
        torch_bn.BatchNorm1d(3)(x, mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape without dim 1, \(4, 5\)"):
        batch_norm(x, None, None, training=True, mask=torch.ones(4, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        batch_norm(x, None, None, training=True, mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="only for plain batch norm"):
        batch_norm(x, None, None, training=True, mask=torch.ones(4, 5, dtype=torch.bool), backward="staged")


def test_print_largest_errors():
    print("\nmasked batch norm, max |float64 - reference|:", {k: f"{v:.2g}" for k, v in MAX_ERROR.items()})
