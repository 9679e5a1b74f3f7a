"""``BatchNormFunction``: training-mode batch norm as a custom autograd Function.

Forward and backward are the hand-written math of :mod:`torch_bn.ops` (the reference). Where
autograd is not recording, the same math runs faster: CUDA tensors go to the Triton kernels of
:mod:`torch_bn.triton_kernels`, others of FUSED_MIN_ELEMENTS or more to the slab-fused tensor
ops of :mod:`torch_bn.fused`.
The Function uses the ``forward`` + ``setup_context`` style so that it composes with
torch.func transforms (``generate_vmap_rule``) and ``torch.compile``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import fused, ops

TRITON_ON_CPU = False  # tests set this (with TRITON_INTERPRET=1) to run the kernels on CPU tensors
# TORCH_BN_TRITON=0 in the environment (or USE_TRITON = False) keeps CUDA tensors on the tensor-op
# paths: an escape hatch should the kernels misbehave on some GPU, and a baseline to compare with.
USE_TRITON = os.environ.get("TORCH_BN_TRITON", "1") != "0"
FUSED_MIN_ELEMENTS = 1 << 17  # smaller inputs take the reference ops (see _use_fused)


_kernels = None  # torch_bn.triton_kernels once imported, False where Triton is missing


def _triton_kernels():
    """The Triton kernels module, imported on first use (importing Triton is slow); None without Triton."""
    global _kernels
    if _kernels is None:
        try:
            from . import triton_kernels as _kernels
        except ImportError:
            _kernels = False
    return _kernels or None


def _use_triton(x: Tensor) -> bool:
    if not USE_TRITON or not (x.is_cuda or TRITON_ON_CPU) or torch._C._are_functorch_transforms_active():
        return False
    return _triton_kernels() is not None


def _use_fused(x: Tensor) -> bool:
    # The fused paths write into buffers they allocate (out=, in place) in a Python loop over
    # slabs: under torch.func transforms those would be wrapped tensors, and torch.compile
    # would unroll the loop, while its own fusion does the same job. Both get the reference
    # (checked first, so that the compiler sees no size test to guard on).
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return False
    # Below FUSED_MIN_ELEMENTS the fused path's bookkeeping (a dozen small per-channel ops, the
    # one-pass check) costs more than the full-size temporaries of the reference ops it avoids
    # (forward+backward, 2-core CPU: 100x500 0.51 vs 0.71 ms, 512x512 1.95 vs 1.31 ms).
    return x.numel() >= FUSED_MIN_ELEMENTS


class BatchNormFunction(torch.autograd.Function):
    """y, mean, var = BatchNormFunction.apply(x, weight, bias, eps, backward)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float);
    backward: "closed_form" (default formula) or "staged" (node-by-node).
    Outputs: y like x; the batch mean and biased variance (C,) in compute dtype, which are not
    differentiable (callers use them to update running statistics).
    Saves for backward: x, weight, mean and var; nothing of x's size beyond x itself.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                backward: str = "closed_form") -> tuple[Tensor, Tensor, Tensor]:
        if _use_triton(x):
            return tuple(torch.ops.torch_bn.triton_forward(x, weight, bias, eps))
        if _use_fused(x):
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
        ctx.eps = eps
        ctx.backward = backward
        ctx.bias_dtype = None if bias is None else bias.dtype

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
        fast = ctx.backward == "closed_form" and not double_backward
        if fast and _use_triton(x):
            dx, dweight, dbias = torch.ops.torch_bn.triton_backward(dy, x, mean, rstd, weight)
        elif fast and _use_fused(x):
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
