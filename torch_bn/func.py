"""``torch_bn.func.functional_call``: run a module with given parameters and buffers, and get its
updated batch-norm buffers back instead of having them written in place.

``torch.func.functional_call`` runs ``nn.BatchNorm*`` in training mode by updating the running
statistics in place, which torch.func transforms reject (``grad``/``jacrev``: "attempted to call
in-place operation ... that would mutate a captured Tensor"; ``vmap`` over data with shared
statistics: "the running_mean or running_var ... were not batched"). Here every torch_bn layer of
the module computes with :func:`torch_bn.functional.batch_norm_stateless` instead and its new
``running_mean``, ``running_var`` and ``num_batches_tracked`` are returned, as Flax returns updated
batch statistics. The call then is a pure function of its inputs.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Recording(threading.local):
    # The updates recorded by the functional_call running on this thread; None outside one. A
    # class attribute, so that a thread that never ran one reads None without a failed lookup.
    updates: dict | None = None


_local = _Recording()


def recording() -> bool:
    """Whether a torch_bn layer called now runs inside :func:`functional_call` (and must not
    write its buffers)."""
    return _local.updates is not None


def stateless_forward(bn: nn.Module, input: Tensor, mask: Tensor | None = None) -> Tensor:
    """The forward of torch_bn layer ``bn`` inside :func:`functional_call`: the same computation as
    its ordinary forward, with the new buffers recorded instead of written.

    A layer called twice in one call (shared weights) updates its statistics twice, the second
    update starting from the first, as it would in place.
    """
    updates: dict[nn.Module, dict[str, Tensor | None]] = _local.updates
    state = {name: getattr(bn, name) for name in _BUFFERS}
    state.update(updates.get(bn, {}))
    factor: float | Tensor = 0.0 if bn.momentum is None else bn.momentum
    new: dict[str, Tensor | None] = {}
    if bn.training and bn.track_running_stats and state["num_batches_tracked"] is not None:
        new["num_batches_tracked"] = state["num_batches_tracked"] + 1
        if bn.momentum is None:  # cumulative moving average: 1/t at the t-th batch (a tensor under vmap)
            factor = 1.0 / new["num_batches_tracked"].double()  # as exact as the float 1/t
    use_batch_stats = bn.training or (state["running_mean"] is None and state["running_var"] is None)
    track = not bn.training or bn.track_running_stats
    # The layer's stateless functional form and keywords (batch_norm_stateless with backward= and
    # mask=, or the ghost / renormalized forms), given the count after this batch's increment.
    function, keywords = bn.functional(mask, new.get("num_batches_tracked", state["num_batches_tracked"]),
                                       stateless=True)
    y, mean, var = function(
        input,
        state["running_mean"] if track else None,
        state["running_var"] if track else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        factor,
        bn.eps,
        **keywords,
    )
    if track and use_batch_stats:
        new["running_mean"], new["running_var"] = mean, var
    updates[bn] = {**updates.get(bn, {}), **new}
    return y


def functional_call(
    module: nn.Module,
    params_and_buffers: Mapping[str, Tensor],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Tensor]]:
    """``torch.func.functional_call`` that returns the module's updated buffers instead of mutating them.

    Args:
        module: any module; its torch_bn ``BatchNorm1d``/``BatchNorm2d`` layers run without side effects.
        params_and_buffers: tensors to use in place of the module's parameters and buffers, by name
            (those not given are the module's own), as for ``torch.func.functional_call``.
        args: positional argument(s) of ``module``'s forward (a tuple, or one tensor).
        kwargs: keyword arguments of the forward.

    Returns:
        ``(output, new_buffers)``: the forward's output, and a dict with the keys of
        ``module.named_buffers()`` holding each buffer after the call: for a torch_bn layer in training
        mode with running statistics, the updated ``running_mean``, ``running_var`` (not differentiable)
        and ``num_batches_tracked``; every other buffer as given (or the module's own). Nothing is
        modified in place, so the call works under ``torch.func.grad``/``grad_and_value`` (return the
        buffers as aux with ``has_aux=True``), ``vjp``, ``jacrev``, ``jacfwd``, ``jvp``, ``hessian`` and
        ``vmap``; vmap over data chunks with unbatched buffers gives batched new buffers, one set per chunk.
        Layers other than torch_bn's (e.g. ``nn.BatchNorm1d``) behave as under ``torch.func.functional_call``.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 3), torch_bn.BatchNorm1d(3))
        >>> params = dict(model.named_parameters()); buffers = dict(model.named_buffers())
        >>> def loss(params, buffers, x):
        ...     out, new_buffers = torch_bn.func.functional_call(model, {**params, **buffers}, (x,))
        ...     return out.square().mean(), new_buffers
        >>> grads, buffers = torch.func.grad(loss, has_aux=True)(params, buffers, torch.randn(8, 4))
    """
    if recording():
        raise RuntimeError("torch_bn.func.functional_call cannot be nested in another functional_call's "
                           "forward on the same thread; call it once around the outer module")
    _local.updates = updates = {}
    try:
        out = torch.func.functional_call(module, dict(params_and_buffers), args, kwargs)
    finally:
        _local.updates = None
    new_buffers: dict[str, Tensor] = {}
    for name, own in module.named_buffers():
        prefix, _, leaf = name.rpartition(".")
        update = updates.get(module.get_submodule(prefix), {})
        new_buffers[name] = update[leaf] if leaf in update else params_and_buffers.get(name, own)
    return out, new_buffers
