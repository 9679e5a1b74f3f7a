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

from . import dispatch, eager, ops
from . import function as _function
from .ghost import GhostBatchNormFunction
from .masked import MaskedBatchNormFunction
from .renorm import BatchRenormFunction


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
    # Ordered so that valid input, the common case, costs few Python operations: at the MLP's
    # (50, 100) the whole layer takes ~150 us. (batch_norm's training-mode calls on the compiled op
    # run the same checks in C++ instead, and call this only where the op refuses the input.)
    shape, dtype = input.shape, input.dtype
    if not dtype.is_floating_point:
        raise UnsupportedDtypeError(
            f"batch_norm expects a floating-point input, got {dtype}; convert it first, e.g. input.float()")
    if len(shape) < 2:
        raise InputShapeError(f"batch_norm expects input of shape (N, C) or (N, C, *), got {len(shape)}D input "
                              f"of shape {tuple(shape)}; add a batch dimension, e.g. input.unsqueeze(0)")
    if eps <= 0.0 and (training or eps < 0.0):
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}; use a small positive "
                         f"eps such as 1e-5" if training else
                         f"batch_norm eps must be non-negative, but got {eps}; use e.g. 1e-5")
    if running_mean is None:
        if running_var is not None:
            raise RunningStatsError(_ONE_RUNNING_STAT)
        if not training:
            raise RunningStatsError("batch_norm in evaluation mode (training=False) needs running_mean and "
                                    "running_var; pass them, or use training=True for batch statistics")
    elif running_var is None:
        raise RunningStatsError(_ONE_RUNNING_STAT)
    # One dtype for all of them, the input's or (float16/bfloat16 input) float32, and one value per
    # channel; where not, _check_parameters says which is wrong.
    channels, common, fine = shape[1], None, True
    for v in (running_mean, running_var, weight, bias):
        if v is not None:
            common = common or v.dtype
            if v.dtype != common or v.numel() != channels:
                fine = False
                break
    if not fine or common is not None and common != dtype and common != ops.compute_dtype(input):
        _check_parameters(input, (("running_mean", running_mean), ("running_var", running_var),
                                  ("weight", weight), ("bias", bias)))
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
        raise RuntimeError("running_mean and running_var must not require grad: batch norm does not "
                           "differentiate with respect to them (PyTorch neither); pass them detached, "
                           "e.g. running_mean.detach(), or register them as buffers")
    if training and check_count and shape[0] == 1 and math.prod(shape[2:]) == 1:
        # Same message as PyTorch: a variance needs at least two values per channel.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


_ONE_RUNNING_STAT = ("running_mean and running_var must either both be None or neither be None; "
                     "pass both (training updates them, evaluation uses them) or neither")


