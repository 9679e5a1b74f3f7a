"""Ghost batch norm: torch_bn.GhostBatchNorm1d/2d/3d and batch_norm(..., virtual_batch_size=V)
against a float64 loop over chunks written from the issue's equations (tests/variant_references.py),
gradcheck, gradgradcheck and forward AD in float64, V >= N as batch norm, modules and errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import torch_bn
from helpers import float64_inputs
from torch_bn.functional import batch_norm, batch_norm_stateless
from variant_references import _affine, _ch, ghost_reference

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
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((rm1, rv1), (new_mean, new_var), rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, w, b) if t is not None]
    for g, r in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
        record("ghost grad", g, r)
    record("ghost y", y, y_ref)
    record("ghost running", torch.cat([rm1, rv1]), torch.cat([new_mean, new_var]))




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


def test_print_largest_errors():
    print("\nghost batch norm, max |float64 - reference|:", {k: f"{v:.2g}" for k, v in MAX_ERROR.items()})
