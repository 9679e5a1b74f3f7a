"""Synchronized batch norm: statistics over the global batch of all processes of a group.

Data-parallel training splits each global batch across processes (ranks); plain batch norm would
then normalize each rank's shard with the shard's own statistics. ``SyncBatchNorm`` normalizes
with the statistics of the whole global batch instead, exchanging per-channel vectors over
``torch.distributed`` (gloo on CPU, nccl on CUDA, any backend with all_gather and all_reduce):

- forward: every rank computes its shard's count m_k, mean_k and M2_k = sum((x - mean_k)^2)
  (:func:`torch_bn.ops.batch_moments`), one all_gather brings all of them to every rank, and each
  rank combines them in float64 (Chan et al.'s parallel update):
  M = sum m_k, mean = sum m_k mean_k / M, M2 = sum M2_k + sum m_k (mean_k - mean)^2.
  Counts may differ between ranks (a rank may hold a batch of 1, or none at all). A gather rather
  than a sum all-reduce, because mean_k and M2_k only combine together with their counts; and
  every rank combines the same gathered values in the same order, so the global statistics,
  hence the running statistics, are bitwise identical on every rank.
- backward: one all_reduce sums sum(dy) and sum(dy * xhat) over ranks, and each rank applies the
  closed-form formula of :func:`torch_bn.ops.closed_form_dx` with the global sums and count.
  Parameter gradients stay local (the shard's sums), as in ``nn.SyncBatchNorm``: their sum over
  ranks is the single-process gradient on the global batch (DistributedDataParallel averages them).

Every rank must call forward and backward the same number of times (each call is a collective).
``nn.parallel.DistributedDataParallel`` refuses every ``nn.SyncBatchNorm`` (so this subclass too)
in a CPU module, nn's kernels being GPU-only; :class:`DistributedDataParallel` here is DDP
exempting torch_bn's layers from that check, for CPU training with gloo.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import ops
from .function import needed_gradients
from .functional import _check_renorm, _check_variant, batch_norm, batch_renorm, check_input
from .modules import BatchNorm1d, BatchNorm2d, _BatchRenorm, _GhostBatchNorm, batch_norm_arguments

__all__ = ["DistributedDataParallel", "SyncBatchNorm", "SyncBatchNormFunction", "convert_sync_batchnorm",
           "sync_batch_norm"]


def _global_moments(m: int, mean: Tensor, m2: Tensor, group: Any) -> tuple[int, Tensor, Tensor]:
    """Count, mean and M2 of the union of every rank's batch, from each rank's own (see module doc)."""
    c = mean.numel()
    local = torch.cat([mean.new_full((1,), m, dtype=torch.float64), mean.double(), m2.double()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    counts, means, m2s = torch.stack(gathered).split([1, c, c], dim=1)  # (world, 1), (world, C), (world, C)
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total.clamp(min=1)
    g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
    return int(total.item()), g_mean.to(mean.dtype), g_m2.to(mean.dtype)


def _local_moments(x: Tensor, mask: Tensor | None) -> tuple[int, Tensor, Tensor]:
    """This rank's count, mean and M2 per channel: over every position, or over the True positions
    of mask (none counted: mean and M2 zero, so that they add nothing when combined)."""
    if mask is None:
        return ops.batch_moments(x)
    count = int(mask.sum())
    if count == 0:
        zeros = torch.zeros(x.shape[1], dtype=ops.compute_dtype(x), device=x.device)
        return 0, zeros, zeros
    _count, mean, var = ops.masked_batch_stats(x, mask)
    return count, mean, var * count


class SyncBatchNormFunction(torch.autograd.Function):
    """y, mean, var = SyncBatchNormFunction.apply(x, weight, bias, eps, process_group[, mask, running_mean,
    running_var, rmax, dmax])

    Training-mode batch norm of this rank's x with the statistics of the global batch (the
    union of every rank's x in process_group). Inputs: x (N, C, *) floating point, N may be 0
    and may differ between ranks; weight, bias (C,) or None; eps (float). Optional: mask (N, *)
    bool, statistics over its True positions only (counts combined across ranks); running_mean,
    running_var (C,) with rmax, dmax: batch renormalization, r and d from the global statistics.
    Outputs: y like x; the global mean and unbiased variance (C,) in compute dtype (float32 for
    half inputs), identical on every rank, not differentiable (for the running statistics).
    Backward: dx from the globally summed sum(dy) and sum(dy * xhat); dweight, dbias from this
    rank's shard only. Not twice differentiable (the collectives are not).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                process_group: Any, mask: Tensor | None = None, running_mean: Tensor | None = None,
                running_var: Tensor | None = None, rmax: float | None = None,
                dmax: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        m, mean, m2 = _global_moments(*_local_moments(x, mask), process_group)
        if m <= 1:  # every rank sees the same m, so every rank raises
            counted = "counted values (mask True)" if mask is not None else "values per channel"
            raise ValueError(f"Expected more than 1 value per channel when training, got {m} {counted} over all "
                             f"ranks of the process group (input size {tuple(x.shape)} on this rank); give the "
                             f"global batch at least two values per channel")
        rstd = torch.rsqrt(m2 / m + eps)
        scale, shift = weight, bias
        r = d = None
        if rmax is not None:
            r, d = ops.renorm_factors(mean, m2 / m, running_mean, running_var, eps, rmax, dmax)
            scale, shift = ops.renorm_affine(weight, bias, r, d)
        y = ops.normalize(x, mean, rstd, scale, shift)
        ctx.save_for_backward(x, weight, mean, rstd, mask, r, d)
        ctx.count, ctx.process_group = m, process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        var = m2 / (m - 1)  # unbiased, for running_var
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, weight, mean, rstd, mask, r, d = ctx.saved_tensors
        xhat = (x.to(mean.dtype) - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
        dyc = dy.to(mean.dtype)
        dims = ops.reduce_dims(x)
        local = torch.cat([dyc.sum(dims), (dyc * xhat).sum(dims)])  # this shard's sum(dy), sum(dy * xhat)
        total = local.clone()
        # Always reduce, even where x needs no gradient: every rank must join every collective.
        dist.all_reduce(total, group=ctx.process_group)
        sum_dy, sum_dy_xhat = total.chunk(2)
        # Batch renormalization is batch norm with weight * r for the weight (ops.renorm_backward).
        scale = weight if r is None else ops.renorm_affine(weight, None, r, d)[0]
        if mask is None:
            dx = ops.closed_form_dx(dyc, xhat, rstd, scale, sum_dy, sum_dy_xhat, ctx.count)
        else:
            dx = ops.masked_dx(dyc, xhat, rstd, scale, mask, sum_dy, sum_dy_xhat, ctx.count)
        dbias, dweight = local.chunk(2)
        if r is not None:
            dweight = r * dweight + d * dbias
        return (*needed_gradients(ctx, dx.to(dy.dtype), dweight, dbias, weight), *(None,) * 7)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
    *,
    mask: Tensor | None = None,
    rmax: float | None = None,
    dmax: float | None = None,
) -> Tensor:
    """Training-mode batch norm with global statistics over ``process_group`` (None: the world).

    Like :func:`torch_bn.functional.batch_norm` with ``training=True``, but the statistics are
    those of the union of every rank's input; running_mean and running_var (C,) or None are
    updated in place with the global mean and unbiased variance, the same on every rank.
    mask (N, *) bool: statistics over the True positions of every rank. rmax and dmax (both, with
    running statistics): batch renormalization, r and d from the global statistics and the
    running ones (:func:`torch_bn.functional.batch_renorm`).
    torch.distributed must be initialized. Output: same shape and dtype as input.
    """
    # The count is checked over all ranks, by the Function.
    check_input(input, True, eps, running_mean, running_var, weight, bias, check_count=False)
    if mask is not None:
        _check_variant(input, True, "closed_form", mask, None, check_count=False)
    renorm = rmax is not None and running_mean is not None and running_var is not None
    if renorm:
        _check_renorm(rmax, dmax)
        if mask is not None:
            raise ValueError("sync_batch_norm takes mask or rmax/dmax, not both: batch renormalization with "
                             "masked statistics is not implemented")
    group = dist.group.WORLD if process_group is None else process_group
    y, mean, var = SyncBatchNormFunction.apply(
        input, weight, bias, eps, group, mask, *((running_mean.detach(), running_var.detach(), rmax, dmax)
                                                  if renorm else (None, None, None, None)))
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_(var.to(running_var.dtype), momentum)
    return y


