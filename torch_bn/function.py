"""``BatchNormFunction``: training-mode batch norm as a custom autograd Function.

Forward and backward are the hand-written math of :mod:`torch_bn.ops` (the reference). Where
that is safe, the same math runs faster: :func:`choose_path` holds the one rule that picks
between the reference ops, the slab-fused tensor ops of :mod:`torch_bn.fused` (CPU) and the
Triton kernels of :mod:`torch_bn.triton_kernels` (CUDA), for the forward and the backward alike.
The Function uses the ``forward`` + ``setup_context`` style so that it composes with
torch.func transforms (``generate_vmap_rule``) and ``torch.compile``.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import fused, ops

TRITON_ON_CPU = False  # tests set this (with TRITON_INTERPRET=1) to run the kernels on CPU tensors
# TORCH_BN_TRITON=0 in the environment (or USE_TRITON = False) keeps CUDA tensors on the tensor-op
# paths: an escape hatch should the kernels misbehave on some GPU, and a baseline to compare with.
USE_TRITON = os.environ.get("TORCH_BN_TRITON", "1") != "0"
# Below this size the fused path's bookkeeping (a dozen small per-channel ops, the one-pass check)
# costs more than the full-size temporaries of the reference ops it avoids (forward+backward,
# 2-core CPU: 100x500 0.51 vs 0.71 ms, 512x512 1.95 vs 1.31 ms).
FUSED_MIN_ELEMENTS = 1 << 17
# The kernels compute in float32: float64 input keeps its precision on the tensor-op paths.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

PATHS = ("reference", "fused", "triton")

_kernels = None  # torch_bn.triton_kernels once imported, False where it cannot be


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


def choose_path(x: Tensor, *, staged: bool = False, double_backward: bool = False) -> str:
    """Which implementation computes this call: "reference", "fused" or "triton".

    Forward and backward both ask; x is the input (saved x in the backward). The first row that
    matches decides:

    ===========================================  ===========  ==========================================
    condition                                    path         why
    ===========================================  ===========  ==========================================
    backward with ``staged`` (node-by-node)      reference    it exists to be read and compared
    double backward (autograd recording)         reference    only the reference ops are differentiable
    torch.func transform active (vmap, grad...)  reference    fast paths write into their own buffers
    Triton switched on (``USE_TRITON``), CUDA    triton       one kernel sweep per pass
    tensor, float32/float16/bfloat16, kernels
    importable
    ``torch.compile`` tracing                    reference    the compiler fuses the ops itself
    ``x.numel() >= FUSED_MIN_ELEMENTS``          fused        fewer trips through memory
    otherwise (small inputs, float64 on CUDA)    reference    fewer, larger ops cost less there
    ===========================================  ===========  ==========================================

    The fused paths write into buffers they allocate (out=, in place) in a Python loop over
    slabs: under torch.func transforms those would be wrapped tensors, and torch.compile would
    unroll the loop. Transforms and compilation are checked before the size, so that the
    compiler sees no size test to guard on. The Triton kernels are custom ops, opaque to
    torch.compile, so compiled CUDA code still calls them.
    """
    if staged or double_backward or torch._C._are_functorch_transforms_active():
        return "reference"
    if (USE_TRITON and (x.is_cuda or TRITON_ON_CPU) and x.dtype in TRITON_DTYPES
            and _triton_kernels() is not None):
        return "triton"
    if torch.compiler.is_compiling():
        return "reference"
    return "fused" if x.numel() >= FUSED_MIN_ELEMENTS else "reference"


class BatchNormFunction(torch.autograd.Function):
    """y, mean, var = BatchNormFunction.apply(x, weight, bias, eps, backward)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float);
    backward: "closed_form" (default formula) or "staged" (node-by-node).
    Outputs: y like x; the batch mean and biased variance (C,) in compute dtype, which are not
    differentiable (callers use them to update running statistics).
    Saves for backward (and for jvp): x, weight, mean and var; nothing of x's size beyond x.
    Forward-mode AD (``jvp``: torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian)
    gives y's tangent in closed form; mean and var carry no tangent (non-differentiable).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                backward: str = "closed_form") -> tuple[Tensor, Tensor, Tensor]:
        path = choose_path(x)
        if path == "triton":
            return tuple(torch.ops.torch_bn.triton_forward(x, weight, bias, eps))
        if path == "fused":
            return fused.forward_train(x, weight, bias, eps)
        mean, var = ops.batch_stats(x)
        return ops.normalize(x, mean, torch.rsqrt(var + eps), weight, bias), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, eps, backward = inputs
        _y, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and var
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps = eps
        ctx.backward = backward
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, _eps, _backward):
        x, weight, mean, var = ctx.saved_tensors
        dy = ops.training_jvp(dx, dweight, dbias, x, mean, torch.rsqrt(var + ctx.eps), weight)
        return dy, None, None

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None
        double_backward = torch.is_grad_enabled()
        if double_backward:
            # mean and var are functions of x: recompute them with differentiable ops
            # instead of using the forward's constants.
            mean, var = ops.batch_stats(x)
        rstd = torch.rsqrt(var + ctx.eps)
        path = choose_path(x, staged=ctx.backward == "staged", double_backward=double_backward)
        if path == "triton":
            dx, dweight, dbias = torch.ops.torch_bn.triton_backward(dy, x, mean, rstd, weight)
        elif path == "fused":
            dx, dweight, dbias = fused.closed_form_backward(dy, x, mean, rstd, weight)
        else:
            xhat = (x - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
            impl = ops.closed_form_backward if ctx.backward == "closed_form" else ops.staged_backward
            dx, dweight, dbias = impl(dy, xhat, rstd, weight)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dweight.to(weight.dtype) if need_w else None,
            dbias.to(ctx.bias_dtype) if need_b else None,
            None,
            None,
        )


class CompiledBatchNormFunction(BatchNormFunction):
    """BatchNormFunction without ``jvp``, for code ``torch.compile`` traces: Dynamo cannot trace
    an autograd Function that defines a custom ``jvp`` (it would break the graph), so compiled
    code has reverse-mode AD only. Eager code, torch.func and forward_ad use BatchNormFunction."""

    jvp = staticmethod(torch.autograd.Function.jvp)