def _check_parameters(input: Tensor, named: tuple[tuple[str, Tensor | None], ...]) -> None:
    """The channel count and dtype of weight, bias and the running statistics, where one differs
    from the input's: an error, or nothing for float32 ones with float16/bfloat16 input."""
    channels = input.shape[1]
    for name, v in named:
        if v is not None and v.numel() != channels:
            raise ChannelMismatchError(
                f"{name} has {v.numel()} elements but the input has {channels} channels (dim 1) "
                f"in shape {tuple(input.shape)}; build the layer with num_features={channels} "
                f"or feed it input with {v.numel()} channels")
    _check_dtypes(input, named)


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
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch normalization with the signature and semantics of ``F.batch_norm``.

    Inputs: input (N, C, *); running_mean, running_var (C,) or None, updated in place in
    training mode (running_var with the unbiased batch variance); weight, bias (C,) or None.
    training: normalize with batch statistics (True) or with the running ones (False).
    momentum: weight of the new batch in the running averages. backward: "closed_form" or
    "staged" (see :mod:`torch_bn.ops`). Output: same shape and dtype as input.
    mask: bool (N, *) (the input's shape without dim 1): training statistics over the True
    positions only (:mod:`torch_bn.masked`). virtual_batch_size: ghost batch norm, each chunk
    of that many samples normalized with its own statistics in training (:mod:`torch_bn.ghost`).
    Both only change training mode; evaluation uses the running statistics as always.
    num_batches_tracked: a module's batch counter, incremented by one in training mode once the
    batch is normalized (the modules pass theirs: the compiled CPU op counts in its own call).
    """
    if (training and mask is None and virtual_batch_size is None and dispatch.choose_path(input) == "cpp"
            and backward in ops.BACKWARDS and (running_mean is None or running_var is None
                                               or not (running_mean.requires_grad or running_var.requires_grad))):
        # The common case, training on the compiled op: its own checks (csrc/ops.cpp, as strict as
        # check_input's) take the place of check_input's Python ones, a few microseconds a call at
        # the MLP's sizes. Where they refuse (nothing has been written then), the general path
        # below runs: check_input says what is wrong, or the case is one it serves (an empty batch).
        try:
            if not _function.records_graph(input, weight, bias):
                return _function.eager_forward(input, weight, bias, eps, backward, running_mean, running_var,
                                               momentum, num_batches_tracked, "cpp")[0]
            return _function.EagerBatchNormFunction.apply(input, weight, bias, eps, backward, running_mean,
                                                          running_var, momentum, num_batches_tracked, "cpp")
        except RuntimeError:
            pass
    if backward not in ops.BACKWARDS:
        raise ValueError(f"backward must be one of {ops.BACKWARDS}, got {backward!r}")
    if input.dim() < 2 and input.numel() == 0:  # empty 1-D input: empty output, as PyTorch
        _count(num_batches_tracked, training)
        return input.clone()
    check_input(input, training, eps, running_mean, running_var, weight, bias)
    if mask is not None or virtual_batch_size is not None:
        y = _variant_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                backward, mask, virtual_batch_size)
        _count(num_batches_tracked, training)
        return y
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
        _count(num_batches_tracked, training)
        return ops.normalize(input, ones * 0, ones, weight, bias)

    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # The setup_context-style Functions (torch.compile traces CompiledBatchNormFunction).
        function = _function.CompiledBatchNormFunction if torch.compiler.is_compiling() else _function.BatchNormFunction
        y, mean, var = function.apply(input, weight, bias, eps, backward)
        _function.update_running_stats(running_mean, running_var, mean, var, input, momentum, num_batches_tracked)
        return y
    # Eager: the same Function's bodies, the running statistics updated inside (one call); where
    # autograd records nothing (no_grad, inference, frozen inputs), the bodies without the node.
    if not _function.records_graph(input, weight, bias):
        return _function.eager_forward(input, weight, bias, eps, backward, running_mean, running_var, momentum,
                                       num_batches_tracked)[0]
    return _function.EagerBatchNormFunction.apply(input, weight, bias, eps, backward, running_mean, running_var,
                                                  momentum, num_batches_tracked)


def _count(num_batches_tracked: Tensor | None, training: bool) -> None:
    """One more batch on the counter, in training mode (the Function's bodies count their own)."""
    if training:
        _function.count_batch(num_batches_tracked)


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
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
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

    Inputs: input (N, C, *); running_mean, running_var (C,) or None; weight, bias (C,) or None;
    mask and virtual_batch_size as for :func:`batch_norm`.
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
    if mask is not None or virtual_batch_size is not None:
        _check_variant(input, training, backward, mask, virtual_batch_size)
        if training and input.numel() > 0:
            y, mean, var = _variant_train(input, weight, bias, eps, mask, virtual_batch_size)
            return y, *_lerp_running_stats(running_mean, running_var, mean, var, momentum, in_place=False)
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


# ---- Masked statistics, ghost batch norm and batch renormalization ------------------------------

def _lerp_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                        unbiased_var: Tensor, momentum: float | Tensor, *, in_place: bool
                        ) -> tuple[Tensor | None, Tensor | None]:
    """running.lerp(batch, momentum) for each running statistic given (not differentiable):
    written into the buffers (in_place) or returned as new tensors (the stateless forms)."""
    new = []
    for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
        if running is None:
            new.append(None)
        elif in_place:  # nothing here requires grad, so nothing is recorded (no no_grad() needed)
            new.append(running.lerp_(batch.detach().to(running.dtype), momentum))
        else:
            new.append(running.detach().lerp(batch.detach().to(running.dtype), _weight_like(momentum, running)))
    return new[0], new[1]


def _counted(mask: Tensor) -> int | None:
    """The number of True positions of mask, or None where it is not a plain value (a batched
    mask under torch.func.vmap: the count check is then left out)."""
    try:
        return int(mask.sum())
    except RuntimeError:
        return None


def _check_variant(input: Tensor, training: bool, backward: str, mask: Tensor | None,
                   virtual_batch_size: int | None, *, check_count: bool = True) -> None:
    """Clear errors for a mask or virtual batch size that batch norm cannot use. check_count=False
    leaves out the count of True positions (synchronized batch norm counts over every rank)."""
    if mask is not None and virtual_batch_size is not None:
        raise ValueError("batch_norm takes mask or virtual_batch_size, not both: ghost batch norm with "
                         "masked statistics is not implemented")
    if backward != "closed_form":
        raise ValueError(f"backward={backward!r} is only for plain batch norm; with mask or "
                         f"virtual_batch_size the backward is the closed form")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True where a position counts), got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}; "
                            f"e.g. mask = lengths_mask > 0")
        expected = (input.shape[0], *input.shape[2:])
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have the input's shape without dim 1, {expected} for input "
                             f"{tuple(input.shape)}, got {tuple(mask.shape)}")
        if mask.device != input.device:
            raise ValueError(f"mask is on {mask.device} but the input on {input.device}; move it, "
                             f"e.g. mask.to(input.device)")
        if training and check_count and input.numel() > 0:
            count = _counted(mask)
            if count is not None and count < 2:
                raise ValueError(f"masked batch norm needs at least 2 counted values per channel when "
                                 f"training, got {count} (mask has {count} True of {mask.numel()} "
                                 f"positions); count more positions, or use evaluation mode")
    if virtual_batch_size is not None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int (samples per ghost batch), got "
                             f"{virtual_batch_size!r}")
        n = input.shape[0]
        v = min(virtual_batch_size, n)
        if training and n > 0 and (v == 1 or n % v == 1):
            raise ValueError(f"Expected more than 1 value per channel when training: ghost batch norm with "
                             f"virtual_batch_size={virtual_batch_size} splits a batch of {n} into chunks "
                             f"of {v} with a last chunk of {n % v or v} sample; use a batch size that "
                             f"leaves no chunk of one sample, or drop the last incomplete batch")


