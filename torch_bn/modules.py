"""Drop-in modules ``BatchNorm1d/2d/3d``, ``LazyBatchNorm1d/2d/3d`` and ``convert``.

Each class subclasses its ``torch.nn`` namesake, so ``isinstance(m, nn.BatchNorm2d)`` holds and
every tool that finds batch-norm layers that way (``nn.SyncBatchNorm.convert_sync_batchnorm``,
BN-freezing loops, "no weight decay on norm layers" parameter groups, torchvision's init code)
handles them. Inherited from ``torch.nn`` and unchanged: the parameters and buffers, their
initialization (``reset_parameters``, ``reset_running_stats``), ``__constants__``, the state_dict
versioning (an old checkpoint without ``num_batches_tracked`` keeps the module's count), the
per-class input-dimension check and the lazy initialization. torch_bn's own: ``forward`` (the
averaging factor, then one call of :func:`torch_bn.functional.batch_norm`, which updates the
running statistics and runs :class:`~torch_bn.function.BatchNormFunction`, whose bodies are the
compiled CPU op, the fused or Triton kernels or the reference ops), the ``backward=`` argument, and ``extra_repr``.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy

from . import func as _func
from . import ops
from .function import count_batch
from .functional import batch_norm, batch_norm_stateless, batch_renorm, batch_renorm_stateless

_DOC = r"""Batch normalization over a {dims} input; a drop-in for :class:`torch.nn.{name}` (a subclass of it).

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta

    Mean and biased variance are taken per channel over every dimension but dim 1 in training
    (torch_bn's forward and closed-form backward, :class:`~torch_bn.function.BatchNormFunction`);
    the running estimates, kept with the unbiased variance, are used in evaluation mode.
    {lazy}
    Args:
        {num_features}eps: a value added to the variance for numerical stability; must be positive
            in training and non-negative in evaluation. Default: 1e-5
        momentum: weight of each new batch in the running estimates,
            ``running = (1 - momentum) * running + momentum * batch``. ``None`` for a cumulative
            moving average (simple average). Default: 0.1
        affine: learnable per-channel scale :math:`\gamma` (weight, ones) and shift :math:`\beta`
            (bias, zeros). Default: ``True``
        track_running_stats: keep running estimates (buffers ``running_mean``, ``running_var``,
            ``num_batches_tracked``); if ``False`` they are ``None`` and batch statistics are used
            in evaluation mode too. Default: ``True``
        device, dtype: where and in which dtype parameters and buffers are created.
        bias: if ``False`` (with ``affine``), no learnable shift. Default: ``True``
        backward: ``"closed_form"`` (the derived formula, docs/derivation.md) or ``"staged"`` (the
            node-by-node backward, for comparison; same gradients). Default: ``"closed_form"``

    Shape:
        - Input: {shape}
        - Output: same shape as input

    Examples::

        >>> m = torch_bn.{name}({example_args})
        >>> m = torch_bn.{name}({example_args_noaffine})            # without learnable parameters
        >>> m = torch_bn.{name}({example_args_staged})   # node-by-node backward
        >>> isinstance(m, nn.{name})
        True
        >>> output = m(torch.randn({example_input})){after}
    """


def _doc(name: str, dims: str, shape: str, example_input: str, lazy: bool = False) -> str:
    c = "" if lazy else "100"
    sep = "" if lazy else ", "
    return _DOC.format(
        name=name, dims=dims, shape=shape, example_input=example_input,
        after=f"\n        >>> type(m).__name__     # materialized\n        '{name[4:]}'" if lazy else "",
        lazy=("\n    ``num_features`` is inferred from ``input.size(1)`` at the first call, which turns the "
              f"module into a :class:`{name.replace('Lazy', '')}`\n    (as :class:`torch.nn.{name}`).\n"
              if lazy else ""),
        num_features="" if lazy else "num_features: number of channels :math:`C` (dim 1 of the input)\n        ",
        example_args=c, example_args_noaffine=f"{c}{sep}affine=False",
        example_args_staged=f"{c}{sep}backward=\"staged\"")


def _check_backward(backward: str) -> str:
    if backward not in ops.BACKWARDS:
        raise ValueError(f"backward must be one of {ops.BACKWARDS}, got {backward!r}")
    return backward


# A layer's registered tensors are read from its ``_buffers`` / ``_parameters`` tables, or through
# the attributes where one of them is not registered there (e.g. moved by
# ``torch.nn.utils.parametrize``). The same tensors as the attributes, for a fraction of the cost:
# each read through ``nn.Module.__getattr__`` takes ~1.5 us on this project's CPU, and a batch-norm
# layer reads five per call, against ~100 us for the whole layer at the MLP's (50, 100).
def affine_parameters(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """``module.weight``, ``module.bias``."""
    table = module._parameters
    try:
        return table["weight"], table["bias"]
    except KeyError:
        return module.weight, module.bias


def batch_norm_arguments(module: nn.modules.batchnorm._NormBase, *, defer_count: bool = False
                         ) -> tuple[Tensor | None, Tensor | None, bool, float, Tensor | None]:
    """What a batch-norm module's forward passes to the functional call: running_mean and
    running_var (None where they are not used or updated), whether to normalize with batch
    statistics, the averaging factor, and the batch counter for the call to increment. In
    training the batch is counted in num_batches_tracked: here, or, with ``defer_count``, by the
    functional call (:func:`torch_bn.functional.batch_norm`'s ``num_batches_tracked``; the compiled
    forward counts in its own call, one tensor op fewer per layer and step), which gets the
    counter as the last value (None where nothing is to count). Shared by the modules here,
    :class:`torch_bn.SyncBatchNorm` and :mod:`torch_bn.batchnorm_act`."""
    training, momentum = module.training, module.momentum
    table = module._buffers  # (as affine_parameters reads the parameters)
    try:
        running_mean, running_var, count = table["running_mean"], table["running_var"], table["num_batches_tracked"]
    except KeyError:
        running_mean, running_var, count = module.running_mean, module.running_var, module.num_batches_tracked
    # momentum=None means a cumulative moving average: factor 1/t at the t-th batch.
    factor = 0.0 if momentum is None else momentum
    if training and module.track_running_stats:
        if count is not None:
            if momentum is None:
                factor = 1.0 / (float(count) + 1.0)
            if not defer_count:
                count_batch(count)
                count = None
        return running_mean, running_var, True, factor, count
    if training:  # running statistics not tracked: neither used nor updated
        return None, None, True, factor, None
    # Evaluation: the running statistics, or batch statistics where none are kept.
    return running_mean, running_var, running_mean is None and running_var is None, factor, None


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """What torch_bn's batch-norm classes add to ``nn.modules.batchnorm._BatchNorm``: ``backward=``
    and a forward that calls :func:`torch_bn.functional.batch_norm`."""

    backward: str
    # Whether the functional call counts the batch (batch_norm_arguments' defer_count): not where
    # functional() reads the count after this batch's (batch renormalization's warm-up).
    counts_in_call: bool = True
    # Whether functional() is this class's (batch_norm with the layer's backward and the mask):
    # then forward calls batch_norm itself, without building functional()'s keywords, a
    # microsecond of a call at the MLP's sizes. Set for every subclass by __init_subclass__.
    plain_call: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.plain_call = cls.functional is _BatchNorm.functional

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
        _check_backward(backward)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.backward = backward

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backward == "closed_form" else s + f", backward={self.backward!r}"

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize input (N, C, *); mask: bool (N, *), training statistics over its True
        positions only (see :func:`torch_bn.functional.batch_norm`)."""
        if isinstance(input, Proxy):
            # torch.fx symbolic tracing: record this layer as one call of the module, as torch.fx
            # does for torch.nn's own layers (leaf modules), so that the graph runs this forward:
            # input checks, running-statistics update and the train/eval switch included.
            args = (input,) if mask is None else (input, mask)
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), args, {})
        self._check_input_dim(input)
        if _func.recording():  # inside torch_bn.func.functional_call: new buffers returned, none written
            return _func.stateless_forward(self, input, mask)
        running_mean, running_var, use_batch_stats, factor, count = batch_norm_arguments(
            self, defer_count=self.counts_in_call)
        weight, bias = affine_parameters(self)
        if self.plain_call:
            return batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps,
                              backward=self.backward, mask=mask, num_batches_tracked=count)
        function, keywords = self.functional(mask, None, stateless=False)
        if count is not None:
            keywords["num_batches_tracked"] = count
        return function(input, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps, **keywords)

    def functional(self, mask: Tensor | None, num_batches_tracked: Tensor | None, stateless: bool):
        """The functional call this layer's forward makes (in place, or the stateless form inside
        :func:`torch_bn.func.functional_call`) and its keywords beyond ``F.batch_norm``'s.
        num_batches_tracked: the count after this batch's increment (batch renormalization's
        warm-up reads it), or None for the module's own buffer (the in-place forward, which has
        just incremented it)."""
        return (batch_norm_stateless if stateless else batch_norm), {"backward": self.backward, "mask": mask}


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = _doc("BatchNorm1d", "2D or 3D", r":math:`(N, C)` or :math:`(N, C, L)`", "20, 100")


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = _doc("BatchNorm2d", "4D", r":math:`(N, C, H, W)`", "20, 100, 35, 45")


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = _doc("BatchNorm3d", "5D", r":math:`(N, C, D, H, W)`", "4, 100, 8, 8, 8")