class SyncBatchNorm(nn.SyncBatchNorm):
    r"""Batch norm over the global batch of a data-parallel process group; a drop-in for
    ``nn.SyncBatchNorm`` (a subclass of it) computed by torch_bn's own Function.

    In training, with torch.distributed initialized and more than one rank in the group, the
    statistics are those of the union of every rank's batch (:class:`SyncBatchNormFunction`):
    ranks may hold different batch sizes, a batch of 1, or none. Otherwise (evaluation, no
    process group, or a group of one) it is plain batch norm, :func:`torch_bn.functional.batch_norm`.
    Unlike ``nn.SyncBatchNorm`` it runs on CPU tensors too (with the gloo backend).
    float16/bfloat16 input is normalized with float32 statistics.

    Args:
        num_features: C, the channel dimension (dim 1) of the input.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: weight of the new batch in the running statistics; None for a cumulative
            average. Default: 0.1.
        affine: learnable per-channel weight and bias. Default: True.
        track_running_stats: keep running_mean and running_var (from the global mean and
            unbiased variance, identical on every rank). Default: True.
        process_group: the ranks that share statistics. Default: None, the whole world.
        bias: learn the additive bias (with affine). Default: True.
        rmax, dmax, warmup_steps: batch renormalization (as :class:`torch_bn.BatchRenorm1d`), on when
            rmax or dmax is given (the other then defaults to 3.0 / 5.0), with r and d from the
            global statistics. Default: None, None, 0 (plain batch norm).

    Shape:
        - Input: (N, C, *), 2D to 5D and beyond; N may differ between ranks and may be 0.
          ``forward(input, mask=None)``: mask (N, *) bool, statistics over its True positions on
          every rank (counts combined across ranks).
        - Output: same shape and dtype as the input.

    Examples::

        >>> # under torchrun, after torch.distributed.init_process_group("gloo")
        >>> bn = torch_bn.SyncBatchNorm(16)
        >>> y = bn(torch.randn(8, 16, 32, 32))       # statistics over every rank's 8 images
        >>> model = torch_bn.convert_sync_batchnorm(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None, *,
                 bias: bool = True, rmax: float | None = None, dmax: float | None = None,
                 warmup_steps: int = 0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)
        self.renorm = rmax is not None or dmax is not None
        self.rmax = 3.0 if rmax is None else float(rmax)
        self.dmax = 5.0 if dmax is None else float(dmax)
        if self.renorm:
            _check_renorm(self.rmax, self.dmax)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return f"{s}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}" if self.renorm else s

    def _renorm_bounds(self) -> tuple[float, float] | None:
        """(rmax, dmax) where this training call renormalizes; None for plain batch norm
        (renormalization off, or still warming up: num_batches_tracked <= warmup_steps)."""
        if not (self.renorm and self.training):
            return None
        if self.warmup_steps and self.num_batches_tracked is not None and int(self.num_batches_tracked) <= self.warmup_steps:
            return None
        return self.rmax, self.dmax

    def _sync_group(self) -> Any:
        """The process group to synchronize over, or None when there is nothing to synchronize."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if self.renorm and mask is not None:
            raise ValueError("SyncBatchNorm with batch renormalization does not take a mask: renormalization "
                             "with masked statistics is not implemented")
        running_mean, running_var, use_batch_stats, factor, _ = batch_norm_arguments(self)
        bounds = self._renorm_bounds()
        group = self._sync_group() if self.training else None  # eval never synchronizes
        if group is None:
            if bounds is not None:
                return batch_renorm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                                    factor, self.eps, *bounds)
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                              factor, self.eps, mask=mask)
        rmax, dmax = bounds if bounds is not None else (None, None)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                               group, mask=mask, rmax=rmax, dmax=dmax)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """torch_bn's :func:`convert_sync_batchnorm` (nn.SyncBatchNorm's would build nn's layers)."""
        return convert_sync_batchnorm(module, process_group)


