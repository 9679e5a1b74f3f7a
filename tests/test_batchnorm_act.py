"""BatchNormAct1d/2d/3d: equal to nn's batch norm followed by the activation (outputs, gradients,
running statistics, state_dict), gradcheck in float64, exact where weight -> 0 or ELU saturates,
and the bytes saved for backward within 55% of the nn stack's for the batch norm + activation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_bn
from bench import saved_bytes
from torch_bn.batchnorm_act import AMPLIFICATION_LIMIT, BatchNormActFunction

ACTS = {"leaky_relu": lambda: nn.LeakyReLU(0.01), "elu": lambda: nn.ELU(1.0), "identity": nn.Identity}
CLASSES = {1: (torch_bn.BatchNormAct1d, nn.BatchNorm1d), 2: (torch_bn.BatchNormAct2d, nn.BatchNorm2d),
           3: (torch_bn.BatchNormAct3d, nn.BatchNorm3d)}
SHAPES = {1: (16, 6), 2: (4, 6, 5, 3), 3: (2, 6, 3, 4, 3)}


def pair(dims, activation, c=6, dtype=torch.float32, weight=None, **kwargs):
    """Our layer and nn's batch norm + activation, with the same random weight (|weight| >= 0.1,
    both signs) and bias."""
    ours_cls, bn_cls = CLASSES[dims]
    ours = ours_cls(c, activation=activation, dtype=dtype, **kwargs)
    bn = bn_cls(c, dtype=dtype, **kwargs)
    if ours.affine:
        gen = torch.Generator().manual_seed(1)
        if weight is None:
            weight = (torch.rand(c, generator=gen, dtype=dtype) * 1.9 + 0.1) * (torch.randint(0, 2, (c,), generator=gen) * 2 - 1)
        with torch.no_grad():
            ours.weight.copy_(weight)
            bn.weight.copy_(weight)
            if ours.bias is not None:
                ours.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
                bn.bias.copy_(ours.bias)
    return ours, nn.Sequential(bn, ACTS[activation]())


def grads(model, x, dy):
    x = x.detach().requires_grad_()
    y = model(x)
    params = [p for p in model.parameters()]
    return [y] + list(torch.autograd.grad(y, [x] + params, dy))


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_outputs_gradients_and_running_statistics_equal_nn(dims, activation):
    ours, theirs = pair(dims, activation)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(SHAPES[dims], generator=gen) * 2 + 0.5
        dy = torch.randn(SHAPES[dims], generator=gen)
        for a, b in zip(grads(ours, x, dy), grads(theirs, x, dy)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bn = theirs[0]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(bn, name))
    ours.eval(), theirs.eval()
    for a, b in zip(grads(ours, x, dy), grads(theirs, x, dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"bias": False}, {"track_running_stats": False},
                                    {"momentum": None}])
def test_arguments_and_state_dict_as_batch_norm(kwargs):
    ours, theirs = pair(2, "elu", **kwargs)
    assert list(ours.state_dict()) == list(theirs[0].state_dict())
    ours.load_state_dict(theirs[0].state_dict())
    x, dy = torch.randn(4, 6, 3, 3) + 1, torch.randn(4, 6, 3, 3)
    for mode in (True, False, True):
        ours.train(mode), theirs.train(mode)
        for a, b in zip(grads(ours, x, dy), grads(theirs, x, dy)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ours.state_dict().keys() == theirs[0].state_dict().keys()
    for k, v in theirs[0].state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.1), ("leaky_relu", 2.0), ("elu", 1.0), ("elu", 0.5),
                                              ("identity", 0.0)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_gradcheck_float64(activation, param, affine):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) if affine != "none" else None
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) if affine == "both" else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        x, w, b = (list(args) + [None, None])[:3]
        return BatchNormActFunction.apply(x, w, b, 1e-5, activation, param)[0]

    assert torch.autograd.gradcheck(f, inputs)


def reference_grads(x, w, b, dy, activation, eps=1e-5):
    """Autograd through batch norm written from its definition, then the activation, float64."""
    x, w, b = (t.double().detach().requires_grad_() for t in (x, w, b))
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    z = (x - mean) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)
    y = {"leaky_relu": lambda t: nn.functional.leaky_relu(t, 0.01), "elu": nn.functional.elu,
         "identity": lambda t: t}[activation](z)
    return torch.autograd.grad(y, (x, w, b), dy.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", list(ACTS))
def test_exact_where_weight_is_tiny_or_zero(activation, dtype):
    """Channels with |weight| near 0 keep their input for backward: gradients stay exact."""
    w = torch.tensor([1.0, 0.0, 1e-7, -1e-4, 0.5, 1e-2], dtype=dtype)
    ours, _ = pair(2, activation, dtype=dtype, weight=w)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=gen, dtype=dtype) * 3 + 1
    dy = torch.randn(4, 6, 5, 5, generator=gen, dtype=dtype)
    _, dx, dw, db = grads(ours, x, dy)
    ex, ew, eb = reference_grads(x, ours.weight, ours.bias, dy, activation)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for a, e in ((dx, ex), (dw, ew), (db, eb)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), e, **tol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 6), c=st.integers(1, 5), spatial=st.lists(st.integers(1, 3), max_size=3),
       activation=st.sampled_from(list(ACTS)), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       offset=st.sampled_from([0.0, -4.0, 100.0]), weight_scale=st.sampled_from([0.0, 1e-9, 1e-3, 1.0, 20.0]))
def test_any_shape_and_weight_float64(n, c, spatial, activation, scale, offset, weight_scale):
    """Random shapes 2D to 5D, inputs far from zero, weights from 0 to large: the gradients of the
    definition (through autograd), whether a channel's input is recovered from y or kept."""
    gen = torch.Generator().manual_seed(n * 100 + c)
    shape = (n, c, *spatial)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.randn(c, generator=gen, dtype=torch.float64) * weight_scale
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 3
    x_, w_, b_ = (t.clone().requires_grad_() for t in (x, w, b))
    y = BatchNormActFunction.apply(x_, w_, b_, 1e-5, activation, 0.01 if activation == "leaky_relu" else 1.0)[0]
    got = torch.autograd.grad(y, (x_, w_, b_), dy)
    for a, e in zip(got, reference_grads(x, w, b, dy, activation)):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-7)


