"""batch_norm_stateless and torch_bn.func.functional_call against PyTorch's modules and plain autograd.

Every transform (grad, grad_and_value, vjp, jacrev, jacfwd, jvp, hessian, vmap) through a torch_bn model
is compared, in float64, with an ordinary step of the same model built from nn.BatchNorm1d/2d, whose
buffers PyTorch updates in place.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call as torch_functional_call

import torch_bn
from torch_bn.functional import batch_norm_stateless

TOL = dict(atol=1e-10, rtol=1e-10)


def models(norm_cls, bn_kwargs=None, seed=0):
    """A small MLP with two BN layers (torch_bn's), and the same weights with nn's BN layers."""
    def build(cls):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 5), cls(5, **(bn_kwargs or {})), nn.Tanh(),
                             nn.Linear(5, 4), cls(4, **(bn_kwargs or {})), nn.Tanh(), nn.Linear(4, 3)).double()
    ours, theirs = build(norm_cls[0]), build(norm_cls[1])
    with torch.no_grad():  # non-trivial affine parameters and running statistics, identical in both
        for a, b in zip(ours.modules(), theirs.modules()):
            if isinstance(b, nn.BatchNorm1d):
                for t, u in zip((a.weight, a.bias, a.running_mean, a.running_var),
                                (b.weight, b.bias, b.running_mean, b.running_var)):
                    if t is not None:
                        t.copy_(torch.rand_like(t) + 0.5)
                        u.copy_(t)
    return ours, theirs


BN1D = (torch_bn.BatchNorm1d, nn.BatchNorm1d)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loss_fn(out, target):
    return F.cross_entropy(out, target)


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def reference_step(theirs, x, y):
    """Loss, parameter gradients and buffers after one ordinary autograd step of nn's model."""
    theirs.zero_grad()
    loss = loss_fn(theirs(x), y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in theirs.named_parameters()}, state_buffers(theirs)


def state_buffers(model):
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def assert_dicts_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or TOL), msg=lambda m: f"{k}: {m}")


# ---- batch_norm_stateless ---------------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(n=st.integers(2, 9), c=st.integers(1, 5), length=st.sampled_from([None, 1, 3]),
       momentum=st.floats(0.0, 1.0), affine=st.booleans(), training=st.booleans(), seed=st.integers(0, 2**16))
def test_stateless_equals_f_batch_norm_and_mutates_nothing(n, c, length, momentum, affine, training, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) if length is None else (n, c, length)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    mean, var = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.1
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    given_mean, given_var = mean.clone(), var.clone()
    y, new_mean, new_var = batch_norm_stateless(x, mean, var, w, b, training, momentum, 1e-5)
    torch.testing.assert_close(mean, given_mean, atol=0, rtol=0)  # nothing written
    torch.testing.assert_close(var, given_var, atol=0, rtol=0)
    expected = F.batch_norm(x, given_mean, given_var, w, b, training, momentum, 1e-5)  # updates in place
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(new_mean, given_mean, **TOL)
    torch.testing.assert_close(new_var, given_var, **TOL)


def test_stateless_without_running_statistics_and_errors():
    x = torch.randn(5, 3, dtype=torch.float64)
    y, m, v = batch_norm_stateless(x, None, None, training=True)
    assert m is None and v is None
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), **TOL)
    with pytest.raises(ValueError, match="evaluation mode.*needs running_mean and running_var"):
        batch_norm_stateless(x, None, None, training=False)
    with pytest.raises(ValueError, match="running_mean has 4 elements but the input has 3 channels"):
        batch_norm_stateless(x, torch.zeros(4), torch.ones(4), training=True)


def test_stateless_gradcheck_forward_ad_and_batched_grad():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for training in (True, False):
        def f(x, w, b):
            return batch_norm_stateless(x, mean, var, w, b, training, 0.1, 1e-5)

        assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


def test_stateless_new_statistics_are_not_differentiable():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    running = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    _, m, v = batch_norm_stateless(x, running, torch.ones(3, dtype=torch.float64), training=True)
    assert not m.requires_grad and not v.requires_grad  # as nn.BatchNorm's buffers


def test_stateless_momentum_tensor_is_a_cumulative_average_under_vmap():
    x = torch.randn(3, 8, 4, dtype=torch.float64)  # 3 chunks
    count = torch.tensor([1, 2, 5])  # a different num_batches_tracked per chunk

    def f(xc, t):
        return batch_norm_stateless(xc, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                    training=True, momentum=1.0 / t.double())

    _, m, v = torch.func.vmap(f)(x, count)
    for i in range(3):
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        F.batch_norm(x[i], rm, rv, training=True, momentum=1.0 / count[i].item())
        torch.testing.assert_close(m[i], rm, **TOL)
        torch.testing.assert_close(v[i], rv, **TOL)