class _LazyBatchNorm(_BatchNorm):
    """The lazy classes' constructor: nn's lazy one (no ``num_features``), plus ``backward=``."""

    def __init__(
        self,
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
        _check_backward(backward)
        # Past _BatchNorm.__init__ (it takes num_features) to nn's _LazyNormBase.__init__.
        super(_BatchNorm, self).__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.backward = backward


class LazyBatchNorm1d(_LazyBatchNorm, nn.LazyBatchNorm1d):
    __doc__ = _doc("LazyBatchNorm1d", "2D or 3D", r":math:`(N, C)` or :math:`(N, C, L)`", "20, 100", lazy=True)
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, nn.LazyBatchNorm2d):
    __doc__ = _doc("LazyBatchNorm2d", "4D", r":math:`(N, C, H, W)`", "20, 100, 35, 45", lazy=True)
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, nn.LazyBatchNorm3d):
    __doc__ = _doc("LazyBatchNorm3d", "5D", r":math:`(N, C, D, H, W)`", "4, 100, 8, 8, 8", lazy=True)
    cls_to_become = BatchNorm3d


_GHOST_DOC = r"""Ghost batch norm (Hoffer et al., 2017) over a {dims} input; a subclass of :class:`torch.nn.{base}`.

    In training the batch is split into consecutive chunks of ``virtual_batch_size`` samples along
    dim 0 (the last may be smaller; a chunk of one sample is an error) and each chunk is normalized
    with its own mean and biased variance (:class:`torch_bn.ghost.GhostBatchNormFunction`, one call
    over a reshaped view, never a loop over chunks). The running statistics move once per call,
    towards the mean over chunks of the chunk means and of the chunk unbiased variances (Keras 2's
    rule). Evaluation: plain batch norm with the running statistics (with
    ``track_running_stats=False``: the chunked batch statistics, as in training). With
    ``virtual_batch_size >= N`` it is batch norm.

    Args:
        num_features: number of channels :math:`C` (dim 1 of the input)
        virtual_batch_size: samples per ghost batch (chunk), at least 2
        eps, momentum, affine, track_running_stats, device, dtype, bias: as :class:`torch.nn.{base}`

    Shape:
        - Input: {shape}; ``forward(input)`` (masks are not supported with ghost batches)
        - Output: same shape as input

    Examples::

        >>> m = torch_bn.{name}(64, virtual_batch_size=32)
        >>> output = m(torch.randn({example_input}))   # 8 ghost batches of 32
    """

