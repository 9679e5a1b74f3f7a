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
from .functional import batch_norm, check_input
from .modules import BatchNorm1d, BatchNorm2d, batch_norm_arguments

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


class SyncBatchNormFunction(torch.autograd.Function):
    """y, mean, var = SyncBatchNormFunction.apply(x, weight, bias, eps, process_group)

    Training-mode batch norm of this rank's x with the statistics of the global batch (the
    union of every rank's x in process_group). Inputs: x (N, C, *) floating point, N may be 0
    and may differ between ranks; weight, bias (C,) or None; eps (float). Outputs: y like x; the
    global mean and unbiased variance (C,) in compute dtype (float32 for half inputs), identical
    on every rank, not differentiable (for the running statistics).
    Backward: dx from the globally summed sum(dy) and sum(dy * xhat); dweight, dbias from this
    rank's shard only. Not twice differentiable (the collectives are not).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                process_group: Any) -> tuple[Tensor, Tensor, Tensor]:
        m, mean, m2 = _global_moments(*ops.batch_moments(x), process_group)
        if m <= 1:  # every rank sees the same m, so every rank raises
            raise ValueError(f"Expected more than 1 value per channel when training, got {m} over all ranks "
                             f"of the process group (input size {tuple(x.shape)} on this rank); give the "
                             f"global batch at least two values per channel")
        rstd = torch.rsqrt(m2 / m + eps)
        y = ops.normalize(x, mean, rstd, weight, bias)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.count, ctx.process_group = m, process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        var = m2 / (m - 1)  # unbiased, for running_var
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, weight, mean, rstd = ctx.saved_tensors
        xhat = (x.to(mean.dtype) - ops.as_channel(mean, x)) * ops.as_channel(rstd, x)
        dyc = dy.to(mean.dtype)
        dims = ops.reduce_dims(x)
        local = torch.cat([dyc.sum(dims), (dyc * xhat).sum(dims)])  # this shard's sum(dy), sum(dy * xhat)
        total = local.clone()
        # Always reduce, even where x needs no gradient: every rank must join every collective.
        dist.all_reduce(total, group=ctx.process_group)
        sum_dy, sum_dy_xhat = total.chunk(2)
        dx = ops.closed_form_dx(dyc, xhat, rstd, weight, sum_dy, sum_dy_xhat, ctx.count).to(dy.dtype)
        dbias, dweight = local.chunk(2)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None, dweight.to(weight.dtype) if need_w else None,
                dbias.to(ctx.bias_dtype) if need_b else None, None, None)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
) -> Tensor:
    """Training-mode batch norm with global statistics over ``process_group`` (None: the world).

    Like :func:`torch_bn.functional.batch_norm` with ``training=True``, but the statistics are
    those of the union of every rank's input; running_mean and running_var (C,) or None are
    updated in place with the global mean and unbiased variance, the same on every rank.
    torch.distributed must be initialized. Output: same shape and dtype as input.
    """
    # The count is checked over all ranks, by the Function.
    check_input(input, True, eps, running_mean, running_var, weight, bias, check_count=False)
    group = dist.group.WORLD if process_group is None else process_group
    y, mean, var = SyncBatchNormFunction.apply(input, weight, bias, eps, group)
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

    Shape:
        - Input: (N, C, *), 2D to 5D and beyond; N may differ between ranks and may be 0.
        - Output: same shape and dtype as the input.

    Examples::

        >>> # under torchrun, after torch.distributed.init_process_group("gloo")
        >>> bn = torch_bn.SyncBatchNorm(16)
        >>> y = bn(torch.randn(8, 16, 32, 32))       # statistics over every rank's 8 images
        >>> model = torch_bn.convert_sync_batchnorm(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def _sync_group(self) -> Any:
        """The process group to synchronize over, or None when there is nothing to synchronize."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, use_batch_stats, factor = batch_norm_arguments(self)
        group = self._sync_group() if self.training else None  # eval never synchronizes
        if group is None:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                              factor, self.eps)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                               group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """torch_bn's :func:`convert_sync_batchnorm` (nn.SyncBatchNorm's would build nn's layers)."""
        return convert_sync_batchnorm(module, process_group)


# torch_bn's own layers are matched by class too, whether or not they subclass nn's _BatchNorm.
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, BatchNorm1d, BatchNorm2d)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every batch-norm layer in ``module`` by a :class:`SyncBatchNorm`.

    Converts ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and torch_bn's batch-norm layers, like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``: parameters and buffers are shared with the
    originals (an optimizer built before still holds them), training mode is kept, and the
    converted module is returned (``module`` itself unless it is a batch-norm layer).
    process_group: the ranks that share statistics (None: the whole world).
    """
    out = module
    if isinstance(module, _BATCH_NORMS):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"{type(module).__name__} has not inferred num_features yet; run one forward "
                             f"pass (or build the non-lazy layer) before convert_sync_batchnorm")
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=module.bias is not None,
                            device="meta")  # placeholders, every one replaced by the original's below
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
