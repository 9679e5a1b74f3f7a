"""Memory-saving batch norm + activation: ``BatchNormAct1d/2d/3d`` and ``BatchNormActFunction``.

In-Place Activated BatchNorm (Rota Bulo, Porzi and Kontschieder, CVPR 2018): batch norm followed
by an invertible activation, as one autograd Function that keeps for backward only its output y
and per-channel vectors, where batch norm + activation as two layers keep two input-sized
tensors (batch norm its input, the activation its own input). The backward recovers what it
needs from y: the activation's derivative from y directly, the normalized input by inverting the
activation and the affine map,

    z = act^{-1}(y),    xhat = (z - bias) / weight,

and then applies the closed-form gradient of :func:`torch_bn.ops.closed_form_backward` with the
activation's gradient as upstream gradient (docs/derivation.md, "Batch norm + activation").

Where the inversion loses accuracy (|weight| near 0, ELU far into its flat tail, half-precision
output) the Function keeps those channels' inputs as well, so the gradient stays exact: see
:data:`AMPLIFICATION_LIMIT`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import ops
from .function import needed_gradients
from .functional import check_input
from .modules import batch_norm_arguments

__all__ = ["ACTIVATIONS", "AMPLIFICATION_LIMIT", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchNormActFunction", "batch_norm_act"]

ACTIVATIONS = ("identity", "leaky_relu", "elu")

# A channel's normalized input is recovered from y with an absolute error of about
#   A * u,  A = (max |z| + |bias| + [ELU] exp(-min z)) / |weight|,
# u the rounding unit of y's dtype: the rounding of y (u |z|, or u exp(-z) through ELU's inverse
# log1p(y / alpha) in its flat tail) and of z - bias (u |bias|), divided by |weight|. Channels with
# A above this limit (weight 0 included) keep their input for backward instead; at the limit the
# recovered value is off by at most ~256 units of the last place (float32: 1.5e-5 absolute).
AMPLIFICATION_LIMIT = 256.0
# float16/bfloat16 outputs carry 11 or 8 bits: too coarse to invert, so they keep the input.
_INVERTIBLE_DTYPES = (torch.float32, torch.float64)


def _check_activation(activation: str, param: float) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "leaky_relu" and not param > 0:
        raise ValueError(f"leaky_relu's negative_slope must be > 0 for the activation to be invertible "
                         f"(the backward recovers its input from its output), got {param}; "
                         f"for ReLU use nn.BatchNorm + nn.ReLU")
    if activation == "elu" and not param > 0:
        raise ValueError(f"elu's alpha must be > 0 (ELU is invertible on its range (-alpha, inf) only "
                         f"then), got {param}")


def _activate(z: Tensor, activation: str, param: float, inplace: bool = False) -> Tensor:
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, param, inplace=inplace)
    if activation == "elu":
        return torch.nn.functional.elu(z, param, inplace=inplace)
    return z


def _unsafe_channels(z: Tensor, weight: Tensor | None, bias: Tensor | None, activation: str,
                     param: float) -> Tensor:
    """(C,) bool: channels whose normalized input cannot be recovered from y accurately."""
    if z.dtype not in _INVERTIBLE_DTYPES:
        return torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    dims = ops.reduce_dims(z)
    zmin, zmax = z.amin(dims), z.amax(dims)
    amp = torch.maximum(zmin.abs(), zmax.abs())
    if bias is not None:
        amp = amp + bias.detach().abs().to(z.dtype)
    if activation == "elu":
        amp = amp + torch.where(zmin < 0, torch.exp(-zmin), torch.zeros_like(zmin))
    if weight is not None:
        amp = amp / weight.detach().abs().to(z.dtype)  # weight 0: inf (or nan), unsafe
    return ~(amp <= AMPLIFICATION_LIMIT)


class BatchNormActFunction(torch.autograd.Function):
    """y, mean, var = BatchNormActFunction.apply(x, weight, bias, eps, activation, param)

    Training-mode batch norm followed by an invertible activation, in one node.
    Inputs: x (N, C, *) floating point; weight, bias (C,) or None; eps (float); activation one
    of :data:`ACTIVATIONS`; param: leaky_relu's negative_slope (> 0) or elu's alpha (> 0).
    Outputs: y = act(weight * (x - mean) / sqrt(var + eps) + bias), like x; the batch mean and
    biased variance (C,) in compute dtype, not differentiable (for the running statistics).

    Saved for backward: y itself (the output, no copy), weight, bias, mean, rstd (C,), and the
    indices of the channels whose inversion would be inaccurate (see :data:`AMPLIFICATION_LIMIT`)
    with those channels of x (x itself where every channel is such, as for half precision): none
    in the usual case, so nothing input-sized but y. mean is needed only for those channels.
    Once differentiable (a second backward raises); no forward-mode derivative.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, activation: str,
                param: float) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = ops.batch_stats(x)
        rstd = torch.rsqrt(var + eps)
        z = ops.normalize(x, mean, rstd, weight, bias)
        if any(ctx.needs_input_grad[:3]):
            idx = _unsafe_channels(z, weight, bias, activation, param).nonzero().flatten()
        else:  # no backward will run: nothing to keep
            idx = torch.zeros(0, dtype=torch.long, device=x.device)
        y = _activate(z, activation, param, inplace=True)  # z is this call's own temporary
        kept = None
        if idx.numel() == x.shape[1]:
            kept = x.detach()
        elif idx.numel():
            kept = x.detach().index_select(1, idx)
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(y, weight, bias, mean, rstd, idx, kept)
        ctx.activation, ctx.param = activation, param
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, _dmean, _dvar):
        y, weight, bias, mean, rstd, idx, kept = ctx.saved_tensors
        if dy is None:
            return None, None, None, None, None, None
        dtype = rstd.dtype
        yc, dyc = y.to(dtype), dy.to(dtype)
        s = ctx.param
        # The activation's derivative from y, and its inverse z = act^{-1}(y).
        if ctx.activation == "leaky_relu":
            pos = yc > 0
            dz = torch.where(pos, dyc, dyc * s)
            z = torch.where(pos, yc, yc / s)
        elif ctx.activation == "elu":
            pos = yc > 0
            dz = torch.where(pos, dyc, dyc * (yc + s))         # alpha * exp(z) = y + alpha
            z = torch.where(pos, yc, torch.log1p((yc / s).clamp(min=-1.0)))
        else:
            dz, z = dyc, yc
        c = y.shape[1]
        if idx.numel() == c:  # every channel kept its input
            xhat = (kept.to(dtype) - ops.as_channel(mean, kept)) * ops.as_channel(rstd, kept)
        else:
            # The affine map inverted: xhat = (z - bias) / weight, per channel.
            if bias is not None:
                z = z - ops.as_channel(bias.to(dtype), z)
            if weight is not None:
                w = weight.detach().to(dtype)
                if idx.numel():  # those channels are overwritten below; no division by ~0 there
                    w = w.index_fill(0, idx, 1.0)
                z = z / ops.as_channel(w, z)
            xhat = z
            if idx.numel():
                # out of place: with no affine map xhat may be y itself
                xhat = xhat.index_copy(1, idx, (kept.to(dtype) - ops.as_channel(mean[idx], kept))
                                 * ops.as_channel(rstd[idx], kept))
        dx, dweight, dbias = ops.closed_form_backward(dz, xhat, rstd, weight)
        return (*needed_gradients(ctx, dx.to(dy.dtype), dweight, dbias, weight), None, None, None)


