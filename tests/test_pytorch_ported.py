"""PyTorch's own BatchNorm checks, run on torch_bn.

- The ModuleInfo samples and error inputs of nn.BatchNorm1d/2d/3d
  (torch.testing._internal.common_modules; needs expecttest) through the generic checks of
  PyTorch's test/test_modules.py: forward, factory kwargs, repr, pickle, non-contiguous input,
  gradcheck/gradgradcheck (with forward AD), channels_last, train/eval differ, errors, zero batch.
- The OpInfo samples of nn.functional.batch_norm (common_methods_invocations), for
  torch_bn.functional.batch_norm: outputs, running statistics and gradients, float64 to float16.

Each torch_bn class is run beside its torch.nn twin on the same sample. float64 results must
agree to float64 tolerance. In float32 and half precision the two round differently (torch_bn's
fused path and its two-pass statistics), so both are measured against float64 and torch_bn's
error must be at most 2x nn's, plus 4 units in the last place at the result's scale: the
gradient sums of weight and bias over 72 to 384 values carry that much rounding either way.
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import torch_bn

TWINS = {nn.BatchNorm1d: torch_bn.BatchNorm1d, nn.BatchNorm2d: torch_bn.BatchNorm2d,
         nn.BatchNorm3d: torch_bn.BatchNorm3d}
MODULE_INFOS = [info for info in module_db if info.module_cls in TWINS]
assert len(MODULE_INFOS) == 3
BATCH_NORM_OPS = [op for op in op_db if op.name == "nn.functional.batch_norm"
                  and op.supported_dtypes("cpu")]
assert len(BATCH_NORM_OPS) == 1
# Largest float32 errors seen (absolute, and relative to max(1, max |float64 result|)), printed at the end.
WORST = {k + r: 0.0 for k in ("float32 vs nn", "float32 vs float64", "nn float32 vs float64")
         for r in ("", ", relative")}


def module_cases(dtypes=(torch.float64, torch.float32), trainings=(True, False)):
    """(id, nn class, constructor args, kwargs, input, training) for every ModuleInfo sample."""
    cases = []
    for info in MODULE_INFOS:
        for dtype in dtypes:
            for training in trainings:
                samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                  training=training)
                for i, s in enumerate(samples):
                    name = (f"{info.module_cls.__name__}-{s.desc or i}-{str(dtype)[6:]}-"
                            f"{'train' if training else 'eval'}")
                    cases.append(pytest.param(info.module_cls, s.constructor_input.args,
                                              s.constructor_input.kwargs, s.forward_input.args[0],
                                              training, id=name))
    return cases


def make_twins(nn_cls, args, kwargs, dtype, training):
    """The nn module and torch_bn's with the same state: non-trivial affine parameters and
    running statistics, identical in both."""
    theirs = nn_cls(*args, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
        if theirs.running_mean is not None:
            theirs.running_mean.copy_(torch.randn(theirs.num_features, generator=g, dtype=torch.float64))
            theirs.running_var.copy_(torch.rand(theirs.num_features, generator=g, dtype=torch.float64) + 0.5)
    ours = TWINS[nn_cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours.train(training), theirs.train(training)


def run(m, x, dy):
    """Output, input and parameter gradients, buffers after one step."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    params = [p for p in (m.weight, m.bias) if p is not None]
    grads = torch.autograd.grad(y, [x] + params, dy, allow_unused=True) if x.numel() else ()
    return [y, *grads] + [b.clone() for b in m.buffers()]


def assert_as_accurate(ours, theirs, exact, dtype):
    """float64: equal. Otherwise |ours - exact| <= 2 |theirs - exact| + 4 ulp at the result's scale."""
    for a, b, ref in zip(ours, theirs, exact):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float64 or not a.is_floating_point():
            torch.testing.assert_close(a, b)
            continue
        ref = ref.double()
        err_ours = (a.double() - ref).abs().max().item() if a.numel() else 0.0
        err_theirs = (b.double() - ref).abs().max().item() if b.numel() else 0.0
        ulp = torch.finfo(a.dtype).eps * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
        assert err_ours <= 2 * err_theirs + 4 * ulp, (err_ours, err_theirs)
        if a.dtype == torch.float32 and a.numel():
            scale = max(1.0, ref.abs().max().item())
            for key, err in (("float32 vs float64", err_ours), ("nn float32 vs float64", err_theirs),
                             ("float32 vs nn", (a - b).abs().max().item())):
                WORST[key] = max(WORST[key], err)
                WORST[key + ", relative"] = max(WORST[key + ", relative"], err / scale)


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    yield
    print("\nlargest errors over the ported samples:", {k: f"{v:.3g}" for k, v in WORST.items()})


# test_modules.py: test_forward (outputs, gradients and buffers over three steps, zero batch included)

