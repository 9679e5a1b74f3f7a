"""``fold``: batch-norm layers folded into the Linear or convolution before them, for inference.

In evaluation mode batch norm is a per-channel affine map, y = (z - mean) * s + bias with
s = weight / sqrt(var + eps); when z is the output of a Linear or convolution (W, b) and feeds
nothing else, the pair is one layer with weight W * s (per output channel) and bias
(b - mean) * s + bias. torch's own fusers find pairs by exact type (torch.fx's ``fuse``,
quantization's ``fuse_modules``) and so skip torch_bn's layers and any other subclass; fold
matches by ``isinstance`` and computes the folded weights with torch's
``torch.nn.utils.fusion.fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .batchnorm_act import _BatchNormAct
from .frozen import FrozenBatchNorm

__all__ = ["fold"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_batch_norm(m: nn.Module) -> bool:
    """nn's and torch_bn's batch norm (SyncBatchNorm and frozen layers included) whose evaluation
    mode is an affine map of running statistics."""
    if isinstance(m, FrozenBatchNorm):
        return True
    return (isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, _BatchNormAct))
            and m.running_mean is not None and m.running_var is not None)


def _replacement(bn: nn.Module) -> nn.Module:
    """What is left of a folded batch-norm layer: nothing, or BatchNormAct's activation."""
    if isinstance(bn, _BatchNormAct):
        return {"leaky_relu": lambda: nn.LeakyReLU(bn.negative_slope), "elu": lambda: nn.ELU(bn.alpha),
                "identity": nn.Identity}[bn.activation]()
    return nn.Identity()


def _foldable(producer: nn.Module, bn: nn.Module) -> bool:
    if not (isinstance(producer, _PRODUCERS) and _is_batch_norm(bn)):
        return False
    out = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    return bn.num_features == out


def _fold_pair(producer: nn.Module, bn: nn.Module) -> None:
    """Write the folded weight and bias into producer (the batch norm's effect, in evaluation)."""
    w = bn.weight.detach() if bn.weight is not None else None
    b = bn.bias.detach() if bn.bias is not None else None
    if w is not None and b is None:  # affine without a shift (bias=False)
        b = torch.zeros_like(w)
    fuse = fuse_linear_bn_weights if isinstance(producer, nn.Linear) else fuse_conv_bn_weights
    with torch.no_grad():
        if isinstance(producer, nn.Linear) and w is None:
            w, b = torch.ones_like(bn.running_mean), torch.zeros_like(bn.running_mean)
        weight, bias = fuse(producer.weight.detach(), None if producer.bias is None else producer.bias.detach(),
                            bn.running_mean, bn.running_var, bn.eps, w, b)
    producer.weight = nn.Parameter(weight.detach(), producer.weight.requires_grad)
    producer.bias = nn.Parameter(bias.detach().to(producer.weight.dtype), producer.weight.requires_grad)


def _uses(model: nn.Module) -> Counter:
    """How many places of the module tree hold each module (a shared layer is held twice)."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _fold_sequential(model: nn.Module, held: Counter) -> int:
    """Fold each (Linear/Conv, batch norm) pair of consecutive children of every nn.Sequential."""
    folded = 0
    # Subclasses with their own forward may route outputs elsewhere: only Sequential's forward counts.
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            producer, bn = seq._modules[a], seq._modules[b]
            if (_foldable(producer, bn)
                    and held[id(producer)] == 1 and held[id(bn)] == 1):
                _fold_pair(producer, bn)
                seq._modules[b] = _replacement(bn)
                folded += 1
    return folded


class _Tracer(torch.fx.Tracer):
    """Records Linear, convolutions and every batch-norm layer as single calls (leaves)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _PRODUCERS) or _is_batch_norm(m) or super().is_leaf_module(m, qualname)


def _fold_traced(model: nn.Module, held: Counter) -> int:
    """Fold the pairs a torch.fx trace of model shows: a batch norm called on the output of a
    Linear/Conv call that nothing else uses, each module called once in the whole graph."""
    graph = _Tracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        producer, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if (_foldable(producer, bn) and calls[src.target] == 1 and calls[node.target] == 1
                and held[id(producer)] == 1 and held[id(bn)] == 1):
            _fold_pair(producer, bn)
            _set(model, node.target, _replacement(bn))
            folded += 1
    return folded


def fold(module: nn.Module) -> nn.Module:
    """An evaluation-mode copy of ``module`` with batch norm folded into the layers before it.

    Every ``nn.Linear`` or ``nn.Conv1d/2d/3d`` whose output feeds only a batch-norm layer gets
    that layer folded into its weight and bias, and the batch-norm layer becomes ``nn.Identity``
    (a bias is added to a layer built without one); a :class:`torch_bn.BatchNormAct2d` (1d, 3d)
    becomes its activation (``nn.LeakyReLU``, ``nn.ELU`` or ``nn.Identity``). Batch-norm layers:
    nn's, their subclasses (torch_bn's), SyncBatchNorm, torch_bn's frozen and BatchNormAct
    layers, matched by ``isinstance``, each with running statistics (a layer without them
    normalizes with batch statistics even in evaluation, and is left alone).

    Pairs are found in two ways: consecutive children of every ``nn.Sequential``, and a
    torch.fx trace of the whole model (any traceable model, e.g. torchvision's resnet18 after
    :func:`torch_bn.convert`), where the batch norm's only argument is the Linear/Conv call's
    output and that output has no other user. A module held in two places or called twice is
    not folded. Where the model cannot be traced, only the Sequential pairs are folded (one
    warning says why). ``module`` itself is not changed; the copy's outputs equal the original's
    in evaluation mode within rounding (folded weights are computed in the weights' dtype).
    Folded copies are for inference: their batch-norm layers are gone, so training the copy
    trains a different model.

    Example::

        >>> model = torch_bn.convert(torchvision.models.resnet18()).eval()
        >>> fast = torch_bn.fold(model)   # no batch-norm layer left; same outputs
    """
    out = copy.deepcopy(module).eval()
    held = _uses(out)
    _fold_sequential(out, held)
    try:
        _fold_traced(out, held)
    except Exception as e:  # torch.fx raises many types for untraceable code
        warnings.warn(f"fold: torch.fx cannot trace {type(module).__name__} ({type(e).__name__}: {e}); "
                      f"only batch-norm layers directly after a Linear/Conv in an nn.Sequential were "
                      f"folded", RuntimeWarning, stacklevel=2)
    return out
