"""Eager twins of torch_bn's variant autograd Functions: the same node, applied without per-call overhead.

PyTorch applies a Function written in the ``forward`` + ``setup_context`` style (the style
torch.func transforms need: vmap, grad, jvp, ...) by binding its forward's signature with
``inspect`` on every call; measured on the 2-core CPU under load, that costs about 300 us a call
against about 5-30 us for a Function in the older style, whose forward takes ``ctx`` (a
(256, 128) layer's arithmetic costs less than that). :func:`eager_twin` builds the older-style
Function that runs the very same ``forward``, ``setup_context``, ``backward`` and ``jvp``, with
the same name, and :func:`apply` calls it outside torch.func transforms and the original inside.
Gradients, double backward and forward-mode AD are therefore the same in both.
"""
from __future__ import annotations

import torch


def eager_twin(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """An older-style Function (``forward(ctx, *args)``) running ``function``'s methods."""

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    attributes = {"forward": staticmethod(forward), "backward": staticmethod(function.backward),
                  "jvp": staticmethod(function.jvp), "__doc__": function.__doc__,
                  "__module__": function.__module__, "__qualname__": function.__qualname__}
    return type(function.__name__, (torch.autograd.Function,), attributes)


def apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``: through its eager twin (``function.eager``) outside torch.func
    transforms, where both compute the same."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return function.eager.apply(*args)
