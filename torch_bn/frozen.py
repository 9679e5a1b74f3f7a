"""Frozen batch norm: ``FrozenBatchNorm1d/2d/3d``, ``freeze`` and ``unfreeze``.

A frozen layer is batch norm in evaluation mode whatever the module's mode: a fixed per-channel
affine map built from four buffers (weight, bias, running_mean, running_var), no parameters, no
statistics update. It is what fine-tuning and detection backbones use when batches are too small
for batch statistics (torchvision.ops.FrozenBatchNorm2d, timm's freeze_batch_norm_2d). The
buffers and state_dict keys are torchvision's, so its checkpoints load, and a checkpoint of a
plain batch-norm layer loads too (its num_batches_tracked is dropped, as torchvision does).
Gradients flow to the input (the map is differentiable), never to the frozen values.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync_batchnorm import SyncBatchNorm

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]


class FrozenBatchNorm(nn.Module):
    r"""Batch norm with fixed statistics and affine values, for an (N, C, *) input of any rank.

    .. math::

        y = \frac{x - \text{running\_mean}}{\sqrt{\text{running\_var} + \epsilon}} * \text{weight} + \text{bias}

    in training and evaluation mode alike. :func:`freeze` builds this class from a
    :class:`torch_bn.SyncBatchNorm` (which accepts any rank); the 1d/2d/3d subclasses check the
    input's rank as their batch-norm namesakes do.

    Args:
        num_features: number of channels :math:`C` (dim 1 of the input).
        eps: added to running_var before the square root. Default: 1e-5
        device, dtype: where and in which dtype the buffers are created.
        momentum: not used by this layer; kept for :func:`unfreeze`, which gives it to the
            trainable layer it builds (not saved in the state_dict). Default: 0.1

    Buffers (the state_dict, torchvision's keys): ``weight`` (ones), ``bias`` (zeros),
    ``running_mean`` (zeros), ``running_var`` (ones), all (C,).

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: same shape as input

    Examples::

        >>> m = torch_bn.FrozenBatchNorm2d(64)
        >>> m.load_state_dict(torchvision.ops.FrozenBatchNorm2d(64).state_dict())
        >>> y = m(torch.randn(8, 64, 32, 32))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 momentum: float | None = 0.1) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}; use e.g. 1e-5")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A batch-norm layer's checkpoint has a step counter this layer does not keep.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx: one call of this module (a leaf, as nn's layers)
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got input with {input.shape[1]} "
                             f"channels (dim 1) in shape {tuple(input.shape)}")
        dtype = ops.compute_dtype(input)
        # x - mean first, then one per-channel scale: accurate for far-from-zero features.
        return ops.normalize(input, self.running_mean.to(dtype), torch.rsqrt(self.running_var.to(dtype) + self.eps),
                             self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _doc(shape: str) -> str:
    """The base class's docstring for a layer that takes only ``shape`` inputs."""
    doc = FrozenBatchNorm.__doc__.replace("for an (N, C, *) input of any rank", f"for an {shape} input", 1)
    return doc.replace(":math:`(N, C, *)`", f"``{shape}``")


class FrozenBatchNorm1d(FrozenBatchNorm):
    __doc__ = _doc("(N, C) or (N, C, L)")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class FrozenBatchNorm2d(FrozenBatchNorm):
    __doc__ = _doc("(N, C, H, W)")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class FrozenBatchNorm3d(FrozenBatchNorm):
    __doc__ = _doc("(N, C, D, H, W)")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


def _frozen_class(module: nn.Module) -> type | None:
    """The frozen class for a batch-norm layer (nn's, torch_bn's, SyncBatchNorm), or None."""
    if isinstance(module, nn.SyncBatchNorm):
        return FrozenBatchNorm
    for classes, frozen in (((nn.BatchNorm1d, nn.LazyBatchNorm1d), FrozenBatchNorm1d),
                            ((nn.BatchNorm2d, nn.LazyBatchNorm2d), FrozenBatchNorm2d),
                            ((nn.BatchNorm3d, nn.LazyBatchNorm3d), FrozenBatchNorm3d)):
        if isinstance(module, classes):
            return frozen
    return None


def freeze(module: nn.Module) -> nn.Module:
    """Replace every batch-norm layer in ``module`` by a frozen one with its statistics and affine values.

    Matches ``nn.BatchNorm1d/2d/3d``, their subclasses (torch_bn's layers) and
    ``nn.SyncBatchNorm`` (torch_bn's too), and the lazy classes once initialized, by ``isinstance``; each becomes a
    :class:`FrozenBatchNorm1d/2d/3d` (a SyncBatchNorm, whose input rank is unknown, a
    :class:`FrozenBatchNorm`). The frozen buffers are copies of the layer's running statistics,
    weight and bias (ones and zeros without ``affine``), so nothing an optimizer still holds can
    change them; eps and momentum are kept, num_batches_tracked is dropped (as torchvision's
    frozen layer has none). Training mode is kept. Like :func:`torch_bn.convert`, the module is
    changed in place and returned (the new layer itself when ``module`` is a batch-norm layer).
    A layer without running statistics (``track_running_stats=False``) has nothing to freeze:
    ValueError. Layers other than these (torch_bn.BatchNormAct*, lazy layers not yet
    initialized) are left alone or refused with a ValueError saying why.

    Example::

        >>> backbone = torch_bn.freeze(torchvision.models.resnet50())
    """
    frozen_cls = _frozen_class(module)
    if frozen_cls is not None:
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"{type(module).__name__} has not inferred num_features yet; run one forward "
                             f"pass before freeze")
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"{type(module).__name__}({module.num_features}) has no running statistics "
                             f"(track_running_stats=False), so there is nothing to freeze; build it with "
                             f"track_running_stats=True and train or recalibrate it first")
        ref = module.running_mean
        out = frozen_cls(module.num_features, module.eps, device=ref.device, dtype=ref.dtype,
                         momentum=module.momentum)
        with torch.no_grad():
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            if module.weight is not None:
                out.weight.copy_(module.weight)
            if module.bias is not None:
                out.bias.copy_(module.bias)
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, freeze(child))
    return module


