"""Drop-in modules ``BatchNorm1d`` / ``BatchNorm2d`` and ``convert``.

Same arguments, parameters, buffers, state_dict keys and behaviour as ``torch.nn``'s, so a
checkpoint of either loads into the other. As in ``torch/nn/modules/batchnorm.py`` a small
base class holds the state; ``forward`` picks the averaging factor and makes one
functional call; subclasses only check the input's dimensions.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import func as _func
from . import ops
from .functional import batch_norm


class _BatchNorm(nn.Module):
    _version = 2  # version 2 added num_batches_tracked, as in PyTorch
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backward: str = "closed_form",
    ) -> None:
        super().__init__()
        if backward not in ops.BACKWARDS:
            raise ValueError(f"backward must be one of {ops.BACKWARDS}, got {backward!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backward = backward
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        return s if self.backward == "closed_form" else s + f", backward={self.backward!r}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Checkpoints from before version 2 have no num_batches_tracked: start it at 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if _func.recording():  # inside torch_bn.func.functional_call: new buffers returned, none written
            return _func.stateless_forward(self, input)
        # momentum=None means a cumulative moving average: factor 1/t at the t-th batch.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval too when no running statistics are kept.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            backward=self.backward,
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; a drop-in for ``nn.BatchNorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input; a drop-in for ``nn.BatchNorm2d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}


def convert(module: nn.Module, backward: str = "closed_form") -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``module`` by torch_bn's.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: parameters and buffers are shared
    with the originals (so an optimizer built before still holds them), training mode is
    kept, and the converted module is returned (``module`` itself unless it is a BN layer).
    """
    new_cls = _REPLACEMENTS.get(type(module))
    out = module
    if new_cls is not None:
        out = new_cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, bias=module.bias is not None, backward=backward,
                      device="meta")  # placeholders, replaced by the originals' tensors below
        for name, p in module.named_parameters(recurse=False):
            setattr(out, name, p)
        for name, b in module.named_buffers(recurse=False):
            setattr(out, name, b)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert(child, backward))
    return out
