"""choose_path, the one rule that picks the compute path: each row of its table."""
import sys
import warnings

import pytest
import torch

from torch_bn import function
from torch_bn.function import FUSED_MIN_ELEMENTS, choose_path

SMALL = torch.empty(50, 100)
LARGE = torch.empty(FUSED_MIN_ELEMENTS // 64, 64)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """CPU tensors count as CUDA ones for the Triton rows (the kernels run in the interpreter)."""
    monkeypatch.setattr(function, "TRITON_ON_CPU", True)
    monkeypatch.setattr(function, "USE_TRITON", True)


def test_cpu_size_picks_reference_or_fused():
    assert choose_path(SMALL) == "reference"
    assert choose_path(torch.empty(FUSED_MIN_ELEMENTS - 1)[None].expand(2, -1)[:1]) == "reference"
    assert choose_path(LARGE) == "fused"
    assert choose_path(LARGE.double()) == "fused"
    assert choose_path(LARGE.bfloat16()) == "fused"


def test_staged_and_double_backward_take_the_reference(triton_on_cpu):
    for x in (SMALL, LARGE):
        assert choose_path(x, staged=True) == "reference"
        assert choose_path(x, double_backward=True) == "reference"


def test_torch_func_transforms_take_the_reference(triton_on_cpu):
    seen = []

    def f(x):
        seen.append(choose_path(x))
        return x

    torch.func.vmap(f)(LARGE[:4].unsqueeze(0).expand(3, -1, -1))
    torch.func.grad(lambda x: f(x).sum())(LARGE[:4].clone())
    assert seen == ["reference", "reference"]


def test_triton_for_supported_dtypes_only(triton_on_cpu):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert choose_path(SMALL.to(dtype)) == "triton"
        assert choose_path(LARGE.to(dtype)) == "triton"
    # The kernels compute in float32: float64 keeps its precision on the tensor-op paths.
    assert choose_path(SMALL.double()) == "reference"
    assert choose_path(LARGE.double()) == "fused"


def test_user_switch_keeps_tensors_off_triton(triton_on_cpu, monkeypatch):
    monkeypatch.setattr(function, "USE_TRITON", False)
    assert choose_path(SMALL) == "reference" and choose_path(LARGE) == "fused"


def test_compiling_takes_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_path(LARGE) == "reference"


def test_compiled_cuda_code_still_calls_the_kernels(triton_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_path(LARGE) == "triton"


class _FailingKernels:
    """A meta-path finder under which importing torch_bn.triton_kernels raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torch_bn.triton_kernels":
            raise self.error
        return None


@pytest.mark.parametrize("error, message", [(ModuleNotFoundError("No module named 'triton'", name="triton"), None),
                                            (ImportError("cannot import name 'custom_op'"), "cannot be imported"),
                                            (AttributeError("module 'torch.library' has no attribute 'custom_op'"),
                                             "cannot be registered"),
                                            (ValueError("custom_op: schema inference failed"), "cannot be registered")])
def test_kernels_that_fail_to_import_fall_back(triton_on_cpu, monkeypatch, error, message):
    """Any failure to import the kernels module means the tensor-op paths, with one warning
    (none when Triton itself is simply not installed)."""
    import torch_bn

    monkeypatch.setattr(function, "_kernels", None)
    monkeypatch.delitem(sys.modules, "torch_bn.triton_kernels", raising=False)
    monkeypatch.delattr(torch_bn, "triton_kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingKernels(error), *sys.meta_path])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose_path(SMALL) == "reference"
        assert choose_path(LARGE) == "fused"
    assert [str(w.message) for w in caught if message is None or message in str(w.message)] == \
        [str(w.message) for w in caught]
    assert len(caught) == (0 if message is None else 1)


def test_the_function_follows_the_rule(monkeypatch):
    """BatchNormFunction asks choose_path in forward and backward, with the backward's flags."""
    asked = []
    real = function.choose_path
    monkeypatch.setattr(function, "choose_path", lambda x, **kw: asked.append(kw) or real(x, **kw))
    x = torch.randn(6, 3, requires_grad=True)
    for backward in ("closed_form", "staged"):
        y, _, _ = function.BatchNormFunction.apply(x, None, None, 1e-5, backward)
        torch.autograd.grad(y, x, torch.randn(6, 3), create_graph=backward == "closed_form")
    assert asked == [{}, {"staged": False, "double_backward": True}, {}, {"staged": True, "double_backward": False}]


def test_small_cpu_layers_take_the_compiled_op():
    """A whole layer (layer=True) below FUSED_MIN_ELEMENTS on CPU runs as the compiled op, in any
    floating dtype; larger inputs and calls that are not whole layers keep their paths."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert choose_path(SMALL.to(dtype), layer=True) == "cpp"
    assert choose_path(torch.empty(50, 50, 3), layer=True) == "cpp"
    assert choose_path(LARGE, layer=True) == "fused"
    assert choose_path(SMALL) == "reference"
    assert choose_path(torch.empty(50, 100, device="meta"), layer=True) == "reference"


def test_the_compiled_op_is_not_taken_where_it_cannot_serve(monkeypatch):
    """Staged backward, forward-mode AD, torch.func, torch.compile, and no built op: the Function."""
    assert choose_path(SMALL, layer=True, staged=True) == "reference"

    class Subclass(torch.Tensor):  # e.g. FakeTensor: no memory of its own for the loops to read
        pass

    assert choose_path(SMALL.as_subclass(Subclass), layer=True) == "reference"
    with torch.autograd.forward_ad.dual_level():
        assert choose_path(SMALL, layer=True) == "reference"
    assert choose_path(SMALL, layer=True) == "cpp"
    seen = []
    torch.func.vmap(lambda x: seen.append(choose_path(x, layer=True)) or x)(SMALL[None].expand(2, -1, -1))
    assert seen == ["reference"]
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert choose_path(SMALL, layer=True) == "reference"
    monkeypatch.setattr(function.cpp, "_op", False)  # as after a failed build
    assert choose_path(SMALL, layer=True) == "reference"
    monkeypatch.setattr(function.cpp, "_op", None)  # not built yet, and switched off (TORCH_BN_CPP=0)
    monkeypatch.setattr(function.cpp, "ENABLED", False)
    assert choose_path(SMALL, layer=True) == "reference" and function.cpp._op is None


def test_switching_the_compiled_op_off_takes_effect_after_it_is_built(monkeypatch):
    assert choose_path(SMALL, layer=True) == "cpp"
    monkeypatch.setattr(function.cpp, "ENABLED", False)
    assert choose_path(SMALL, layer=True) == "reference"
