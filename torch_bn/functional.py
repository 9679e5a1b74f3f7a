"""``torch_bn.functional.batch_norm``: the drop-in for ``torch.nn.functional.batch_norm``.

Training mode goes through :class:`~torch_bn.function.BatchNormFunction` (whose bodies
:func:`torch_bn.dispatch.choose_path` picks), then updates the running statistics; evaluation
mode is a plain per-channel affine map built from tensor ops, so autograd differentiates it
(w.r.t. input, weight and bias) without a custom backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import ops
from . import function as _function


class ChannelMismatchError(ValueError, RuntimeError):
    """Input channels differ from the parameters'. A RuntimeError as in PyTorch, and a ValueError."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """Non-floating input. A NotImplementedError as in PyTorch, and a TypeError."""


class InputShapeError(ValueError, IndexError, RuntimeError):
    """0-D or 1-D input (no channel dimension). PyTorch raises IndexError (RuntimeError in
    evaluation mode with running statistics); a ValueError too, as for wrong dims in the modules."""


class RunningStatsError(ValueError, RuntimeError):
    """Only one of running_mean / running_var given (PyTorch: ValueError), or neither in
    evaluation mode (PyTorch: RuntimeError)."""


class DtypeMismatchError(TypeError, RuntimeError):
    """Parameters or running statistics in another dtype than the input allows. A RuntimeError
    as in PyTorch, and a TypeError."""


def _check_dtypes(input: Tensor, tensors: tuple[tuple[str, Tensor | None], ...]) -> None:
    """PyTorch's rule: weight, bias and the running statistics share one dtype, the input's, or
    float32 for float16/bfloat16 input (mixed precision)."""
    given = [(name, t.dtype) for name, t in tensors if t is not None]
    allowed = {input.dtype, ops.compute_dtype(input)}
    for name, dtype in given:
        if dtype not in allowed or dtype != given[0][1]:
            raise DtypeMismatchError(
                f"batch_norm got {input.dtype} input with "
                + ", ".join(f"{n} in {d}" for n, d in given)
                + f"; weight, bias, running_mean and running_var must all be {input.dtype}"
                + (" (or all float32)" if ops.compute_dtype(input) != input.dtype else "")
                + f": convert the module (module.to({input.dtype})) or the input "
                f"(input.to({given[0][1]}))")


def check_input(input: Tensor, training: bool, eps: float, running_mean: Tensor | None,
                running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None, *,
                check_count: bool = True) -> None:
    """Raise a clear error for input batch norm cannot normalize; mirrors PyTorch's checks and
    exception types (a caller's ``except`` written for ``F.batch_norm`` catches these).
    check_count=False leaves out the "more than 1 value per channel" check (synchronized batch
    norm counts over every rank)."""
    if not input.is_floating_point():
        raise UnsupportedDtypeError(
            f"batch_norm expects a floating-point input, got {input.dtype}; "
            f"convert it first, e.g. input.float()")
    if input.dim() < 2:
        raise InputShapeError(f"batch_norm expects input of shape (N, C) or (N, C, *), got {input.dim()}D input "
                              f"of shape {tuple(input.shape)}; add a batch dimension, e.g. input.unsqueeze(0)")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}; "
                         f"use a small positive eps such as 1e-5")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}; use e.g. 1e-5")
    if (running_mean is None) != (running_var is None):
        raise RunningStatsError("running_mean and running_var must either both be None or neither be None; "
                                "pass both (training updates them, evaluation uses them) or neither")
    if not training and running_mean is None:
        raise RunningStatsError("batch_norm in evaluation mode (training=False) needs running_mean and "
                                "running_var; pass them, or use training=True for batch statistics")
    channels = input.shape[1]
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    for name, v in named:
        if v is not None and v.numel() != channels:
            raise ChannelMismatchError(
                f"{name} has {v.numel()} elements but the input has {channels} channels (dim 1) "
                f"in shape {tuple(input.shape)}; build the layer with num_features={channels} "
                f"or feed it input with {v.numel()} channels")
    _check_dtypes(input, named)
    if running_mean is not None and torch.is_grad_enabled() and (running_mean.requires_grad or running_var.requires_grad):
        raise RuntimeError("running_mean and running_var must not require grad: batch norm does not "
                           "differentiate with respect to them (PyTorch neither); pass them detached, "
                           "e.g. running_mean.detach(), or register them as buffers")
    if training and check_count and input.shape[0] * math.prod(input.shape[2:]) == 1:
        # Same message as PyTorch: a variance needs at least two values per channel.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backward: str = "closed_form",
) -> Tensor:
    """Batch normalization with the signature and semantics of ``F.batch_norm``.

    Inputs: input (N, C, *); running_mean, running_var (C,) or None, updated in place in
    training mode (running_var with the unbiased batch variance); weight, bias (C,) or None.
    training: normalize with batch statistics (True) or with the running ones (False).
    momentum: weight of the new batch in the running averages. backward: "closed_form" or
    "staged" (see :mod:`torch_bn.ops`). Output: same shape and dtype as input.
    """
    if backward not in ops.BACKWARDS:
        raise ValueError(f"backward must be one of {ops.BACKWARDS}, got {backward!r}")
    if input.dim() < 2 and input.numel() == 0:  # empty 1-D input: empty output, as PyTorch
        return input.clone()
    check_input(input, training, eps, running_mean, running_var, weight, bias)
    if not training:
        # The running statistics are constants here, as in PyTorch: no gradient, and no tangent
        # (a tangent on them is refused, as F.batch_norm refuses it).
        _check_no_running_tangents(input, running_mean, running_var)
        dtype = ops.compute_dtype(input)
        return ops.normalize(input, running_mean.detach().to(dtype),
                             torch.rsqrt(running_var.detach().to(dtype) + eps), weight, bias)
    if input.numel() == 0:
        # Empty batch: empty output, zero gradients for weight and bias, running statistics
        # unchanged (PyTorch's behaviour; the module still counts the batch).
        ones = torch.ones(input.shape[1], dtype=ops.compute_dtype(input), device=input.device)
        return ops.normalize(input, ones * 0, ones, weight, bias)

    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # The setup_context-style Functions (torch.compile traces CompiledBatchNormFunction).
        function = _function.CompiledBatchNormFunction if torch.compiler.is_compiling() else _function.BatchNormFunction
        y, mean, var = function.apply(input, weight, bias, eps, backward)
        _function.update_running_stats(running_mean, running_var, mean, var, input, momentum)
        return y
    # Eager: the same Function's bodies, the running statistics updated inside (one call).
    return _function.EagerBatchNormFunction.apply(input, weight, bias, eps, backward, running_mean, running_var,
                                                  momentum)


