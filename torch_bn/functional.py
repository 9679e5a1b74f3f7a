"""``torch_bn.functional.batch_norm``: the drop-in for ``torch.nn.functional.batch_norm``.

Training mode goes through :class:`~torch_bn.function.BatchNormFunction`; evaluation mode
is a plain per-channel affine map built from tensor ops, so autograd differentiates it
(w.r.t. input, weight and bias) without a custom backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .function import BatchNormFunction, CompiledBatchNormFunction


class ChannelMismatchError(ValueError, RuntimeError):
    """Input channels differ from the parameters'. A RuntimeError as in PyTorch, and a ValueError."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """Non-floating input. A NotImplementedError as in PyTorch, and a TypeError."""


def check_input(input: Tensor, training: bool, *channel_vectors: tuple[str, Tensor | None]) -> None:
    """Raise a clear error for input batch norm cannot normalize; mirrors PyTorch's checks."""
    if not input.is_floating_point():
        raise UnsupportedDtypeError(
            f"batch_norm expects a floating-point input, got {input.dtype}; "
            f"convert it first, e.g. input.float()")
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C) or (N, C, *), got {input.dim()}D input "
                         f"of shape {tuple(input.shape)}")
    channels = input.shape[1]
    for name, v in channel_vectors:
        if v is not None and v.numel() != channels:
            raise ChannelMismatchError(
                f"{name} has {v.numel()} elements but the input has {channels} channels (dim 1) "
                f"in shape {tuple(input.shape)}; build the layer with num_features={channels} "
                f"or feed it input with {v.numel()} channels")
    if training and input.numel() // max(channels, 1) <= 1:
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
    check_input(input, training, ("running_mean", running_mean), ("running_var", running_var),
                ("weight", weight), ("bias", bias))
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in evaluation mode (training=False) needs running_mean and "
                             "running_var; pass them, or use training=True for batch statistics")
        return ops.normalize(input, running_mean.to(ops.compute_dtype(input)),
                             torch.rsqrt(running_var.to(ops.compute_dtype(input)) + eps), weight, bias)

    function = CompiledBatchNormFunction if torch.compiler.is_compiling() else BatchNormFunction
    y, mean, var = function.apply(input, weight, bias, eps, backward)
    with torch.no_grad():
        # running = (1 - momentum) * running + momentum * batch, as lerp: one op per buffer.
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            m = input.numel() // input.shape[1]
            running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
    return y


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
    check_input(input, training, ("running_mean", running_mean), ("running_var", running_var),
                ("weight", weight), ("bias", bias))
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm_stateless in evaluation mode (training=False) needs running_mean and "
                             "running_var; pass them, or use training=True for batch statistics")
        y = ops.normalize(input, running_mean.to(ops.compute_dtype(input)),
                          torch.rsqrt(running_var.to(ops.compute_dtype(input)) + eps), weight, bias)
        return y, running_mean, running_var

    function = CompiledBatchNormFunction if torch.compiler.is_compiling() else BatchNormFunction
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


def _weight_like(momentum: float | Tensor, t: Tensor) -> float | Tensor:
    """lerp's weight: a float as it is, a tensor in the dtype of the tensor it updates."""
    return momentum.to(t.dtype) if isinstance(momentum, Tensor) else momentum
