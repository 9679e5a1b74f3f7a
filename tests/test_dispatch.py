"""choose_path, the one rule that picks the compute path: each row of its table, and the
reference switch (use_path, TORCH_BN_PATH)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import torch_bn
from torch_bn import cpp, dispatch, function
from torch_bn.dispatch import FUSED_MIN_ELEMENTS, backward_path, choose_path

SMALL = torch.empty(50, 100)
LARGE = torch.empty(FUSED_MIN_ELEMENTS // 64, 64)


@pytest.fixture
def needs_cpp():
    """The rows about the compiled op need it built (it is not with TORCH_BN_CPP=0 or without a
    compiler; tests/test_cpp.py checks the build itself)."""
    if cpp.op() is None:
        pytest.skip("the compiled op is switched off (TORCH_BN_CPP=0) or cannot be built here")


@pytest.fixture
def no_cpp(monkeypatch):
    """The compiled op switched off (TORCH_BN_CPP=0): small CPU inputs take the reference."""
    monkeypatch.setattr(cpp, "ENABLED", False)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """CPU tensors count as CUDA ones for the Triton rows (the kernels run in the interpreter)."""
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    monkeypatch.setattr(dispatch, "USE_TRITON", True)


def test_cpu_size_picks_reference_or_fused(no_cpp):
    assert choose_path(SMALL) == "reference"
    assert choose_path(torch.empty(FUSED_MIN_ELEMENTS - 1)[None].expand(2, -1)[:1]) == "reference"
    assert choose_path(LARGE) == "fused"
    assert choose_path(LARGE.double()) == "fused"
    assert choose_path(LARGE.bfloat16()) == "fused"


def test_staged_and_double_backward_take_the_reference(triton_on_cpu):
    for forward in ("triton", "cpp", "fused", "reference"):
        assert backward_path(forward, staged=True, double_backward=False) == "reference"
        assert backward_path(forward, staged=False, double_backward=True) == "reference"
        assert backward_path(forward, staged=False, double_backward=False) == forward
    seen = []
    torch.func.vmap(lambda x: seen.append(backward_path("cpp", staged=False, double_backward=False)) or x)(SMALL[None])
    assert seen == ["reference"]


def test_a_backward_runs_on_its_forwards_path(needs_cpp, monkeypatch):
    """The reference switch in force at the forward decides the backward, whatever is in force
    when the backward runs (ops.closed_form_backward is what the reference backward calls)."""
    calls = []
    real = torch_bn.ops.closed_form_backward
    monkeypatch.setattr(torch_bn.ops, "closed_form_backward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(50, 100, requires_grad=True)
    bn = torch_bn.BatchNorm1d(100)
    with torch_bn.use_path("reference"):
        y = bn(x)
    y.sum().backward()
    assert calls == [1]
    y = bn(x)
    with torch_bn.use_path("reference"):
        y.sum().backward()
    assert calls == [1] and type(y.grad_fn).__name__ == "EagerBatchNormFunctionBackward"


def test_torch_func_transforms_take_the_reference(triton_on_cpu):
    """vmap and grad (x is then a functorch wrapper) take the reference, Triton on or not."""
    seen = []

    def f(x):
        seen.append(choose_path(x))
        return x

    torch.func.vmap(f)(LARGE[:4].unsqueeze(0).expand(3, -1, -1))
    torch.func.grad(lambda x: f(x).sum())(LARGE[:4].clone())
    assert seen == ["reference", "reference"]


def test_triton_for_supported_dtypes_only(triton_on_cpu, no_cpp):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert choose_path(SMALL.to(dtype)) == "triton"
        assert choose_path(LARGE.to(dtype)) == "triton"
    # The kernels compute in float32: float64 keeps its precision on the tensor-op paths.
    assert choose_path(SMALL.double()) == "reference"
    assert choose_path(LARGE.double()) == "fused"


def test_user_switch_keeps_tensors_off_triton(triton_on_cpu, no_cpp, monkeypatch):
    monkeypatch.setattr(dispatch, "USE_TRITON", False)
    assert choose_path(SMALL) == "reference" and choose_path(LARGE) == "fused"


def test_compiling_takes_the_reference_on_cpu(monkeypatch):
    assert choose_path(LARGE) != "reference"
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
def test_kernels_that_fail_to_import_fall_back(triton_on_cpu, no_cpp, monkeypatch, error, message):
    """Any failure to import the kernels module means the tensor-op paths, with one warning
    (none when Triton itself is simply not installed)."""
    monkeypatch.setattr(dispatch, "_kernels", None)
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
    """BatchNormFunction asks choose_path in its forward, and backward_path in its backward with
    the forward's path and the backward's flags."""
    asked = []
    real = dispatch.backward_path
    monkeypatch.setattr(dispatch, "backward_path", lambda path, **kw: asked.append((path, kw)) or real(path, **kw))
    monkeypatch.setattr(cpp, "ENABLED", False)  # small CPU input: the reference in auto mode
    x = torch.randn(6, 3, requires_grad=True)
    for backward in ("closed_form", "staged"):
        y, _, _ = function.BatchNormFunction.apply(x, None, None, 1e-5, backward)
        torch.autograd.grad(y, x, torch.randn(6, 3), create_graph=backward == "closed_form")
    with torch_bn.use_path("fused"):
        y, _, _ = function.BatchNormFunction.apply(x, None, None, 1e-5, "closed_form")
    torch.autograd.grad(y, x, torch.randn(6, 3))  # the backward follows the forward's path
    assert asked == [("reference", {"staged": False, "double_backward": True}),
                     ("reference", {"staged": True, "double_backward": False}),
                     ("fused", {"staged": False, "double_backward": False})]


def test_cpu_inputs_take_the_compiled_op(needs_cpp):
    """CPU inputs of any size take the compiled op, in any floating dtype and any number of
    dimensions; meta tensors (no memory) the reference."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert choose_path(SMALL.to(dtype)) == "cpp"
    assert choose_path(torch.empty(50, 50, 3)) == "cpp"
    assert choose_path(torch.empty(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)) == "cpp"
    assert choose_path(LARGE) == "cpp" and choose_path(LARGE.bfloat16()) == "cpp"
    assert choose_path(torch.empty(50, 100, device="meta")) == "reference"


