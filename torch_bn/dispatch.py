"""Which implementation computes a training-mode batch norm: :func:`choose_path`, the one rule,
and the reference switch.

Every path runs inside the same autograd node, :class:`torch_bn.function.BatchNormFunction`; only
its bodies differ. ``"reference"`` is the readable math of :mod:`torch_bn.ops`; ``"cpp"`` the
compiled CPU ops of :mod:`torch_bn.cpp`; ``"fused"`` the slab-fused tensor ops of
:mod:`torch_bn.fused`; ``"triton"`` the Triton kernels of :mod:`torch_bn.triton_kernels` (CUDA).

The reference switch: ``TORCH_BN_PATH=reference`` in the environment (read when torch_bn is
imported), or ``with torch_bn.use_path("reference"):``, makes every call run the math of
:mod:`torch_bn.ops`, whatever the device and size, so that an edit there (or a breakpoint in
``BatchNormFunction.backward``) takes effect: ``TORCH_BN_PATH=reference python train.py --batchnorm``.
``"auto"`` (the default) is :func:`choose_path`'s table.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from . import cpp

PATHS = ("reference", "cpp", "fused", "triton")
MODES = ("auto", *PATHS)  # what use_path takes; "auto" is choose_path's table

TRITON_ON_CPU = False  # tests set this (with TRITON_INTERPRET=1) to run the kernels on CPU tensors
# TORCH_BN_TRITON=0 in the environment (or USE_TRITON = False) keeps CUDA tensors on the tensor-op
# paths: an escape hatch should the kernels misbehave on some GPU, and a baseline to compare with.
USE_TRITON = os.environ.get("TORCH_BN_TRITON", "1") != "0"
# Without the compiled op, CPU inputs of at least this many elements take the slab-fused tensor ops,
# smaller ones the reference ops: there the fused path's bookkeeping (a dozen small per-channel
# ops, the one-pass check) costs more than the full-size temporaries it avoids (forward+backward,
# 2-core CPU: 100x500 0.51 vs 0.71 ms, 512x512 1.95 vs 1.31 ms). With the op, every size takes it
# (bench/RESULTS.md, "compiled op or fused").
FUSED_MIN_ELEMENTS = 1 << 17
# The kernels compute in float32: float64 input keeps its precision on the tensor-op paths.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mode_from_environment() -> str:
    value = os.environ.get("TORCH_BN_PATH", "auto").strip() or "auto"
    if value not in ("auto", "reference"):
        raise ValueError(f"TORCH_BN_PATH={value!r} is not a torch_bn path: use TORCH_BN_PATH=reference (the "
                         f"readable math of torch_bn/ops.py on every call) or auto (the default), or unset it")
    return value


_mode = _mode_from_environment()
_kernels = None  # torch_bn.triton_kernels once imported, False where it cannot be


def current_path() -> str:
    """The mode set by :func:`use_path` or ``TORCH_BN_PATH``: "auto", "reference", or a pinned path."""
    return _mode


@contextlib.contextmanager
def use_path(path: str) -> Iterator[None]:
    """Run every torch_bn batch norm inside the block on one path.

    Args:
        path: ``"reference"``: the readable math of :mod:`torch_bn.ops` on every call (forward,
            closed-form or staged backward), whatever the device and size, so that edits there
            take effect. ``"auto"``: :func:`choose_path`'s table (the default). For tests and
            benchmarks, ``"cpp"``, ``"fused"`` or ``"triton"`` pin that implementation where the
            table would pick by size or device; a call it cannot serve raises a RuntimeError that
            says why (staged and double backward, and torch.func transforms, still run the reference).

    The setting is process-wide (autograd may run the backward on another thread); the previous
    one is restored on exit. A backward follows the reference switch that was on at its forward.

    Example::

        >>> with torch_bn.use_path("reference"):
        ...     torch_bn.BatchNorm1d(100)(torch.randn(50, 100)).sum().backward()
    """
    global _mode
    if path not in MODES:
        raise ValueError(f"use_path takes one of {MODES}, got {path!r}")
    previous, _mode = _mode, path
    try:
        yield
    finally:
        _mode = previous


def _triton_kernels():
    """The Triton kernels module, imported on first use (importing Triton is slow); None where
    Triton is missing or the kernels cannot be registered on this PyTorch (one warning)."""
    global _kernels
    if _kernels is None:
        try:
            from . import triton_kernels as _kernels
        except ImportError as e:
            if (getattr(e, "name", None) or "").split(".")[0] != "triton":  # no Triton: normal on CPU
                warnings.warn(f"torch_bn: the Triton kernels cannot be imported ({e}); CUDA tensors "
                              f"take the tensor-op path", RuntimeWarning, stacklevel=3)
            _kernels = False
        except Exception as e:  # e.g. a PyTorch whose custom-op registration rejects the kernels
            warnings.warn(f"torch_bn: the Triton kernels cannot be registered ({type(e).__name__}: {e}); "
                          f"CUDA tensors take the tensor-op path", RuntimeWarning, stacklevel=3)
            _kernels = False
    return _kernels or None


def _triton_serves(x: Tensor) -> bool:
    if USE_TRITON and (x.is_cuda or TRITON_ON_CPU) and x.dtype in TRITON_DTYPES:
        kernels = _triton_kernels()
        return kernels is not None and kernels.supports(x)
    return False


def _cpp_serves(x: Tensor) -> bool:
    return x.is_cpu and type(x) is torch.Tensor and cpp.op() is not None


def choose_path(x: Tensor) -> str:
    """Which implementation computes this call: "reference", "cpp", "fused" or "triton".

    :class:`~torch_bn.function.BatchNormFunction` asks in its forward (x: the input); its backward
    takes the same path (:func:`backward_path`, which sends the staged and the double backward
    to the reference). The first row that matches decides:

    ===========================================  ===========  ==========================================
    condition                                    path         why
    ===========================================  ===========  ==========================================
    reference switch on (``use_path``,           reference    the readable math, so edits take effect
    ``TORCH_BN_PATH=reference``)
    torch.func transform active (vmap, grad...)  reference    fast paths write into their own buffers
    a path pinned by ``use_path``                that path    tests and benchmarks (error if it cannot)
    Triton switched on (``USE_TRITON``), CUDA    triton       one kernel sweep per pass
    tensor, float32/float16/bfloat16, kernels
    importable
    ``torch.compile`` tracing                    reference    the compiler fuses the ops itself
    CPU tensor (not a subclass), the compiled    cpp          one C++ call per pass: small inputs cost
    op built (``torch_bn.cpp.op()``), any size                per-call overhead, not arithmetic; large
                                                              ones as fast as fused or faster, most
                                                              shapes (bench/RESULTS.md)
    ``x.numel() >= FUSED_MIN_ELEMENTS``          fused        fewer trips through memory
    otherwise (small inputs without the          reference    fewer, larger ops cost less there
    compiled op; float64 on CUDA)
    ===========================================  ===========  ==========================================

    The fused path writes into buffers it allocates (out=, in place) in a Python loop over slabs,
    and the compiled op reads raw memory: under torch.func transforms the tensors would be
    wrapped, and torch.compile would unroll the loop. Transforms and compilation are checked
    before the size, so that the compiler sees no size test to guard on. The Triton kernels are
    custom ops, opaque to torch.compile, so compiled CUDA code still calls them. Forward-mode AD
    (dual tensors) runs any path: the Function's ``jvp`` needs only the saved x and statistics.
    """
    if _mode == "auto" and type(x) is torch.Tensor and x.is_cpu and not TRITON_ON_CPU:
        # The rows below for a plain CPU tensor in auto mode, in fewer steps: this runs on every
        # call (tests check that it agrees with choose_path_by_table).
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return "reference"
        if cpp.op() is not None:
            return "cpp"
        return "reference" if x.numel() < FUSED_MIN_ELEMENTS else "fused"
    return choose_path_by_table(x)


def choose_path_by_table(x: Tensor) -> str:
    """:func:`choose_path`'s table, row by row (choose_path takes a shortcut for plain CPU tensors)."""
    if _mode == "reference" or torch._C._are_functorch_transforms_active():
        return "reference"
    if _mode != "auto":
        return _pinned(x, _mode)
    if _triton_serves(x):
        return "triton"
    if torch.compiler.is_compiling():
        return "reference"
    if _cpp_serves(x):
        return "cpp"
    return "reference" if x.numel() < FUSED_MIN_ELEMENTS else "fused"