_RENORM_DOC = r"""Batch renormalization (Ioffe, 2017) over a {dims} input; a subclass of :class:`torch.nn.{base}`.

    In training, with the batch mean :math:`\mu_B` and biased variance, :math:`\sigma_B =
    \sqrt{{\mathrm{{Var}}_B + \epsilon}}` and :math:`\sigma = \sqrt{{\mathrm{{running\_var}}
    + \epsilon}}` (before this batch's update):

    .. math::

        y = \gamma \left(\frac{{x - \mu_B}}{{\sigma_B}} r + d\right) + \beta,\quad
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\left(\frac{{\sigma_B}}{{\sigma}}\right),\quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\left(\frac{{\mu_B - \mathrm{{running\_mean}}}}{{\sigma}}\right)

    with r and d constants for the gradient (:class:`torch_bn.renorm.BatchRenormFunction`); the
    running statistics move as nn's. While ``num_batches_tracked <= warmup_steps`` (counted after
    this batch's increment) it is plain batch norm. Evaluation: plain batch norm with the running
    statistics; with ``track_running_stats=False`` it is plain batch norm throughout.

    Args:
        num_features: number of channels :math:`C` (dim 1 of the input)
        eps, momentum, affine, track_running_stats, device, dtype, bias: as :class:`torch.nn.{base}`
        rmax: bound of r, at least 1. Default: 3.0
        dmax: bound of d, at least 0. Default: 5.0
        warmup_steps: training batches of plain batch norm before the corrections start. Default: 0

    Shape:
        - Input: {shape}; ``forward(input)`` (masks are not supported with renormalization)
        - Output: same shape as input

    Examples::

        >>> m = torch_bn.{name}(64, rmax=3.0, dmax=5.0, warmup_steps=1000)
        >>> output = m(torch.randn({example_input}))
    """


