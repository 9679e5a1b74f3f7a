"""torch_bn as a true drop-in: recognised by PyTorch tooling (isinstance, SyncBatchNorm, torch.fx,
torchvision's feature extractor), PyTorch's checks and exception types, state_dict versioning,
zero-size batches, BatchNorm3d and the lazy classes, the way back to torch.nn, docstrings.
Forward-mode AD is in test_forward_ad.py."""
import doctest
import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import torch_bn
import torch_bn.modules

OURS = {1: torch_bn.BatchNorm1d, 2: torch_bn.BatchNorm2d, 3: torch_bn.BatchNorm3d}
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
LAZY = {1: (torch_bn.LazyBatchNorm1d, nn.LazyBatchNorm1d), 2: (torch_bn.LazyBatchNorm2d, nn.LazyBatchNorm2d),
        3: (torch_bn.LazyBatchNorm3d, nn.LazyBatchNorm3d)}
SHAPES = {1: (6, 3, 4), 2: (4, 3, 2, 3), 3: (3, 3, 2, 2, 3)}


def outcome(fn):
    """(result, None) or (None, exception) of fn()."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the exception is the result under test
        return None, e


# 1. subclasses of nn's classes ---------------------------------------------------------------

@pytest.mark.parametrize("kind", [1, 2, 3])
def test_layers_are_instances_of_nn_batchnorm(kind):
    bn = OURS[kind](3)
    assert isinstance(bn, THEIRS[kind]) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.__constants__ == THEIRS[kind].__constants__
    # forward and autograd stay torch_bn's
    y = bn(torch.randn(SHAPES[kind], requires_grad=True))
    # on every path, the compiled op's included: its C++ ops are the Function's bodies
    assert issubclass(y.grad_fn._forward_cls, torch_bn.BatchNormFunction), type(y.grad_fn)


def test_sync_batchnorm_conversion_finds_torch_bn_layers():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), torch_bn.BatchNorm2d(3), torch_bn.BatchNorm1d(3))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm) and isinstance(converted[2], nn.SyncBatchNorm)


def test_norm_layer_parameter_groups_find_torch_bn_layers():
    """The usual "no weight decay on norm layers" split, by isinstance."""
    model = torch_bn.convert(torchvision.models.resnet18(num_classes=10))
    norm = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)]
    assert len(norm) == 2 * 20  # resnet18: 20 BatchNorm2d layers, weight and bias each


# 2. eps checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("eps, training", [(0.0, True), (-1e-3, True), (-1e-3, False), (0.0, False)])
def test_eps_checked_as_pytorch(eps, training):
    x = torch.ones(4, 3)
    ours, theirs = torch_bn.BatchNorm1d(3, eps=eps).train(training), nn.BatchNorm1d(3, eps=eps).train(training)
    ref, ref_err = outcome(lambda: theirs(x))
    got, err = outcome(lambda: ours(x))
    if ref_err is None:  # eps=0 in evaluation mode is allowed
        assert err is None and torch.equal(got, ref)
    else:
        assert isinstance(err, type(ref_err)) and isinstance(err, ValueError)
        assert ("positive" if training else "non-negative") in str(err)


# 3. state_dict without num_batches_tracked ---------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_old_checkpoint_keeps_num_batches_tracked(momentum):
    ours, theirs = torch_bn.BatchNorm1d(3, momentum=momentum), nn.BatchNorm1d(3, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 3, generator=g)
        ours(x), theirs(x)
    old = theirs.state_dict()
    del old["num_batches_tracked"]
    old._metadata = {"": {"version": 1}}
    ours.load_state_dict(old), theirs.load_state_dict(old)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    x = torch.randn(8, 3, generator=g) + 10  # with momentum=None a reset count would make this batch the average
    ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    # strict=False without the key: the count stays as well
    new = theirs.state_dict()
    del new["num_batches_tracked"]
    ours.load_state_dict(new, strict=False)
    assert ours.num_batches_tracked.item() == 4


# 4. zero-size batches ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_zero_size_batch_as_pytorch(kind, momentum):
    ours, theirs = OURS[kind](3, momentum=momentum), THEIRS[kind](3, momentum=momentum)
    x = torch.randn(SHAPES[kind]) * 2 + 1
    for m in (ours, theirs):
        m(x)  # non-trivial running statistics first
    shape = (0,) + SHAPES[kind][1:]
    results = []
    for m in (ours, theirs):
        x = torch.randn(shape, requires_grad=True)
        y = m(x)
        y.sum().backward()
        results.append((y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, m.num_batches_tracked))
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    assert ours.num_batches_tracked.item() == 2 and ours.weight.grad.eq(0).all()


def test_zero_size_in_eval_and_functional():
    bn = torch_bn.BatchNorm2d(3).eval()
    assert bn(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)
    assert torch_bn.functional.batch_norm(torch.randn(0), None, None, training=True).shape == (0,)
    assert torch_bn.functional.batch_norm(torch.randn(0, 3), None, None, training=True).shape == (0, 3)
    y = torch_bn.BatchNorm1d(3)(torch.randn(4, 3, 0))  # zero length, as PyTorch: empty output
    assert y.shape == (4, 3, 0)


# 6. torch.fx ------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_fx_symbolic_trace_one_node_same_numbers(momentum):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), torch_bn.BatchNorm2d(3, momentum=momentum), nn.ReLU())
    reference = nn.Sequential(nn.Conv2d(3, 3, 1), torch_bn.BatchNorm2d(3, momentum=momentum), nn.ReLU())
    reference.load_state_dict(model.state_dict())
    traced = torch.fx.symbolic_trace(model)
    bn_nodes = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "1"]
    assert len(bn_nodes) == 1 and len(list(traced.graph.nodes)) == 5  # input, conv, bn, relu, output
    for step in range(4):
        if step == 3:
            traced.eval(), reference.eval()
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(traced(x), reference(x))
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(traced.state_dict()[k], v)
    alone = torch.fx.symbolic_trace(nn.Sequential(torch_bn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="expected 4D input"):
        alone(torch.randn(4, 3, 5))


@pytest.mark.slow
def test_create_feature_extractor_on_converted_resnet18():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).double().eval()
    ours = torch_bn.convert(torchvision.models.resnet18(num_classes=10)).double().eval()
    ours.load_state_dict(plain.state_dict())
    nodes = {"layer1.0.bn1": "bn", "layer2": "layer2", "fc": "out"}
    fe_ours, fe_plain = create_feature_extractor(ours, nodes), create_feature_extractor(plain, nodes)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a, b = fe_ours(x), fe_plain(x)
    for k in nodes.values():
        torch.testing.assert_close(a[k], b[k])
    fe_ours.train(), fe_plain.train()  # the training-mode graph: batch statistics, running stats updated
    a, b = fe_ours(x), fe_plain(x)
    for k in nodes.values():
        torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(fe_ours.state_dict()["layer2.1.bn2.running_var"],
                               fe_plain.state_dict()["layer2.1.bn2.running_var"])


# 7. BatchNorm3d, lazy classes -------------------------------------------------------------

@pytest.mark.parametrize("kind", [1, 2, 3])
def test_lazy_classes_materialize_into_torch_bn(kind):
    ours_cls, theirs_cls = LAZY[kind]
    ours, theirs = ours_cls(momentum=None, backward="staged"), theirs_cls(momentum=None)
    assert isinstance(ours, theirs_cls) and ours.has_uninitialized_params()
    g = torch.Generator().manual_seed(kind)
    for step in range(3):
        if step == 2:
            ours.eval(), theirs.eval()
        x = torch.randn(SHAPES[kind], generator=g, dtype=torch.float64).float() * 3 + 1
        torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours) is OURS[kind] and ours.num_features == 3 and ours.backward == "staged"
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


def test_batchnorm3d_matches_nn_with_gradients():
    ours, theirs = torch_bn.BatchNorm3d(3, dtype=torch.float64), nn.BatchNorm3d(3, dtype=torch.float64)
    x = torch.randn(3, 3, 2, 3, 4, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb)
    dy = torch.randn_like(x)
    for a, b in zip(torch.autograd.grad(ya, (xa, ours.weight, ours.bias), dy),
                    torch.autograd.grad(yb, (xb, theirs.weight, theirs.bias), dy)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_convert_handles_3d_and_lazy():
    model = nn.Sequential(nn.BatchNorm3d(2), nn.LazyBatchNorm2d(), nn.LazyBatchNorm1d(), nn.LazyBatchNorm3d())
    torch_bn.convert(model)
    assert [type(m) for m in model] == [torch_bn.BatchNorm3d, torch_bn.LazyBatchNorm2d,
                                        torch_bn.LazyBatchNorm1d, torch_bn.LazyBatchNorm3d]
    model[1](torch.randn(4, 5, 2, 2))
    assert type(model[1]) is torch_bn.BatchNorm2d and model[1].weight.shape == (5,)


# 8. exception types -------------------------------------------------------------------------

def _rm_requires_grad(fn):
    return fn(torch.randn(4, 3), torch.zeros(3, requires_grad=True), torch.ones(3), training=False)


ERROR_CASES = {
    "eval without running stats": lambda fn: fn(torch.randn(4, 3), None, None, training=False),
    "0-D input": lambda fn: fn(torch.randn(()), None, None, training=True),
    "1-D input, training": lambda fn: fn(torch.randn(5), None, None, training=True),
    "1-D input, eval": lambda fn: fn(torch.randn(5), torch.zeros(5), torch.ones(5), training=False),
    "running_mean without running_var": lambda fn: fn(torch.randn(4, 3), torch.zeros(3), None, training=True),
    "running_var without running_mean, eval": lambda fn: fn(torch.randn(4, 3), None, torch.ones(3), training=False),
    "float64 stats, float32 input": lambda fn: fn(torch.randn(4, 3), torch.zeros(3, dtype=torch.float64),
                                                  torch.ones(3, dtype=torch.float64), training=True),
    "float64 weight, float32 input, eval": lambda fn: fn(torch.randn(4, 3), torch.zeros(3), torch.ones(3),
                                                         torch.ones(3, dtype=torch.float64), training=False),
    "half weight, float32 stats, half input": lambda fn: fn(torch.randn(4, 3).half(), torch.zeros(3), torch.ones(3),
                                                            torch.ones(3).half(), training=True),
    "running_mean requires grad, eval": _rm_requires_grad,
    "running_var requires grad, training": lambda fn: fn(torch.randn(4, 3), torch.zeros(3),
                                                         torch.ones(3, requires_grad=True), training=True),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_functional_raises_what_pytorch_raises(case):
    _, ref_err = outcome(lambda: ERROR_CASES[case](F.batch_norm))
    _, err = outcome(lambda: ERROR_CASES[case](torch_bn.functional.batch_norm))
    assert ref_err is not None, "the case must be one PyTorch rejects"
    assert isinstance(err, type(ref_err)), (type(err), type(ref_err), err)


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_float64_module_rejects_float32_input_half_input_works(kind, training):
    x = torch.randn(SHAPES[kind])
    ours = OURS[kind](3, dtype=torch.float64).train(training)
    theirs = THEIRS[kind](3, dtype=torch.float64).train(training)
    _, ref_err = outcome(lambda: theirs(x))
    _, err = outcome(lambda: ours(x))
    assert isinstance(ref_err, RuntimeError) and isinstance(err, RuntimeError) and "float64" in str(err)
    for dtype in (torch.float16, torch.bfloat16):  # mixed precision: half input, float32 parameters
        ours32, theirs32 = OURS[kind](3).train(training), THEIRS[kind](3).train(training)
        xh = x.to(dtype)
        torch.testing.assert_close(ours32(xh), theirs32(xh))


def test_running_stats_tangents_in_eval_as_pytorch():
    """PyTorch's rule (test_nn's test_batchnorm_raises_error_if_running_var_or_running_mean_have_
    forward_grad): with a dual input, tangents on the running statistics raise RuntimeError; without
    one (nothing to differentiate) they are ignored, and the output's tangent is PyTorch's."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 0.5)
    msg = "batch_norm is not differentiable wrt running_mean and running_var"
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 2), (0, 1, 2)):
        tangents = tuple(torch.rand_like(a) for a in args)
        outcome = {}
        for name, fn in (("ours", torch_bn.functional.batch_norm), ("theirs", F.batch_norm)):
            with fwAD.dual_level():
                duals = [fwAD.make_dual(p, t) if i in dual_indices else p for i, (p, t) in enumerate(zip(args, tangents))]
                try:
                    t = fwAD.unpack_dual(fn(*duals, training=False, momentum=-1.2)).tangent
                    outcome[name] = torch.zeros(args[0].shape) if t is None else t
                except RuntimeError as e:
                    assert msg in str(e)
                    outcome[name] = "raised"
        raises = 0 in dual_indices and (1 in dual_indices or 2 in dual_indices)
        assert (outcome["ours"] == "raised") == (outcome["theirs"] == "raised") == raises, dual_indices
        if not raises:
            torch.testing.assert_close(outcome["ours"], outcome["theirs"])
    x, rm, rv = args
    _, t = torch.func.jvp(lambda m: torch_bn.functional.batch_norm(x, m, rv, training=False), (rm,), (torch.ones(2),))
    assert t.eq(0).all()
    with pytest.raises(RuntimeError, match=msg):
        torch.func.jvp(lambda x, m: torch_bn.functional.batch_norm(x, m, rv, training=False), (x, rm),
                       (torch.ones_like(x), torch.ones(2)))