@pytest.mark.parametrize("nn_cls, args, kwargs, x, training", module_cases())
def test_forward(nn_cls, args, kwargs, x, training):
    dtype = x.dtype
    ours, theirs = make_twins(nn_cls, args, kwargs, dtype, training)
    exact = copy.deepcopy(theirs).double()
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # momentum=None: the averaging factor changes from step to step
        xs = (x.detach().double() * (1 + step) + step).to(dtype)
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        assert_as_accurate(run(ours, xs, dy), run(theirs, xs, dy), run(exact, xs.double(), dy.double()), dtype)


# test_modules.py: test_factory_kwargs

@pytest.mark.parametrize("nn_cls, args, kwargs, x, training", module_cases(trainings=(True,)))
def test_factory_kwargs(nn_cls, args, kwargs, x, training):
    for device in ("meta", "cpu"):
        m = TWINS[nn_cls](*args, **kwargs, device=device, dtype=x.dtype)
        ref = nn_cls(*args, **kwargs, device=device, dtype=x.dtype)
        mine = dict(m.named_parameters()) | dict(m.named_buffers())
        theirs = dict(ref.named_parameters()) | dict(ref.named_buffers())
        assert mine.keys() == theirs.keys()
        for k, t in mine.items():
            assert t.device.type == device and t.dtype == theirs[k].dtype and t.shape == theirs[k].shape


# test_modules.py: test_repr, test_pickle

@pytest.mark.parametrize("nn_cls, args, kwargs, x, training", module_cases(dtypes=(torch.float64,)))
def test_repr_and_pickle(nn_cls, args, kwargs, x, training):
    ours, theirs = make_twins(nn_cls, args, kwargs, x.dtype, training)
    assert repr(ours) == repr(theirs)
    ours(x.detach())
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = pickle.loads(pickle.dumps(ours))
    for other in (loaded, copied):
        assert type(other) is type(ours) and other.training == ours.training
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v)
        torch.testing.assert_close(other(x.detach()), copy.deepcopy(ours)(x.detach()))


# test_modules.py: test_non_contiguous_tensors

@pytest.mark.parametrize("nn_cls, args, kwargs, x, training", module_cases(dtypes=(torch.float64,)))
def test_non_contiguous_tensors(nn_cls, args, kwargs, x, training):
    ours, _ = make_twins(nn_cls, args, kwargs, x.dtype, training)
    dense_module = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(x.shape, generator=g, dtype=x.dtype)

    def strided(t):  # same values, every other element of a twice-as-long last dimension
        return torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]

    xs, dys = strided(x), strided(dy)
    assert x.numel() == 0 or not (xs.is_contiguous() or dys.is_contiguous())
    for a, b in zip(run(ours, xs, dys), run(dense_module, x, dy)):
        torch.testing.assert_close(a, b)


# test_modules.py: test_grad, test_gradgrad (float64, with forward AD and batched gradients)

@pytest.mark.parametrize("nn_cls, args, kwargs, x, training", module_cases(dtypes=(torch.float64,)))
def test_grad_and_gradgrad(nn_cls, args, kwargs, x, training):
    ours, _ = make_twins(nn_cls, args, kwargs, x.dtype, training)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in ours.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(ours, dict(zip(names, params)), (x,))

    inputs = (x.detach().clone().requires_grad_(), *params)
    # fast_mode: random projections of the Jacobians instead of every column (the samples have up
    # to 384 elements; test_forward_ad.py and test_function.py check full Jacobians on small inputs).
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True,
                     check_batched_forward_grad=True, fast_mode=True)
    assert gradgradcheck(fn, inputs, fast_mode=True)


# test_modules.py: test_memory_format (channels_last in, channels_last out, same numbers)

@pytest.mark.parametrize("nn_cls, args, kwargs, x, training",
                         [c for c in module_cases() if c.values[0] is not nn.BatchNorm1d])
def test_channels_last(nn_cls, args, kwargs, x, training):
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    ours, theirs = make_twins(nn_cls, args, kwargs, x.dtype, training)
    exact = copy.deepcopy(theirs).double()
    xs = x.detach().contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=fmt)
    results = [run(m, xs.to(m.running_mean.dtype if m.running_mean is not None else x.dtype), dy.to(xs.dtype))
               for m in (ours, theirs)]
    assert results[0][0].is_contiguous(memory_format=fmt) == results[1][0].is_contiguous(memory_format=fmt)
    assert_as_accurate(results[0], results[1], run(exact, xs.double(), dy.double()), x.dtype)


def test_channels_last_on_the_fused_path():
    """The samples run whatever choose_path picks; this input runs torch_bn.fused, pinned."""
    x = torch.randn(16, 32, 24, 24).contiguous(memory_format=torch.channels_last)
    ours, theirs = make_twins(nn.BatchNorm2d, (32,), {}, torch.float32, True)
    exact = copy.deepcopy(theirs).double()
    dy = torch.randn_like(x)
    with torch_bn.use_path("fused"):
        a = run(ours, x, dy)
    b = run(theirs, x, dy)
    assert a[0].is_contiguous(memory_format=torch.channels_last)
    assert_as_accurate(a, b, run(exact, x.double(), dy.double()), torch.float32)