def test_the_compiled_op_is_not_taken_where_it_cannot_serve(needs_cpp, monkeypatch):
    """Staged backward, torch.func, torch.compile, tensor subclasses, and no built op: the reference.
    Forward-mode AD takes it (the Function's jvp needs only saved tensors)."""
    class Subclass(torch.Tensor):  # e.g. FakeTensor: no memory of its own for the loops to read
        pass

    assert choose_path(SMALL.as_subclass(Subclass)) == "reference"
    with torch.autograd.forward_ad.dual_level():
        assert choose_path(SMALL) == "cpp"
    seen = []
    torch.func.vmap(lambda x: seen.append(choose_path(x)) or x)(SMALL[None].expand(2, -1, -1))
    assert seen == ["reference"]
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert choose_path(SMALL) == "reference"
    monkeypatch.setattr(cpp, "_ops", False)  # as after a failed build
    assert choose_path(SMALL) == "reference"
    monkeypatch.setattr(cpp, "_ops", None)  # not built yet, and switched off (TORCH_BN_CPP=0)
    monkeypatch.setattr(cpp, "ENABLED", False)
    assert choose_path(SMALL) == "reference" and cpp._ops is None


def test_switching_the_compiled_op_off_takes_effect_after_it_is_built(needs_cpp, monkeypatch):
    assert choose_path(SMALL) == "cpp"
    monkeypatch.setattr(cpp, "ENABLED", False)
    assert choose_path(SMALL) == "reference"


