"""``BatchNormFunction``: training-mode batch norm as a custom autograd Function.

This Python Function is the autograd node of every training-mode torch_bn call, on every path
and device. Its forward and backward ask :func:`torch_bn.dispatch.choose_path` for their bodies:
the readable math of :mod:`torch_bn.ops` (the reference, and what ``torch_bn.use_path("reference")``
/ ``TORCH_BN_PATH=reference`` runs everywhere), the compiled CPU ops of :mod:`torch_bn.cpp`, the
slab-fused tensor ops of :mod:`torch_bn.fused` (CPU), or the Triton kernels of
:mod:`torch_bn.triton_kernels` (CUDA). Each body returns the same y and statistics (forward) and
the same closed-form gradients (backward); double backward records the reference ops, which are
differentiable.

Three classes, one Function: ``BatchNormFunction`` (``forward`` + ``setup_context`` style, which
torch.func transforms need: ``generate_vmap_rule``); ``EagerBatchNormFunction``, the classic-style
sibling eager code runs (``type(y.grad_fn).__name__ == "EagerBatchNormFunctionBackward"``), cheaper
per call and with the running-statistics update folded in; ``CompiledBatchNormFunction`` (no
``jvp``) for code torch.compile traces. The siblings inherit BatchNormFunction's forward, backward
and jvp. ``torch_bn.sync_batchnorm.SyncBatchNormFunction`` stays beside the distributed code it
needs: its forward and backward exchange statistics and gradient sums between ranks (collectives
between the reductions, so none of the single-process bodies here can serve it), and it always
runs the reference math of :mod:`torch_bn.ops`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import cpp, dispatch, fused, ops


class BatchNormFunction(torch.autograd.Function):
    """y, mean, var = BatchNormFunction.apply(x, weight, bias, eps, backward)

    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float);
    backward: "closed_form" (default formula) or "staged" (node-by-node).
    Outputs: y like x; the batch mean and biased variance (C,) in compute dtype, which are not
    differentiable (callers use them to update running statistics).
    Saves for backward (and for jvp): x, weight, mean and rstd = 1 / sqrt(var + eps); nothing of
    x's size beyond x.
    Forward-mode AD (``jvp``: torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian)
    gives y's tangent in closed form; mean and var carry no tangent (non-differentiable).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                backward: str = "closed_form") -> tuple[Tensor, Tensor, Tensor]:
        path = dispatch.choose_path(x)
        if path == "cpp":
            y, mean, var, _rstd = cpp.op().forward(x, weight, bias, None, None, None, 0.0, eps)
            return y, mean, var
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
        save_context(ctx, (x, weight, mean, torch.rsqrt(var + eps)), (mean, var), eps, bias)
        ctx.backward = backward
        ctx.path = dispatch.choose_path(x)  # what forward ran on: the backward takes the same path

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, _eps, _backward):
        x, weight, mean, rstd = ctx.saved_tensors
        dy = ops.training_jvp(dx, dweight, dbias, x, mean, rstd, weight)
        return dy, None, None

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar):
        if dy is None:
            return None, None, None, None, None
        dx, dweight, dbias = gradients(ctx, dy)
        return dx, dweight, dbias, None, None