# 9. back to torch.nn --------------------------------------------------------------------------

@pytest.mark.slow
def test_convert_back_to_torch_nn():
    original = torchvision.models.resnet18(num_classes=10)
    model = torch_bn.convert(torchvision.models.resnet18(num_classes=10))
    model.load_state_dict(original.state_dict())
    weight = model.bn1.weight
    back = torch_bn.convert(model, to="torch")
    kinds = {type(m) for m in back.modules()}
    assert nn.BatchNorm2d in kinds and not any(k.__module__.startswith("torch_bn") for k in kinds)
    assert back.bn1.weight is weight
    back.eval(), original.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), original(x))
    lazy = torch_bn.convert(nn.Sequential(torch_bn.LazyBatchNorm1d(), torch_bn.BatchNorm3d(2)), to="torch")
    assert [type(m) for m in lazy] == [nn.LazyBatchNorm1d, nn.BatchNorm3d]
    with pytest.raises(ValueError, match="to must be"):
        torch_bn.convert(model, to="nn")


def test_converted_back_model_fuses_for_quantization():
    model = torch_bn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    model[1](torch.randn(1, 4, 2, 2))  # eval: uses running stats; set some first
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fused = torch.ao.quantization.fuse_modules(torch_bn.convert(model, to="torch"), [["0", "1", "2"]])
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)