def kept_channels(ours, x):
    """How many channels' inputs the Function kept for backward (beyond its output)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours(x.requires_grad_())
    big = [t for t in kept if t.dim() == x.dim() and t.data_ptr() != 0]
    return [t.shape[1] for t in big[1:]]  # big[0] is the output y


def test_what_is_kept_only_grows_with_the_unsafe_channels():
    x = torch.randn(4, 6, 5, 5)
    safe, _ = pair(2, "leaky_relu")
    assert kept_channels(safe, x) == []
    tiny, _ = pair(2, "leaky_relu", weight=torch.tensor([1.0, 0.0, 1e-7, 1.0, 1.0, 1.0]))
    assert kept_channels(tiny, x) == [2]
    half, _ = pair(2, "leaky_relu", dtype=torch.bfloat16)
    assert kept_channels(half, x.bfloat16()) == [6]  # the input itself, not a copy


def test_elu_deep_in_its_flat_tail_stays_exact():
    """z far below 0: exp(z) underflows y + alpha to nothing, so the inverse is lost; those
    channels keep their input (AMPLIFICATION_LIMIT)."""
    w = torch.tensor([30.0, 1.0, 5.0])
    ours, _ = pair(2, "elu", c=3, weight=w)
    with torch.no_grad():
        ours.bias.copy_(torch.tensor([-10.0, 0.0, -3.0]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=gen)
    dy = torch.randn(8, 3, 4, 4, generator=gen)
    assert kept_channels(ours, x.clone()) == [2]
    _, dx, dw, db = grads(ours, x, dy)
    ex, ew, eb = reference_grads(x, ours.weight, ours.bias, dy, "elu")
    for a, e in ((dx, ex), (dw, ew), (db, eb)):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
    assert AMPLIFICATION_LIMIT == 256.0


def test_bfloat16_as_nn_in_bfloat16_within_its_rounding():
    # bfloat16 in, computed in float32, rounded once on the way out: against nn in float32 on the
    # same (bfloat16-rounded) values, each result is within one bfloat16 rounding of its scale
    # (2^-8 relative; 2^-7 allowed). Against unrounded float32 inputs the inputs' own rounding
    # would dominate, as it does for nn in bfloat16 (errors up to 0.8 on these draws).
    ours, theirs = pair(2, "leaky_relu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(4, 6, 5, 5, generator=gen).bfloat16()
        dy = torch.randn(4, 6, 5, 5, generator=gen).bfloat16()
        expected = grads(theirs, x.float(), dy.float())
        got = grads(ours, x, dy)
        assert got[0].dtype == torch.bfloat16
        for a, e in zip(got, expected):
            torch.testing.assert_close(a.float(), e, rtol=0, atol=2.0 ** -7 * e.abs().max().item())


def test_clear_errors():
    with pytest.raises(ValueError, match="negative_slope must be > 0"):
        torch_bn.BatchNormAct2d(4, negative_slope=0.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        torch_bn.BatchNormAct2d(4, activation="elu", alpha=-1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch_bn.BatchNormAct2d(4, activation="relu")
    with pytest.raises(ValueError, match="expected 4D input"):
        torch_bn.BatchNormAct2d(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch_bn.BatchNormAct1d(4)(torch.randn(1, 4))
    m = torch_bn.BatchNormAct2d(4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|does not require grad"):
        g.sum().backward()


def test_not_matched_as_batch_norm_by_isinstance_tools():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), torch_bn.BatchNormAct2d(4))
    assert not isinstance(m[1], nn.BatchNorm2d)
    assert type(torch_bn.convert_sync_batchnorm(m)[1]) is torch_bn.BatchNormAct2d
    assert type(torch_bn.freeze(m)[1]) is torch_bn.BatchNormAct2d
    assert "activation='leaky_relu', negative_slope=0.01" in repr(m[1])


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_saved_bytes_at_most_55_percent_of_the_nn_stack(activation):
    r = saved_bytes.measure((16, 32, 32, 32), 4, activation)
    assert r["ratio"]["bn+act"] <= 0.55
    # The nn stack keeps two input-sized tensors per block (BN's input, the activation's input),
    # torch_bn one (its output) and per-channel vectors.
    assert r["nn"]["bn+act"] >= 8 * r["input_bytes"]
    assert 4 * r["input_bytes"] <= r["torch_bn"]["bn+act"] < 4.1 * r["input_bytes"]
    assert r["torch_bn"]["total"] < r["nn"]["total"]