_UNFROZEN = {FrozenBatchNorm1d: BatchNorm1d, FrozenBatchNorm2d: BatchNorm2d, FrozenBatchNorm3d: BatchNorm3d}


def unfreeze(module: nn.Module) -> nn.Module:
    """Turn every frozen layer in ``module`` back into torch_bn's trainable batch norm.

    :class:`FrozenBatchNorm1d/2d/3d` become :class:`torch_bn.BatchNorm1d/2d/3d`, a
    :class:`FrozenBatchNorm` becomes :class:`torch_bn.SyncBatchNorm`; weight and bias become
    parameters (copies of the buffers), the running statistics are copied, eps and the momentum
    kept by :func:`freeze` are used, ``affine`` and ``track_running_stats`` are True and
    num_batches_tracked starts at 0 (the frozen layer keeps no count). Training mode is kept.
    The module is changed in place and returned, as :func:`freeze`. So ``unfreeze(freeze(m))``
    gives the outputs of ``m`` in both modes (for an ``affine=False`` layer too: weight ones,
    bias zeros). torchvision's own FrozenBatchNorm2d is not matched (this library does not import
    torchvision): load its state_dict into a :class:`FrozenBatchNorm2d` first.
    """
    if isinstance(module, FrozenBatchNorm):
        cls = next((bn for frozen, bn in _UNFROZEN.items() if isinstance(module, frozen)), SyncBatchNorm)
        ref = module.running_mean
        out = cls(module.num_features, module.eps, module.momentum, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(out, name).copy_(getattr(module, name))
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, unfreeze(child))
    return module