class _GhostBatchNorm(_BatchNorm):
    """Ghost batch norm's constructor (``virtual_batch_size``) and functional keyword."""

    virtual_batch_size: int

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be an int >= 2 (samples per ghost batch; a chunk of "
                             f"one sample has no variance), got {virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def functional(self, mask: Tensor | None, num_batches_tracked: Tensor | None, stateless: bool):
        if mask is not None:
            raise ValueError(f"{type(self).__name__} does not take a mask: ghost batch norm with masked "
                             f"statistics is not implemented")
        return ((batch_norm_stateless if stateless else batch_norm),
                {"virtual_batch_size": self.virtual_batch_size})


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    __doc__ = _GHOST_DOC.format(name="GhostBatchNorm1d", base="BatchNorm1d", dims="2D or 3D",
                                shape=r":math:`(N, C)` or :math:`(N, C, L)`", example_input="256, 64")


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    __doc__ = _GHOST_DOC.format(name="GhostBatchNorm2d", base="BatchNorm2d", dims="4D",
                                shape=r":math:`(N, C, H, W)`", example_input="256, 64, 8, 8")


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    __doc__ = _GHOST_DOC.format(name="GhostBatchNorm3d", base="BatchNorm3d", dims="5D",
                                shape=r":math:`(N, C, D, H, W)`", example_input="256, 64, 4, 4, 4")


class _BatchRenorm(_BatchNorm):
    """Batch renormalization's constructor (``rmax``, ``dmax``, ``warmup_steps``) and functional call."""

    rmax: float
    dmax: float
    warmup_steps: int
    counts_in_call = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, rmax: float = 3.0,
                 dmax: float = 5.0, warmup_steps: int = 0, bias: bool = True) -> None:
        if not rmax >= 1.0 or not dmax >= 0.0:
            raise ValueError(f"batch renormalization needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), warmup_steps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"

    def functional(self, mask: Tensor | None, num_batches_tracked: Tensor | None, stateless: bool):
        if mask is not None:
            raise ValueError(f"{type(self).__name__} does not take a mask: batch renormalization with "
                             f"masked statistics is not implemented")
        if num_batches_tracked is None:
            num_batches_tracked = self.num_batches_tracked
        if (self.training and self.warmup_steps and num_batches_tracked is not None
                and int(num_batches_tracked) <= self.warmup_steps):
            return (batch_norm_stateless if stateless else batch_norm), {}  # warm-up: r = 1, d = 0
        return (batch_renorm_stateless if stateless else batch_renorm), {"rmax": self.rmax, "dmax": self.dmax}


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    __doc__ = _RENORM_DOC.format(name="BatchRenorm1d", base="BatchNorm1d", dims="2D or 3D",
                                 shape=r":math:`(N, C)` or :math:`(N, C, L)`", example_input="32, 64")


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    __doc__ = _RENORM_DOC.format(name="BatchRenorm2d", base="BatchNorm2d", dims="4D",
                                 shape=r":math:`(N, C, H, W)`", example_input="8, 64, 16, 16")


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    __doc__ = _RENORM_DOC.format(name="BatchRenorm3d", base="BatchNorm3d", dims="5D",
                                 shape=r":math:`(N, C, D, H, W)`", example_input="4, 64, 4, 8, 8")


# Exact types: subclasses of nn's classes (SyncBatchNorm, user classes) are left alone.
_TO_TORCH_BN: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
_TO_TORCH: dict[type, type] = {ours: theirs for theirs, ours in _TO_TORCH_BN.items()}
# Ghost and renormalized layers go to nn's batch norm too: the same function in evaluation mode
# (what export and fusion tools see); training would then be plain batch norm.
_TO_TORCH.update({GhostBatchNorm1d: nn.BatchNorm1d, GhostBatchNorm2d: nn.BatchNorm2d,
                  GhostBatchNorm3d: nn.BatchNorm3d, BatchRenorm1d: nn.BatchNorm1d,
                  BatchRenorm2d: nn.BatchNorm2d, BatchRenorm3d: nn.BatchNorm3d})


def _replace(module: nn.Module, new_cls: type, **kwargs) -> nn.Module:
    """A new_cls module holding module's own parameters and buffers, in module's training mode."""
    if issubclass(new_cls, nn.modules.lazy.LazyModuleMixin):
        out = new_cls(module.eps, module.momentum, module.affine, module.track_running_stats,
                      bias=module.bias is not None, **kwargs)
    else:  # placeholders on the meta device, replaced by the originals' tensors below
        out = new_cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, bias=module.bias is not None, device="meta", **kwargs)
    for name, p in module.named_parameters(recurse=False):
        setattr(out, name, p)
    for name, b in module.named_buffers(recurse=False):
        setattr(out, name, b)
    out.train(module.training)
    return out