def backward_path(forward_path: str, *, staged: bool, double_backward: bool) -> str:
    """The path of a backward whose forward ran on ``forward_path`` (what :func:`choose_path` said
    then): the same one, so that the reference switch or a pinned path in force at the forward
    holds for its backward, except where only the reference ops serve:

    ===========================================  ===========  ==========================================
    ``staged`` backward (node-by-node)           reference    it exists to be read and compared
    double backward (autograd recording)         reference    only the reference ops are differentiable
    torch.func transform active                  reference    fast paths write into their own buffers
    ===========================================  ===========  ==========================================
    """
    if staged or double_backward or torch._C._are_functorch_transforms_active():
        return "reference"
    return forward_path


def _pinned(x: Tensor, path: str) -> str:
    """The path pinned by use_path, where it can serve x."""
    if path == "cpp" and not _cpp_serves(x):
        why = ("switched off (TORCH_BN_CPP=0)" if not cpp.ENABLED else "not built (see the warning)"
               if x.is_cpu and type(x) is torch.Tensor else f"for plain CPU tensors, not {type(x).__name__} on {x.device}")
        raise RuntimeError(f"torch_bn.use_path('cpp'): the compiled CPU op is {why}; use_path('auto') picks a path that can serve")
    if path == "triton" and not _triton_serves(x):
        raise RuntimeError(f"torch_bn.use_path('triton'): the Triton kernels cannot serve {x.dtype} input on {x.device} "
                           f"(CUDA float32/float16/bfloat16, Triton installed, TORCH_BN_TRITON not 0); "
                           f"use_path('auto') picks a path that can serve")
    return path