# ---- functional_call under transforms ---------------------------------------------------------

def ours_loss(model):
    def f(params, buffers, x, y):
        out, new_buffers = torch_bn.func.functional_call(model, {**params, **buffers}, (x,))
        return loss_fn(out, y), new_buffers
    return f


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grad_and_value_equal_an_ordinary_step(mode):
    ours, theirs = models(BN1D)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    before = state(ours)
    x, y = data()
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    grads, (loss, new_buffers) = torch.func.grad_and_value(ours_loss(ours), has_aux=True)(params, buffers, x, y)
    ref_loss, ref_grads, ref_buffers = reference_step(theirs, x, y)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_dicts_close(grads, ref_grads)
    assert_dicts_close(new_buffers, ref_buffers)
    assert_dicts_close(state(ours), before, atol=0, rtol=0)  # the module itself is untouched
    if mode == "train":
        assert new_buffers["1.num_batches_tracked"].item() == 1
        assert not torch.equal(new_buffers["1.running_mean"], before["1.running_mean"])
    grads2, aux = torch.func.grad(ours_loss(ours), has_aux=True)(params, buffers, x, y)
    assert_dicts_close(grads2, ref_grads)
    assert_dicts_close(aux, ref_buffers)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vjp_and_jacrev_equal_plain_autograd(mode):
    ours, theirs = models(BN1D)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x, _ = data()
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())

    def out_fn(params, x):
        out, new_buffers = torch_bn.func.functional_call(ours, {**params, **buffers}, (x,))
        return out, new_buffers

    # Plain autograd: torch.autograd.functional.jacobian of nn's model on fresh buffer copies.
    def theirs_out(x, *flat):
        p = dict(zip(params, flat))
        return torch_functional_call(theirs, {**p, **{k: v.clone() for k, v in buffers.items()}}, (x,))

    ref_jac = torch.autograd.functional.jacobian(theirs_out, (x, *params.values()))
    jac_x, jac_p = torch.func.jacrev(lambda x, p: out_fn(p, x)[0], argnums=(0, 1))(x, params)
    torch.testing.assert_close(jac_x, ref_jac[0], **TOL)
    for name, j in zip(params, ref_jac[1:]):
        torch.testing.assert_close(jac_p[name], j, **TOL)

    out, vjp_fn, new_buffers = torch.func.vjp(out_fn, params, x, has_aux=True)
    cot = torch.randn_like(out)
    g_params, g_x = vjp_fn(cot)
    theirs.zero_grad()
    xr = x.clone().requires_grad_()
    theirs(xr).backward(cot)
    torch.testing.assert_close(g_x, xr.grad, **TOL)
    assert_dicts_close(g_params, {k: p.grad for k, p in theirs.named_parameters()})
    assert_dicts_close(new_buffers, state_buffers(theirs))


