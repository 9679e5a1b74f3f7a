"""torch_bn.BatchNorm1d/2d against torch.nn's: outputs, gradients, buffers, state, errors."""
import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from torch import nn

import torch_bn
from torch_bn.functional import ChannelMismatchError, UnsupportedDtypeError

from helpers import PAIRS, make_pair

def run_and_compare(ours, theirs, shape, steps, dtype, atol, rtol, seed=0):
    """Train both for `steps` batches, then eval; compare outputs, grads and buffers."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for step in range(steps + 1):
        if step == steps:
            ours.eval(), theirs.eval()
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, atol=atol, rtol=rtol)
        worst = max(worst, (ya - yb).abs().max().item())
        params_a = [xa] + [p for p in (ours.weight, ours.bias) if p is not None]
        params_b = [xb] + [p for p in (theirs.weight, theirs.bias) if p is not None]
        for ga, gb in zip(torch.autograd.grad(ya, params_a, dy), torch.autograd.grad(yb, params_b, dy)):
            torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol)
            worst = max(worst, (ga - gb).abs().max().item())
        sa, sb = ours.state_dict(), theirs.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=rtol)
    return worst


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from([1, 2]),
    n=st.integers(2, 7),
    c=st.integers(1, 6),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    momentum=st.sampled_from([0.1, 0.5, 1.0, None]),
    affine=st.booleans(),
    bias=st.booleans(),
    track=st.booleans(),
    backward=st.sampled_from(["closed_form", "staged"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_matches_torch_nn(kind, n, c, spatial, eps, momentum, affine, bias, track, backward, dtype):
    if kind == 1:
        shape = (n, c) + tuple(spatial[:1])
    else:
        shape = (n, c) + tuple((spatial + [2, 3])[:2])
    ours, theirs = make_pair(kind, c, dtype, eps=eps, momentum=momentum, affine=affine, bias=bias,
                             track_running_stats=track, backward=backward)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    run_and_compare(ours, theirs, shape, steps=3, dtype=dtype, atol=tol, rtol=tol)


def test_largest_error_against_nn_batchnorm1d_float32():
    """The largest deviation from nn.BatchNorm1d over a realistic float32 run (50x100, 20 steps, eval)."""
    ours, theirs = make_pair(1, 100, torch.float32)
    worst = run_and_compare(ours, theirs, (50, 100), steps=20, dtype=torch.float32, atol=1e-4, rtol=1e-4)
    print(f"largest |torch_bn - nn.BatchNorm1d| in float32: {worst:.3g}")
    assert worst < 1e-4


@pytest.mark.parametrize("kind, shape, dtype, path", [(1, (50, 100), torch.float32, "cpp"),
                                                  (1, (50, 100), torch.float32, "reference"),
                                                  (1, (50, 100), torch.bfloat16, "cpp"),
                                                  (1, (512, 512), torch.float32, "fused"),
                                                  (1, (512, 512), torch.float32, "cpp"),
                                                  (2, (32, 16, 24, 24), torch.float32, "fused"),
                                                  (2, (32, 16, 24, 24), torch.float32, "cpp"),
                                                  (1, (512, 512), torch.bfloat16, "fused")])
def test_each_cpu_path_is_as_accurate_as_torch_nn(kind, shape, dtype, path, monkeypatch):
    """Each CPU body of BatchNormFunction, pinned (use_path): the reference ops, the compiled op,
    torch_bn.fused. Over 5 training steps and
    eval (float32, and bfloat16 input with float32 parameters), every output, gradient and buffer
    is within 2x (+1e-6) of nn.BatchNorm's own error against float64 nn.BatchNorm: sums over 18k
    values round differently, so the results need not agree bit for bit."""
    if path == "cpp" and not torch_bn.cpp.ENABLED:
        pytest.skip("the compiled op is switched off by TORCH_BN_CPP=0")
    monkeypatch.setattr(torch_bn.dispatch, "_mode", path)
    ours, theirs = make_pair(kind, shape[1], torch.float32)
    exact = PAIRS[kind][1](shape[1], dtype=torch.float64)
    exact.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        if step == 5:
            for m in (ours, theirs, exact):
                m.eval()
        # Inputs rounded to dtype first, so that float64 sees exactly what the others see.
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype).double()
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
        results = []
        for m, in_dtype in ((ours, dtype), (theirs, dtype), (exact, torch.float64)):
            xm = x.to(in_dtype).requires_grad_()
            y = m(xm)
            grads = torch.autograd.grad(y, (xm, m.weight, m.bias), dy.to(in_dtype))
            results.append([y, *grads, m.running_mean, m.running_var])
        for a, b, ref in zip(*results):
            err_ours, err_theirs = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
            assert err_ours <= 2 * err_theirs + 1e-6, (step, err_ours.item(), err_theirs.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", [1, 2])
def test_half_precision_input_float32_state(dtype, kind):
    shape = (16, 4, 5) if kind == 1 else (8, 4, 3, 3)
    bn = PAIRS[kind][0](4)
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3
    x = x64.to(dtype).requires_grad_()
    y = bn(x)
    assert y.dtype == dtype and bn.running_mean.dtype == torch.float32
    # Reference: float64 nn.BatchNorm on the same (rounded) input.
    ref = PAIRS[kind][1](4, dtype=torch.float64)
    yr = ref(x.detach().double())
    torch.testing.assert_close(y.double(), yr, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(bn.running_mean.double(), ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, atol=1e-5, rtol=1e-5)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and bn.weight.grad.dtype == torch.float32


def test_state_dict_loads_both_ways():
    ours, theirs = make_pair(2, 5, torch.float32)
    x = torch.randn(4, 5, 3, 3)
    theirs(x)
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    ours(x * 2 + 1)
    theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[k], v)


def test_reset_and_repr():
    bn = torch_bn.BatchNorm1d(3, momentum=None, bias=False)
    ref = nn.BatchNorm1d(3, momentum=None, bias=False)
    assert repr(bn) == repr(ref)
    assert "backward='staged'" in repr(torch_bn.BatchNorm1d(3, backward="staged"))
    bn(torch.randn(4, 3) + 5)
    with torch.no_grad():
        bn.weight.fill_(3)
    bn.reset_running_stats()
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all() and bn.num_batches_tracked == 0
    assert bn.weight.eq(3).all()
    bn.reset_parameters()
    assert bn.weight.eq(1).all()
    with pytest.raises(ValueError, match="backward must be one of"):
        torch_bn.BatchNorm2d(3, backward="fused")


@pytest.mark.parametrize("training", [True, False])
def test_convert_resnet18_parity(training):
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    original.train()
    original(x)  # non-trivial running statistics before the comparison
    original.train(training)
    reference = torchvision.models.resnet18(num_classes=10).double()
    reference.load_state_dict(original.state_dict())
    reference.train(training)
    converted = torch_bn.convert(original)
    kinds = {type(m) for m in converted.modules()}
    assert nn.BatchNorm2d not in kinds and torch_bn.BatchNorm2d in kinds
    assert converted.training == training
    ya, yb = converted(x), reference(x)
    torch.testing.assert_close(ya, yb, atol=1e-9, rtol=1e-9)
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(converted.conv1.weight.grad, reference.conv1.weight.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(converted.bn1.running_var, reference.bn1.running_var)


def test_convert_shares_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    weight, running_mean = model[1].weight, model[1].running_mean
    out = torch_bn.convert(model)
    assert out is model and isinstance(model[1], torch_bn.BatchNorm1d)
    assert model[1].weight is weight and model[1].running_mean is running_mean
    single = torch_bn.convert(nn.BatchNorm1d(3).eval())
    assert isinstance(single, torch_bn.BatchNorm1d) and not single.training


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 6), torch_bn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    compiled_model = nn.Sequential(nn.Linear(8, 6), torch_bn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 8)
    ya, yb = eager(x), compiled(x)
    torch.testing.assert_close(yb, ya)
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(compiled_model[0].weight.grad, eager[0].weight.grad)
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    bn = torch_bn.BatchNorm2d(3)
    ref = torch_bn.BatchNorm2d(3)
    compiled = torch.compile(bn, fullgraph=True)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    dy = torch.randn_like(y)
    y.backward(dy), y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)


@pytest.mark.parametrize(
    "module, x, error, message",
    [
        (torch_bn.BatchNorm1d(3), torch.randn(2, 3, 4, 5), ValueError, r"expected 2D or 3D input \(got 4D input\)"),
        (torch_bn.BatchNorm1d(3), torch.randn(3), ValueError, r"expected 2D or 3D input \(got 1D input\)"),
        (torch_bn.BatchNorm2d(3), torch.randn(2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
        (torch_bn.BatchNorm1d(4), torch.randn(5, 3), RuntimeError, r"running_mean has 4 elements but the input has 3 channels"),
        (torch_bn.BatchNorm1d(4, track_running_stats=False), torch.randn(5, 3), ValueError, r"weight has 4 elements but the input has 3 channels"),
        (torch_bn.BatchNorm1d(3), torch.randn(1, 3), ValueError, r"Expected more than 1 value per channel when training"),
        (torch_bn.BatchNorm1d(3), torch.randn(1, 3, 1), ValueError, r"Expected more than 1 value per channel when training"),
        (torch_bn.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, r"Expected more than 1 value per channel when training"),
        (torch_bn.BatchNorm1d(3), torch.randint(0, 5, (4, 3)), NotImplementedError, r"expects a floating-point input, got torch.int64"),
        (torch_bn.BatchNorm1d(3), torch.randint(0, 5, (4, 3)), TypeError, r"convert it first"),
    ],
)
def test_bad_input_raises_clear_error(module, x, error, message):
    with pytest.raises(error, match=message):
        module(x)


def test_error_classes_cover_both_contracts():
    assert issubclass(ChannelMismatchError, RuntimeError) and issubclass(ChannelMismatchError, ValueError)
    assert issubclass(UnsupportedDtypeError, NotImplementedError) and issubclass(UnsupportedDtypeError, TypeError)


def test_single_value_per_channel_is_fine_in_eval():
    bn = torch_bn.BatchNorm1d(3).eval()
    ref = nn.BatchNorm1d(3).eval()
    x = torch.randn(1, 3)
    torch.testing.assert_close(bn(x), ref(x))


def test_eval_without_running_stats_needs_them_in_functional():
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        torch_bn.functional.batch_norm(torch.randn(4, 3), None, None, training=False)


@pytest.mark.parametrize("path", ["cpp", "reference", "fused"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_every_training_batch_is_counted_once(path, momentum, monkeypatch):
    """num_batches_tracked (and with momentum=None the cumulative average it drives) as nn's, on each
    CPU path pinned, whether the forward records a graph, runs under no_grad or gets an empty batch;
    evaluation counts nothing. The compiled forward counts inside its own call, the others in Python."""
    if path == "cpp" and not torch_bn.cpp.ENABLED:
        pytest.skip("the compiled op is switched off by TORCH_BN_CPP=0")
    monkeypatch.setattr(torch_bn.dispatch, "_mode", path)
    ours, theirs = make_pair(1, 6, torch.float64, momentum=momentum)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3)] + [torch.empty(0, 6, dtype=torch.float64)]
    for step, x in enumerate(batches):
        for m in (ours, theirs):
            if step == 1:
                with torch.no_grad():
                    m(x)
            else:
                m(x.clone().requires_grad_(step != 2))
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == step + 1
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(batches[0]), theirs(batches[0]), rtol=1e-12, atol=1e-12)
    assert ours.num_batches_tracked.item() == 4


def test_a_refused_batch_is_not_counted():
    """A training call that raises (here: input with the wrong channel count) leaves the counter and
    the running statistics as they were: nothing of that batch was normalized. (nn.BatchNorm1d
    counts it before F.batch_norm refuses it.)"""
    bn = torch_bn.BatchNorm1d(4)
    with pytest.raises(ChannelMismatchError):
        bn(torch.randn(8, 5))
    assert bn.num_batches_tracked.item() == 0 and bn.running_mean.eq(0).all()


def test_parametrized_weight_matches_torch_nn():
    """A parametrization on weight (torch.nn.utils.parametrize moves it out of _parameters, behind a
    property): the layer reads the parametrized value, as nn's does, and the gradient reaches
    the original."""
    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    ours, theirs = make_pair(1, 5, torch.float64)
    for m in (ours, theirs):
        torch.nn.utils.parametrize.register_parametrization(m, "weight", Positive())
    x = torch.randn(7, 5, dtype=torch.float64)
    ya, yb = ours(x), theirs(x)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(ya.pow(2).sum(), ours.parametrizations.weight.original)
    gb = torch.autograd.grad(yb.pow(2).sum(), theirs.parametrizations.weight.original)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ours.weight, ours.parametrizations.weight.original)