def gradients(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward of :class:`BatchNormFunction` and its siblings: dx, dweight, dbias (None where
    not needed) from dy and what the forward saved (``ctx.path``: the path the forward ran on), on
    the path :func:`~torch_bn.dispatch.backward_path` picks."""
    x, weight, mean, rstd = ctx.saved_tensors
    double_backward = torch.is_grad_enabled()
    path = dispatch.backward_path(ctx.path, staged=ctx.backward == "staged", double_backward=double_backward)
    if path == "cpp":
        dx, dweight, dbias = cpp.op().backward(dy, x, weight, mean, rstd, ctx.needs_input_grad[0])
    elif path == "triton":
        dx, dweight, dbias = torch.ops.torch_bn.triton_backward(dy, x, mean, rstd, weight)
    elif path == "fused":
        dx, dweight, dbias = fused.closed_form_backward(dy, x, mean, rstd, weight)
    else:
        if double_backward:
            # mean and var are functions of x: recompute them with differentiable ops
            # instead of using the forward's constants.
            mean, var = ops.batch_stats(x)
            rstd = torch.rsqrt(var + ctx.eps)
        xhat = (x - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
        impl = ops.closed_form_backward if ctx.backward == "closed_form" else ops.staged_backward
        dx, dweight, dbias = impl(dy, xhat, rstd, weight)
    return needed_gradients(ctx, dx, dweight, dbias, weight)


def save_context(ctx, saved: tuple[Tensor | None, ...], statistics: tuple[Tensor, ...], eps: float,
                 bias: Tensor | None) -> None:
    """What the ``setup_context`` of torch_bn's training-mode Functions (this one, ghost, masked,
    renorm) keeps: the statistics outputs marked non-differentiable (and no zero-filled gradients
    materialized for them), ``saved`` for backward and for jvp, eps, and the dtype of bias, which
    its gradient must have."""
    ctx.mark_non_differentiable(*statistics)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*saved)
    ctx.save_for_forward(*saved)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def needed_gradients(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None,
                     weight: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dx, dweight, dbias as a backward of torch_bn's returns them: None where
    ``ctx.needs_input_grad`` says no gradient is needed, and dweight, dbias in the parameters'
    dtypes (the bodies compute them in the compute dtype; ``ctx.bias_dtype`` from the forward)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (dx if need_x else None,
            (dweight if dweight.dtype == weight.dtype else dweight.to(weight.dtype)) if need_w else None,
            (dbias if dbias.dtype == ctx.bias_dtype else dbias.to(ctx.bias_dtype)) if need_b else None)


class EagerBatchNormFunction(BatchNormFunction):
    """y = EagerBatchNormFunction.apply(x, weight, bias, eps, backward, running_mean, running_var, momentum,
    num_batches_tracked, path=None)

    BatchNormFunction for eager calls outside torch.func transforms (what
    torch_bn.functional.batch_norm and the modules run there), in the classic
    ``forward(ctx, ...)`` style, with the running-statistics update folded in. Two reasons, both
    per-call cost at the MLP's (50, 100), where the compiled forward itself takes ~10 us:

    - for a Function with ``setup_context``, ``apply`` binds its arguments to ``forward``'s
      signature with ``inspect`` on every call (tens of microseconds); this style skips that;
    - the compiled forward op updates running_mean, running_var and the module's batch counter
      in the same C++ call (tensor ops fewer from Python).

    The bodies are BatchNormFunction's (its forward for every path but the compiled op, whose
    call differs only by the running statistics) and its backward and jvp run unchanged, so a
    breakpoint or an edit in BatchNormFunction, or in torch_bn/ops.py, takes effect here too.
    torch.func transforms need the ``setup_context`` style: there BatchNormFunction runs.
    Inputs as BatchNormFunction's, plus running_mean, running_var (C,) or None, updated in place
    (the unbiased batch variance for running_var) by momentum, num_batches_tracked (a counter)
    or None, incremented by one, and path: what :func:`~torch_bn.dispatch.choose_path` says for
    x, where the caller has asked it already (None: ask). Output: y alone.
    """

    generate_vmap_rule = False
    setup_context = staticmethod(torch.autograd.Function.setup_context)

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backward: str,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                num_batches_tracked: Tensor | None, path: str | None = None) -> Tensor:
        ctx.path = path = path or dispatch.choose_path(x)
        if path == "cpp":  # eager_forward's first branch, without a Python call more per layer
            y, mean, _var, rstd = cpp.op().forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                                   momentum, eps)
        else:
            y, mean, rstd = eager_forward(x, weight, bias, eps, backward, running_mean, running_var, momentum,
                                          num_batches_tracked, path)
        ctx.save_for_backward(x, weight, mean, rstd)
        if forward_ad._current_level >= 0:  # jvp runs only within a dual level
            ctx.save_for_forward(x, weight, mean, rstd)
        ctx.eps = eps
        ctx.backward = backward
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        return BatchNormFunction.jvp(ctx, dx, dweight, dbias, None, None)[0]

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:
            return None, None, None, None, None, None, None, None, None, None
        dx, dweight, dbias = gradients(ctx, dy)
        return dx, dweight, dbias, None, None, None, None, None, None, None


def eager_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backward: str,
                  running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                  num_batches_tracked: Tensor | None = None, path: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of :class:`EagerBatchNormFunction`: y, the batch mean and rstd, with the running
    statistics updated and the batch counted in num_batches_tracked (where given), on ``path``
    (default: :func:`~torch_bn.dispatch.choose_path`'s). Also what torch_bn.functional.batch_norm
    runs where autograd would record nothing (no_grad, nothing requiring grad, no forward-AD
    level): there is no node to build."""
    if (path or dispatch.choose_path(x)) == "cpp":
        y, mean, _var, rstd = cpp.op().forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                               momentum, eps)
        return y, mean, rstd
    y, mean, var = BatchNormFunction.forward(x, weight, bias, eps, backward)
    update_running_stats(running_mean, running_var, mean, var, x, momentum, num_batches_tracked)
    return y, mean, torch.rsqrt(var + eps)


def records_graph(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd records a call on these inputs: grad mode on and one of them requiring
    grad, or a forward-AD level open (dual tensors)."""
    return (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))
            or forward_ad._current_level >= 0)


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                         x: Tensor, momentum: float, num_batches_tracked: Tensor | None = None) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, as F.batch_norm (lerp: one op
    per buffer), with the unbiased batch variance for running_var; mean and var (biased) of x.
    num_batches_tracked, where given, counts one more batch."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            m = x.numel() // x.shape[1]
            running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
    count_batch(num_batches_tracked)


def count_batch(num_batches_tracked: Tensor | None) -> None:
    """One more batch on a module's counter, where given: in Python what the compiled forward op
    does in its own call (torch_bn_cpp::batch_norm_forward's num_batches_tracked)."""
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)


class CompiledBatchNormFunction(BatchNormFunction):
    """BatchNormFunction without ``jvp``, for code ``torch.compile`` traces: Dynamo cannot trace
    an autograd Function that defines a custom ``jvp`` (it would break the graph), so compiled
    code has reverse-mode AD only. Eager code, torch.func and forward_ad use BatchNormFunction."""

    jvp = staticmethod(torch.autograd.Function.jvp)