def test_forward_ad_jacfwd_jvp_hessian_equal_reverse_mode():
    ours, _ = models(BN1D)
    x, y = data()
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    loss = lambda p: ours_loss(ours)(p, buffers, x, y)[0]  # noqa: E731
    fwd = torch.func.jacfwd(loss)(params)
    rev = torch.func.jacrev(loss)(params)
    assert_dicts_close(fwd, rev)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    _, jvp_out = torch.func.jvp(loss, (params,), (tangents,))
    torch.testing.assert_close(jvp_out, sum((rev[k] * tangents[k]).sum() for k in params), **TOL)

    # hessian (jacfwd of jacrev) of the loss in one layer's weights against double backward.
    w = params["3.weight"]
    h = torch.func.hessian(lambda w: loss({**params, "3.weight": w}))(w)
    wr = w.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss({**params, "3.weight": wr}), wr, create_graph=True)
    rows = [torch.autograd.grad(g.flatten()[i], wr, retain_graph=True)[0] for i in range(g.numel())]
    torch.testing.assert_close(h.reshape(g.numel(), -1), torch.stack(rows).reshape(g.numel(), -1), **TOL)
    # The input's jacobian by forward and by reverse mode.
    jx_f = torch.func.jacfwd(lambda x: ours_loss(ours)(params, buffers, x, y)[0])(x)
    jx_r = torch.func.jacrev(lambda x: ours_loss(ours)(params, buffers, x, y)[0])(x)
    torch.testing.assert_close(jx_f, jx_r, **TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vmap_over_chunks_with_unbatched_buffers_equals_a_loop(mode):
    ours, theirs = models(BN1D)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x, y = data(n=16)
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    xs, ys = x.view(4, 4, 6), y.view(4, 4)
    grads, (losses, new_buffers) = torch.func.vmap(
        torch.func.grad_and_value(ours_loss(ours), has_aux=True), in_dims=(None, None, 0, 0))(params, buffers, xs, ys)
    assert new_buffers["1.running_mean"].shape == (4, 5)  # one set of statistics per chunk
    start = state(theirs)
    for i in range(4):
        theirs.load_state_dict(start)  # every chunk starts from the same buffers
        ref_loss, ref_grads, ref_buffers = reference_step(theirs, xs[i], ys[i])
        torch.testing.assert_close(losses[i], ref_loss, **TOL)
        assert_dicts_close({k: g[i] for k, g in grads.items()}, ref_grads)
        assert_dicts_close({k: b[i] for k, b in new_buffers.items()}, ref_buffers)


def test_batchnorm2d_under_vmap_and_grad():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), torch_bn.BatchNorm2d(3), nn.ReLU()).double()
    theirs = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)  # 3 chunks of 4 images
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())

    def f(params, x):
        out, nb = torch_bn.func.functional_call(ours, {**params, **buffers}, (x,))
        return out.square().mean(), nb

    grads, nb = torch.func.vmap(torch.func.grad(f, has_aux=True), in_dims=(None, 0))(params, x)
    start = state(theirs)
    for i in range(3):
        theirs.load_state_dict(start)
        theirs.zero_grad()
        theirs(x[i]).square().mean().backward()
        assert_dicts_close({k: g[i] for k, g in grads.items()}, {k: p.grad for k, p in theirs.named_parameters()})
        assert_dicts_close({k: b[i] for k, b in nb.items()}, state_buffers(theirs))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_after_k_steps_equal_nn(momentum):
    ours, theirs = models(BN1D, {"momentum": momentum})
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    step = torch.func.grad(ours_loss(ours), has_aux=True)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    params = {k: v.detach().clone() for k, v in params.items()}
    for k in range(5):
        x, y = data(seed=10 + k)
        grads, buffers = step(params, buffers, x, y)
        params = {n: p - 0.1 * grads[n] for n, p in params.items()}
        opt.zero_grad()
        loss_fn(theirs(x), y).backward()
        opt.step()
    assert_dicts_close(buffers, state_buffers(theirs))
    assert buffers["1.num_batches_tracked"].item() == 5
    assert_dicts_close(params, {k: p.detach() for k, p in theirs.named_parameters()})


def test_shared_layer_updates_twice_and_other_buffers_pass_through():
    bn = torch_bn.BatchNorm1d(3).double()
    model = nn.Sequential(bn, nn.Identity(), bn)
    model.register_buffer("counter", torch.tensor(7.0))
    ref = nn.BatchNorm1d(3).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    out, nb = torch_bn.func.functional_call(model, {}, (x,))
    torch.testing.assert_close(out, ref(ref(x)), **TOL)
    assert nb.keys() == dict(model.named_buffers()).keys()
    torch.testing.assert_close(nb["0.running_mean"], ref.running_mean, **TOL)
    assert nb["0.num_batches_tracked"].item() == 2 and bn.num_batches_tracked.item() == 0
    assert nb["counter"] is model.counter


def test_track_running_stats_false_returns_no_updates():
    model = nn.Sequential(torch_bn.BatchNorm1d(3, track_running_stats=False)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    out, nb = torch_bn.func.functional_call(model, {}, (x,))
    assert nb == {}
    torch.testing.assert_close(out, F.batch_norm(x, None, None, model[0].weight, model[0].bias, True), **TOL)


def test_nested_functional_call_is_refused():
    inner = torch_bn.BatchNorm1d(3)

    class Outer(nn.Module):
        def forward(self, x):
            return torch_bn.func.functional_call(inner, {}, (x,))[0]

    with pytest.raises(RuntimeError, match="cannot be nested"):
        torch_bn.func.functional_call(Outer(), {}, (torch.randn(4, 3),))
    inner(torch.randn(4, 3))  # and the layer works normally afterwards
    assert inner.num_batches_tracked.item() == 1


def test_stateless_under_torch_compile_equals_eager():
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    f = lambda x: batch_norm_stateless(x, mean, var, training=True)  # noqa: E731
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(x), f(x)):
        torch.testing.assert_close(a, b, **TOL)
    (g1,) = torch.autograd.grad(compiled(x)[0].square().sum(), x)
    (g2,) = torch.autograd.grad(f(x)[0].square().sum(), x)
    torch.testing.assert_close(g1, g2, **TOL)