def batch_norm_stateless(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    backward: str = "closed_form",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch normalization that returns the updated running statistics instead of writing them.

    Same arguments and output as :func:`batch_norm`, but nothing is modified in place: the result
    is ``(output, new_running_mean, new_running_var)``. In training mode the new statistics are
    ``running.lerp(batch, momentum)`` (the unbiased batch variance for ``running_var``), exactly
    what :func:`batch_norm` writes into the buffers; in evaluation mode, or where a running
    statistic is None, the given ones come back unchanged. So the call is a pure function and
    composes with every torch.func transform (grad, vjp, jacrev, jacfwd, jvp, hessian, vmap):
    under vmap with batched input and unbatched running statistics the new statistics come back
    batched, one set per batch entry. As buffers in ``nn.BatchNorm*``, the new statistics are not
    differentiable. momentum may be a 0-d tensor (e.g. 1 / num_batches_tracked for a cumulative
    average under vmap).

    Inputs: input (N, C, *); running_mean, running_var (C,) or None; weight, bias (C,) or None.
    Outputs: output like input; new_running_mean, new_running_var (C,) or None.

    Example::

        >>> x = torch.randn(8, 4)
        >>> mean, var = torch.zeros(4), torch.ones(4)
        >>> y, mean, var = batch_norm_stateless(x, mean, var, training=True)
    """
    if backward not in ops.BACKWARDS:
        raise ValueError(f"backward must be one of {ops.BACKWARDS}, got {backward!r}")
    if input.dim() < 2 and input.numel() == 0:  # empty 1-D input: empty output, as batch_norm
        return input.clone(), running_mean, running_var
    # Running statistics that require grad are accepted here (the new ones come back detached,
    # as buffers), so check_input sees them detached.
    check_input(input, training, eps, _detached(running_mean), _detached(running_var), weight, bias)
    if not training:  # check_input refused evaluation without running statistics
        y = ops.normalize(input, running_mean.to(ops.compute_dtype(input)),
                          torch.rsqrt(running_var.to(ops.compute_dtype(input)) + eps), weight, bias)
        return y, running_mean, running_var

    if input.numel() == 0:
        # Empty batch: empty output and zero gradients for weight and bias, as batch_norm; the
        # running statistics come back unchanged.
        ones = torch.ones(input.shape[1], dtype=ops.compute_dtype(input), device=input.device)
        return ops.normalize(input, ones * 0, ones, weight, bias), running_mean, running_var
    function = _function.CompiledBatchNormFunction if torch.compiler.is_compiling() else _function.BatchNormFunction
    y, mean, var = function.apply(input, weight, bias, eps, backward)
    m = input.numel() // input.shape[1]
    new_mean = new_var = None
    if running_mean is not None:
        new_mean = running_mean.detach().lerp(mean.detach().to(running_mean.dtype),
                                              _weight_like(momentum, running_mean))
    if running_var is not None:
        new_var = running_var.detach().lerp((var.detach() * (m / (m - 1))).to(running_var.dtype),
                                            _weight_like(momentum, running_var))
    return y, new_mean, new_var


def _check_no_running_tangents(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """PyTorch's refusal (same message, a RuntimeError) of forward-mode tangents on the running
    statistics where the input has one too (F.batch_norm's forward derivative runs only then):
    batch norm is not differentiable with respect to them."""
    if torch.autograd.forward_ad._current_level < 0:  # no dual level open: no tangents anywhere
        return
    if torch.autograd.forward_ad.unpack_dual(input).tangent is None:
        return
    for t in (running_mean, running_var):
        if t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, they cannot "
                               "have forward grad defined; pass them without tangents (e.g. detach them, or "
                               "leave them out of the dual inputs)")


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _weight_like(momentum: float | Tensor, t: Tensor) -> float | Tensor:
    """lerp's weight: a float as it is, a tensor in the dtype of the tensor it updates."""
    return momentum.to(t.dtype) if isinstance(momentum, Tensor) else momentum