# test_modules.py: test_if_train_and_eval_modes_differ (ModuleInfo says they do for BatchNorm)

@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda i: i.module_cls.__name__)
def test_train_and_eval_modes_differ(info):
    assert info.train_and_eval_differ
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False, training=True)
    differ = []
    for s in samples:
        x = s.forward_input.args[0]
        if x.numel() == 0:
            continue
        m = TWINS[info.module_cls](*s.constructor_input.args, **s.constructor_input.kwargs).double()
        train_out = m(x)
        eval_out = copy.deepcopy(m).eval()(x)
        differ.append(not torch.allclose(train_out, eval_out))
        # and nn agrees in each mode
        ref = info.module_cls(*s.constructor_input.args, **s.constructor_input.kwargs).double()
        torch.testing.assert_close(ref(x), train_out)
    assert any(differ)


# test_modules.py: test_errors (ModuleInfo error inputs), in both modes beside nn

ERROR_CASES = [
    pytest.param(info, e, training, id=f"{info.module_cls.__name__}-{i}-{'train' if training else 'eval'}")
    for info in MODULE_INFOS for training in (True, False)
    for i, e in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                        requires_grad=False, training=training))]


@pytest.mark.parametrize("info, error_input, training", ERROR_CASES)
def test_errors(info, error_input, training):
    s = error_input.module_error_input
    args, kwargs, x = s.constructor_input.args, s.constructor_input.kwargs, s.forward_input.args[0]

    def attempt(cls):
        try:
            m = cls(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - compared below
            return "construction", e
        try:
            m.train(training)(x)
        except Exception as e:  # noqa: BLE001
            return "forward", e
        return None, None

    where, err = attempt(TWINS[info.module_cls])
    ref_where, ref_err = attempt(info.module_cls)
    assert where == ref_where
    if ref_err is not None:
        assert isinstance(err, type(ref_err))
    if training:  # the error inputs are written for training mode
        expected = "construction" if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR else "forward"
        assert where == expected and isinstance(err, error_input.error_type)
        assert error_input.error_regex in str(err)


# OpInfo samples of nn.functional.batch_norm, for torch_bn.functional.batch_norm

OP = BATCH_NORM_OPS[0]
OP_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
assert set(OP_DTYPES) <= set(OP.supported_dtypes("cpu"))


def op_cases():
    cases = []
    for dtype in OP_DTYPES:
        for i, s in enumerate(OP.sample_inputs("cpu", dtype, requires_grad=True)):
            cases.append(pytest.param(s, id=f"{i}-{str(dtype)[6:]}"))
    return cases


def run_functional(fn, sample, dtype=None):
    """Output, running statistics after, and gradients w.r.t. input, weight and bias."""
    def conv(t, grad):
        if t is None:
            return None
        t = t.detach().clone().to(dtype or t.dtype)
        return t.requires_grad_() if grad else t

    x = conv(sample.input, True)
    rm, rv, w, b = (conv(t, g) for t, g in zip(sample.args, (False, False, True, True)))
    y = fn(x, rm, rv, w, b, **sample.kwargs)
    wrt = [t for t in (x, w, b) if t is not None]
    dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, wrt, dy) if y.numel() else [torch.zeros_like(t) for t in wrt]
    return [y, *[t for t in (rm, rv) if t is not None], *grads]


@pytest.mark.parametrize("sample", op_cases())
def test_opinfo_samples(sample):
    dtype = sample.input.dtype
    ours = run_functional(torch_bn.functional.batch_norm, sample)
    theirs = run_functional(F.batch_norm, sample)
    exact = run_functional(F.batch_norm, sample, torch.float64)
    assert len(ours) == len(theirs)
    assert_as_accurate(ours, theirs, exact, dtype)


@pytest.mark.parametrize("sample", [c for c in op_cases() if c.values[0].input.dtype == torch.float64])
def test_opinfo_gradcheck_forward_ad_and_gradgradcheck(sample):
    """OpInfo says supports_forward_ad and supports_fwgrad_bwgrad: check both, as test_ops_gradients."""
    rm, rv, w, b = sample.args
    leaves = [t for t in (sample.input, w, b) if t is not None]

    def fn(*ts):
        it = iter(ts)
        x = next(it)
        wt = next(it) if w is not None else None
        bt = next(it) if b is not None else None
        stats = [None if t is None else t.clone() for t in (rm, rv)]
        return torch_bn.functional.batch_norm(x, *stats, wt, bt, **sample.kwargs)

    inputs = tuple(t.detach().clone().requires_grad_() for t in leaves)
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, inputs)