def batch_norm_act(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "leaky_relu",
                   param: float = 0.01) -> Tensor:
    """act(batch_norm(input, ...)), with :func:`torch_bn.functional.batch_norm`'s arguments and
    running-statistics update; in training one :class:`BatchNormActFunction` node (memory-saving
    backward), in evaluation tensor ops differentiated by autograd. param: leaky_relu's
    negative_slope or elu's alpha."""
    _check_activation(activation, param)
    check_input(input, training, eps, running_mean, running_var, weight, bias)
    dtype = ops.compute_dtype(input)
    if not training:
        z = ops.normalize(input, running_mean.detach().to(dtype), torch.rsqrt(running_var.detach().to(dtype) + eps),
                          weight, bias)
        return _activate(z, activation, param)
    if input.numel() == 0:  # empty batch: empty output, statistics unchanged (as batch_norm)
        ones = torch.ones(input.shape[1], dtype=dtype, device=input.device)
        return _activate(ops.normalize(input, ones * 0, ones, weight, bias), activation, param)
    y, mean, var = BatchNormActFunction.apply(input, weight, bias, eps, activation, param)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            m = input.numel() // input.shape[1]
            running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
    return y


_DOC = r"""Batch normalization followed by an invertible activation, saving memory in training ({dims} input).

    Computes ``act(BatchNorm(x))`` with the arguments, buffers, state_dict, running statistics and
    train/eval behaviour of :class:`torch.nn.{bn}` followed by the activation (``nn.LeakyReLU``,
    ``nn.ELU`` or none), but in training as one autograd node,
    :class:`~torch_bn.batchnorm_act.BatchNormActFunction`, that keeps only its output (and
    per-channel vectors) for backward: about half the memory of the two layers.
    Not a subclass of ``nn.{bn}``, so tools that replace batch-norm layers by ``isinstance``
    (``convert_sync_batchnorm``, :func:`torch_bn.freeze`) leave it, and its activation, alone;
    :func:`torch_bn.recalibrate` recalibrates it, and :func:`torch_bn.fold` folds its batch norm
    into the layer before it, leaving the activation.

    Args:
        num_features: number of channels :math:`C` (dim 1 of the input)
        eps, momentum, affine, track_running_stats, device, dtype, bias: as :class:`torch.nn.{bn}`
        activation: ``"leaky_relu"``, ``"elu"`` or ``"identity"``. Default: ``"leaky_relu"``
        negative_slope: leaky_relu's slope for negative inputs; must be > 0 (invertible). Default: 0.01
        alpha: elu's alpha; must be > 0. Default: 1.0

    Shape:
        - Input: {shape}
        - Output: same shape as input

    Examples::

        >>> m = torch_bn.{name}(64)                              # BatchNorm + LeakyReLU(0.01)
        >>> m = torch_bn.{name}(64, activation="elu", alpha=1.0)
        >>> output = m(torch.randn({example_input}))
    """


