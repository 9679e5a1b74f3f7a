"""``recalibrate``: running statistics recomputed exactly over a set of batches (PreciseBN).

Running averages with momentum trail the weights they were computed under, and after weight
averaging (SWA), pruning or a change of data they no longer match the model at all. recalibrate
replaces them with the exact mean and variance of what each batch-norm layer sees over the
given batches, with the model's current weights.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .sync_batchnorm import _global_moments

__all__ = ["recalibrate"]


class _Moments:
    """Count, mean and M2 = sum((x - mean)^2) per channel, float64, combined batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        x = x.detach().double()
        if mask is not None:  # only the counted positions: (K, C)
            x = x.movedim(1, -1)[mask]
        m, mean, m2 = ops.batch_moments(x)
        if m == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = m, mean, m2
            return
        # Chan, Golub & LeVeque's parallel update: exact, no cancellation of large sums.
        n = self.count + m
        delta = mean - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * m / n)
        self.count = n


def _batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with running statistics to recalibrate: nn's and torch_bn's batch norm (the
    SyncBatchNorm and BatchNormAct layers included), tracking running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, nn.modules.instancenorm._InstanceNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


def _mask(args: tuple, kwargs: dict) -> Tensor | None:
    """A layer call's ``mask`` (masked statistics: bool, the input's shape without dim 1), or None."""
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    x = args[0]
    if (isinstance(mask, Tensor) and mask.dtype == torch.bool
            and tuple(mask.shape) == tuple(x.shape[:1]) + tuple(x.shape[2:])):
        return mask
    return None


def _sync_group(module: nn.Module) -> Any:
    """The process group a SyncBatchNorm layer combines statistics over, or None."""
    if not isinstance(module, nn.SyncBatchNorm):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if module.process_group is None else module.process_group
    return group if dist.get_world_size(group) > 1 else None


def _progress_bar(progress: bool | Callable[..., Iterable], batches: Iterable, total: int | None) -> Iterable:
    if progress is False or progress is None:
        return batches
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError("recalibrate(progress=True) shows a tqdm progress bar, and tqdm is not installed; "
                              "pip install tqdm, or pass your own wrapper as progress=") from e
        return tqdm(batches, total=total, desc="recalibrate", unit="batch")
    return progress(batches, total=total)


def recalibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                device: torch.device | str | None = None,
                progress: bool | Callable[..., Iterable] = False) -> nn.Module:
    """Set every batch-norm layer's running statistics to the exact statistics of what it saw.

    Runs ``model`` in training mode, without recording gradients, over ``batches`` (an
    iterable of inputs, or of tuples/lists whose first element is the input; the first
    ``num_batches`` of them where given), and sets each batch-norm layer's ``running_mean`` and
    ``running_var`` to the mean and the unbiased variance of all the values that layer received
    over all the batches, each value counted once, per channel. So batches of different sizes
    weigh by their size, and the result is what one batch holding every value would give.
    Moments are taken per batch in float64 and combined exactly (Chan et al.'s parallel
    update), then cast to the buffers' dtype. Each layer sees the inputs of a training-mode
    pass: the layers before it normalize with their batch statistics, as in training.

    Layers: nn's BatchNorm1d/2d/3d and SyncBatchNorm, torch_bn's layers (BatchNormAct included:
    the statistics of its batch-norm input), every one with ``track_running_stats``. A
    :class:`torch_bn.SyncBatchNorm` in an initialized process group of several ranks combines
    its statistics over the ranks (every rank must call recalibrate with the same number of
    batches). A layer called with a ``mask`` (masked statistics: a bool tensor shaped like the
    input without dim 1, as keyword or second argument) counts only the positions where it is
    True. A layer the batches never reach keeps its statistics (with a warning naming it).

    What else changes: ``num_batches_tracked`` counts the batches as training does (one per
    call of the layer; a layer never reached keeps its count); ``momentum`` is not used (the statistics come from the inputs, not a
    running average) and is left as it was, as are the parameters and every module's training
    mode. Dropout and other training-mode layers act as in training during the passes. If a
    batch raises, every layer's running statistics and count are put back before the error
    propagates.

    Unlike ``torch.optim.swa_utils.update_bn``, which sets momentum to None and so averages the
    per-batch statistics with equal weights: its running_mean is the mean of the batch means
    (equal to this one only when all batches have the same size), and its running_var the mean
    of the batches' unbiased variances, which leaves out the spread of the batch means around
    the overall mean: with B batches of m values,
    ``(B*m - 1) * var_all = (m - 1) * sum_b var_b + m * sum_b (mean_b - mean)^2``.

    Args:
        model: the model; changed in place and returned.
        batches: an iterable of input tensors, or of tuples or lists whose first element is the
            input (e.g. a DataLoader of (input, label)).
        num_batches: use at most this many batches. Default: all.
        device: move each input there first. Default: as it comes.
        progress: ``True`` for a tqdm progress bar (tqdm is not a dependency of torch_bn: needs
            ``pip install tqdm``), or a callable ``progress(iterable, total=...)`` that wraps the
            batches (e.g. ``functools.partial(tqdm, leave=False)``). Default: no progress bar.

    Example::

        >>> swa_model = torch.optim.swa_utils.AveragedModel(model)
        >>> torch_bn.recalibrate(swa_model, train_loader, num_batches=200, progress=True)
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive number of batches or None (all), got {num_batches}")
    layers = _batch_norms(model)
    moments = {id(m): _Moments() for _, m in layers}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args and isinstance(args[0], Tensor):
            moments[id(module)].add(args[0], _mask(args, kwargs))

    modes = {m: m.training for m in model.modules()}
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    elif total is not None and hasattr(batches, "__len__"):
        total = min(total, len(batches))
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for _, m in layers]
    # The passes move the running statistics (momentum) and counts: kept to undo them where a
    # layer saw nothing, or everywhere when a batch raises.
    saved = {id(m): {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for _, m in layers}

    def restore(m: nn.Module) -> None:
        for k, v in saved[id(m)].items():
            getattr(m, k).copy_(v)

    try:
        model.train()
        with torch.no_grad():
            for i, batch in enumerate(_progress_bar(progress, batches, total)):
                if num_batches is not None and i >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None:
                    x = x.to(device)
                model(x)
    except BaseException:
        with torch.no_grad():
            for _, m in layers:
                restore(m)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    unreached = []
    with torch.no_grad():
        for name, m in layers:
            acc = moments[id(m)]
            group = _sync_group(m)
            count, mean, m2 = acc.count, acc.mean, acc.m2
            if group is not None:
                zeros = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
                count, mean, m2 = _global_moments(count, zeros if mean is None else mean,
                                                  zeros if m2 is None else m2, group)
            if count == 0:  # never reached (or only empty batches): statistics and count as they were
                restore(m)
                unreached.append(name or type(m).__name__)
                continue
            if count < 2:
                raise ValueError(f"recalibrate: layer {name!r} saw {count} value per channel over all batches; "
                                 f"an unbiased variance needs at least 2: pass more or larger batches")
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_((m2 / (count - 1)).to(m.running_var.dtype))
    if unreached:
        warnings.warn(f"recalibrate: the batches never reached {', '.join(unreached)}; their running "
                      f"statistics are unchanged", RuntimeWarning, stacklevel=2)
    return model