# 10. docstrings -------------------------------------------------------------------------------

PUBLIC = [torch_bn.BatchNorm1d, torch_bn.BatchNorm2d, torch_bn.BatchNorm3d, torch_bn.LazyBatchNorm1d,
          torch_bn.LazyBatchNorm2d, torch_bn.LazyBatchNorm3d]


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_docstrings_like_torch_nn(cls):
    doc = cls.__doc__
    for section in ("Args:", "Shape:", "Examples::", "backward:", "eps:", "momentum:", "track_running_stats:"):
        assert section in doc, section
    # The examples run and print what they say.
    test = doctest.DocTestParser().get_doctest(doc, {"torch": torch, "torch_bn": torch_bn, "nn": nn},
                                               cls.__name__, None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_parameter_dtypes_and_sizes_refused_where_pytorch_refuses(input_dtype):
    """Every combination of dtypes (the input's, float32, float64) for running_mean, running_var,
    weight and bias, and a wrong size at each of them: torch_bn refuses exactly what F.batch_norm
    refuses (training mode, CPU), and computes nn's result otherwise."""
    x = torch.randn(6, 4).to(input_dtype)
    kinds = sorted({input_dtype, torch.float32, torch.float64}, key=str)
    cases = [(dtypes, None) for dtypes in itertools.product(kinds, repeat=4)]
    cases += [((input_dtype,) * 4, wrong) for wrong in range(4)]
    accepted = 0
    for dtypes, wrong in cases:
        tensors = [torch.rand(5 if k == wrong else 4, dtype=d) + 0.5 for k, d in enumerate(dtypes)]
        ref, ref_err = outcome(lambda: F.batch_norm(x, *[t.clone() for t in tensors], training=True))
        got, err = outcome(lambda: torch_bn.functional.batch_norm(x, *[t.clone() for t in tensors], training=True))
        assert (err is None) == (ref_err is None), (dtypes, wrong, err, ref_err)
        if err is None:
            accepted += 1
            tol = 1e-2 if input_dtype == torch.bfloat16 else 1e-5  # bfloat16: one unit of rounding of y
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        else:
            assert isinstance(err, type(ref_err)), (dtypes, wrong, type(err), type(ref_err))
    assert accepted == (2 if input_dtype == torch.bfloat16 else 1)