def _variant_train(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                   mask: Tensor | None, virtual_batch_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode masked or ghost batch norm: y, and the batch mean and unbiased variance
    that the running statistics move towards."""
    if mask is not None:
        y, mean, var, count = eager.apply(MaskedBatchNormFunction, input, weight, bias, mask, eps)
        return y, mean, var * (count / (count - 1))  # unbiased over the counted positions
    y, means, variances, _rstd = eager.apply(GhostBatchNormFunction, input, weight, bias, eps, virtual_batch_size)
    # Keras 2's rule: the mean over chunks of the chunk means and of the chunk unbiased variances.
    n, per_sample = input.shape[0], input.numel() // (input.shape[0] * input.shape[1])
    v = min(virtual_batch_size, n)
    m = v * per_sample  # values per channel in a chunk
    if n % v == 0:
        return y, means.mean(0), variances.mean(0) * (m / (m - 1))
    last = (n % v) * per_sample  # the smaller last chunk
    unbiased = torch.cat([variances[:-1] * (m / (m - 1)), variances[-1:] * (last / (last - 1))])
    return y, means.mean(0), unbiased.mean(0)


def _variant_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                        eps: float, backward: str, mask: Tensor | None,
                        virtual_batch_size: int | None) -> Tensor:
    """batch_norm with a mask or a virtual batch size (checked by check_input already)."""
    _check_variant(input, training, backward, mask, virtual_batch_size)
    if not training or input.numel() == 0:  # evaluation, or an empty batch: plain batch norm
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    y, mean, var = _variant_train(input, weight, bias, eps, mask, virtual_batch_size)
    _lerp_running_stats(running_mean, running_var, mean, var, momentum, in_place=True)
    return y


def _check_renorm(rmax: float, dmax: float) -> None:
    if not rmax >= 1.0:
        raise ValueError(f"batch renormalization needs rmax >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}")
    if not dmax >= 0.0:
        raise ValueError(f"batch renormalization needs dmax >= 0 (d is clipped to [-dmax, dmax]), got {dmax}")


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> Tensor:
    """Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

    In training, with the batch mean and biased variance and the running statistics before
    this call's update (sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps)):
    ``y = weight * ((x - mean_B) / sigma_B * r + d) + bias``, r = clamp(sigma_B / sigma, 1/rmax, rmax),
    d = clamp((mean_B - running_mean) / sigma, -dmax, dmax), r and d constants for the gradient
    (:class:`torch_bn.renorm.BatchRenormFunction`); then the running statistics move as in
    :func:`batch_norm`. In evaluation mode, or without running statistics, it is :func:`batch_norm`.
    ``rmax=1, dmax=0`` is batch norm. Inputs and output as :func:`batch_norm`.
    """
    _check_renorm(rmax, dmax)
    if not training or running_mean is None or running_var is None or input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_input(input, training, eps, running_mean, running_var, weight, bias)
    y, mean, var, _r, _d = eager.apply(BatchRenormFunction, input, weight, bias, running_mean.detach(),
                                                     running_var.detach(), eps, rmax, dmax)
    m = input.numel() // input.shape[1]
    _lerp_running_stats(running_mean, running_var, mean, var * (m / (m - 1)), momentum, in_place=True)
    return y


def batch_renorm_stateless(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`batch_renorm` that returns ``(output, new_running_mean, new_running_var)`` instead
    of writing the running statistics, as :func:`batch_norm_stateless` (torch.func transforms)."""
    _check_renorm(rmax, dmax)
    if not training or running_mean is None or running_var is None or input.numel() == 0:
        return batch_norm_stateless(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_input(input, training, eps, _detached(running_mean), _detached(running_var), weight, bias)
    y, mean, var, _r, _d = eager.apply(BatchRenormFunction, input, weight, bias, running_mean.detach(),
                                                     running_var.detach(), eps, rmax, dmax)
    m = input.numel() // input.shape[1]
    return y, *_lerp_running_stats(running_mean, running_var, mean, var * (m / (m - 1)), momentum,
                                   in_place=False)