class _BatchNormAct(nn.modules.batchnorm._NormBase):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str = "leaky_relu", negative_slope: float = 0.01, alpha: float = 1.0) -> None:
        param = negative_slope if activation == "leaky_relu" else alpha
        _check_activation(activation, param)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation, self.negative_slope, self.alpha = activation, negative_slope, alpha

    @property
    def _param(self) -> float:
        return self.negative_slope if self.activation == "leaky_relu" else self.alpha

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        elif self.activation == "elu":
            s += f", alpha={self.alpha}"
        return s

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx: one call of this module (a leaf)
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor, _ = batch_norm_arguments(self)
        return batch_norm_act(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                              self.eps, self.activation, self._param)


class BatchNormAct1d(_BatchNormAct):
    __doc__ = _DOC.format(name="BatchNormAct1d", bn="BatchNorm1d", dims="2D or 3D",
                          shape=r":math:`(N, C)` or :math:`(N, C, L)`", example_input="20, 64")
    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchNormAct2d(_BatchNormAct):
    __doc__ = _DOC.format(name="BatchNormAct2d", bn="BatchNorm2d", dims="4D",
                          shape=r":math:`(N, C, H, W)`", example_input="20, 64, 35, 45")
    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchNormAct3d(_BatchNormAct):
    __doc__ = _DOC.format(name="BatchNormAct3d", bn="BatchNorm3d", dims="5D",
                          shape=r":math:`(N, C, D, H, W)`", example_input="4, 64, 8, 8, 8")
    _check_input_dim = nn.BatchNorm3d._check_input_dim