def test_the_reference_switch_takes_every_call(triton_on_cpu, monkeypatch):
    """use_path("reference") overrides every row, Triton and the compiled op included; "auto"
    restores the table; the previous mode comes back after the block, also after an error."""
    assert dispatch.current_path() == "auto"
    with torch_bn.use_path("reference"):
        for x in (SMALL, LARGE, SMALL.bfloat16()):
            assert choose_path(x) == "reference"
        with torch_bn.use_path("auto"):
            assert choose_path(LARGE) == "triton"
        assert dispatch.current_path() == "reference"
    with pytest.raises(KeyError), torch_bn.use_path("reference"):
        raise KeyError
    assert dispatch.current_path() == "auto"
    assert backward_path("reference", staged=False, double_backward=False) == "reference"  # its forward had the switch on
    with pytest.raises(ValueError, match="use_path takes one of"):
        with torch_bn.use_path("fast"):
            pass


def test_pinned_paths_serve_or_say_why(needs_cpp, monkeypatch):
    """use_path("cpp"/"fused"/"triton") pins that body for tests; where it cannot serve, an error
    says why; staged and double backward and transforms still take the reference."""
    with torch_bn.use_path("cpp"):
        assert choose_path(LARGE) == "cpp"
        with pytest.raises(RuntimeError, match="plain CPU tensors"):
            choose_path(torch.empty(50, 100, device="meta"))
    with torch_bn.use_path("fused"):
        assert choose_path(SMALL) == "fused"
    monkeypatch.setattr(dispatch, "USE_TRITON", False)
    with torch_bn.use_path("triton"), pytest.raises(RuntimeError, match="Triton kernels cannot serve"):
        choose_path(SMALL)
    monkeypatch.setattr(cpp, "ENABLED", False)
    with torch_bn.use_path("cpp"), pytest.raises(RuntimeError, match="TORCH_BN_CPP=0"):
        choose_path(SMALL)


@pytest.mark.parametrize("value, path", [("reference", "reference"), ("auto", "cpp"), ("", "cpp")])
def test_the_environment_switch_is_read_at_import(value, path):
    """TORCH_BN_PATH=reference (read when torch_bn is imported) is the reference switch; a value
    that names no mode stops the import with a clear error."""
    code = "import torch, torch_bn; print(torch_bn.dispatch.choose_path(torch.empty(50, 100)))"
    env = dict(os.environ, TORCH_BN_PATH=value)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    expected = path if cpp.ENABLED else "reference"
    assert result.stdout.strip() == expected, result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(env, TORCH_BN_PATH="fused"))
    assert result.returncode != 0 and "TORCH_BN_PATH='fused' is not a torch_bn path" in result.stderr


@pytest.mark.parametrize("mode", dispatch.MODES)
@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("cpp_on", [False, True])
@pytest.mark.parametrize("compiling", [False, True])
def test_the_cpu_shortcut_agrees_with_the_table(monkeypatch, mode, triton, cpp_on, compiling):
    """choose_path answers plain CPU tensors in auto mode without walking its table: for every
    mode, Triton-on-CPU setting, compiled op on or off and torch.compile tracing or not, on small
    and large float32 and float64 tensors, a subclass, and inside torch.func.vmap, it says what
    choose_path_by_table says (or both raise the same error)."""
    if cpp_on and cpp.op() is None:
        pytest.skip("the compiled op is switched off (TORCH_BN_CPP=0) or cannot be built here")
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", triton)
    monkeypatch.setattr(cpp, "ENABLED", cpp_on)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    tensors = [SMALL, LARGE, SMALL.double(), torch.nn.Parameter(torch.empty(4, 3))]

    def answer(f, x):
        try:
            return f(x)
        except RuntimeError as e:
            return f"error: {e}"
    with dispatch.use_path(mode):
        for x in tensors:
            assert answer(choose_path, x) == answer(dispatch.choose_path_by_table, x), (mode, x.shape, type(x))
        inside = torch.func.vmap(lambda x: torch.tensor([ord(c) for c in answer(choose_path, x)
                                                         + "|" + answer(dispatch.choose_path_by_table, x)]))
        codes = inside(torch.empty(2, 5, 3))[0].tolist()
        first, second = "".join(map(chr, codes)).split("|")
        assert first == second == "reference"