def convert(module: nn.Module, backward: str = "closed_form", *, to: str = "torch_bn") -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.LazyBatchNorm1d/2d/3d`` in ``module`` by
    torch_bn's (``to="torch_bn"``), or every torch_bn layer by its ``torch.nn`` class
    (``to="torch"``: for tools that know nn's classes by exact type, e.g. quantization's
    ``fuse_modules``, TorchScript, ONNX export).

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: parameters and buffers are shared with the
    originals (so an optimizer built before still holds them), training mode is kept, and the
    converted module is returned (``module`` itself unless it is a BN layer). ``backward`` is the
    torch_bn layers' backward (ignored with ``to="torch"``).

    ``BatchRenorm*`` and ``GhostBatchNorm*`` are left as they are by ``to="torch_bn"`` (they already
    are torch_bn's, and nn's layers would not say which rmax or virtual_batch_size to use); with
    ``to="torch"`` they become ``nn.BatchNorm*`` holding the same tensors: the same function in
    evaluation mode (what export and fusion tools need), plain batch norm if trained further.

    Example::

        >>> model = torch_bn.convert(torchvision.models.resnet18())
        >>> plain = torch_bn.convert(model, to="torch")   # nn.BatchNorm2d again, same tensors
    """
    if to not in ("torch_bn", "torch"):
        raise ValueError(f"to must be 'torch_bn' or 'torch', got {to!r}")
    _check_backward(backward)
    table = _TO_TORCH_BN if to == "torch_bn" else _TO_TORCH
    new_cls = table.get(type(module))
    out = module
    if new_cls is not None:
        out = _replace(module, new_cls, **({"backward": backward} if to == "torch_bn" else {}))
    for name, child in module.named_children():
        out.add_module(name, convert(child, backward, to=to))
    return out