# torch_bn's own layers are matched by class too, whether or not they subclass nn's _BatchNorm.
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, BatchNorm1d, BatchNorm2d)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every batch-norm layer in ``module`` by a :class:`SyncBatchNorm`.

    Converts ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and torch_bn's batch-norm layers
    (``BatchRenorm*`` keep rmax, dmax and warmup_steps; ``GhostBatchNorm*`` stay as they are, each
    rank normalizing its own chunks), like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``: parameters and buffers are shared with the
    originals (an optimizer built before still holds them), training mode is kept, and the
    converted module is returned (``module`` itself unless it is a batch-norm layer).
    process_group: the ranks that share statistics (None: the whole world).
    """
    out = module
    # Ghost batch norm stays as it is: each rank normalizes its own chunks, which is ghost batch
    # norm of the global batch wherever each rank's batch is a multiple of virtual_batch_size.
    if isinstance(module, _BATCH_NORMS) and not isinstance(module, _GhostBatchNorm):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"{type(module).__name__} has not inferred num_features yet; run one forward "
                             f"pass (or build the non-lazy layer) before convert_sync_batchnorm")
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=module.bias is not None,
                            device="meta",  # placeholders, every one replaced by the original's below
                            **({"rmax": module.rmax, "dmax": module.dmax, "warmup_steps": module.warmup_steps}
                               if isinstance(module, (_BatchRenorm, SyncBatchNorm)) and getattr(module, "renorm", True)
                               else {}))
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(module, name))
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """``nn.parallel.DistributedDataParallel`` that accepts torch_bn's SyncBatchNorm in CPU modules.

    DDP's constructor refuses any ``nn.SyncBatchNorm`` layer of a CPU module, because nn's
    synchronized kernels run only on GPUs; torch_bn's layers run on any device, so they are
    exempt from that check, and nn's own layers are still checked. Everything else is DDP's.
    Same arguments as ``nn.parallel.DistributedDataParallel``.

    Examples::

        >>> model = torch_bn.convert_sync_batchnorm(model)
        >>> model = torch_bn.DistributedDataParallel(model)   # CPU and gloo, or CUDA and nccl
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        others = [m for m in module.modules() if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)]
        super()._passing_sync_batchnorm_handle(nn.ModuleList(others))
