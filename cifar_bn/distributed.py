"""Data-parallel training under torchrun: the process group, each rank's shard, rank 0 writes.

``torchrun --nproc_per_node=K train.py ...`` starts K processes (ranks) with RANK, LOCAL_RANK and
WORLD_SIZE in their environment. :func:`start` joins them in a process group (gloo for CPU
training, nccl for CUDA) and :func:`current` hands the :class:`Context` to the training loop, which

- trains the model wrapped in DistributedDataParallel (:meth:`Context.wrap`), with every
  batch-norm layer converted to ``torch_bn.SyncBatchNorm`` when ``sync_bn`` is set;
- gives each rank a disjoint shard of every global batch (:meth:`Context.shard`), weighting each
  rank's loss so that DDP's average of gradients is the gradient of the global batch's mean loss
  (:meth:`Context.shard_loss`), and logs the global batch's loss (:meth:`Context.average`);
- writes run files (checkpoint, TensorBoard events, summary.json) on rank 0 only (``is_main``).

Without torchrun the context is a single process (rank 0 of 1), whose methods change nothing.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

import torch_bn

from .config import under_torchrun
from .data import DataError
from .runs import DamagedRunError, RunExistsError

# A rank waiting at a collective for a peer that died gives up after this long (instead of
# torch's default of 10 to 30 minutes); torchrun then stops the others.
TIMEOUT = datetime.timedelta(minutes=5)
T = TypeVar("T")


@dataclass
class Context:
    """This process's place in data-parallel training (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's part of a global batch (of indices): contiguous, disjoint, sizes within 1."""
        return batch.tensor_split(self.world_size)[self.rank] if self.world_size > 1 else batch

    def shard_loss(self, loss_sum: Tensor, global_batch: int) -> Tensor:
        """The loss to back-propagate on this rank, from the sum of its shard's per-sample losses.

        DDP averages gradients over ranks, so each rank takes its sum over global_batch /
        world_size: the average is then the gradient of the global batch's mean loss, whatever
        the shard sizes. One process: loss_sum / global_batch, bitwise the mean loss.
        """
        return loss_sum / (global_batch / self.world_size)

    def average(self, value: Tensor) -> Tensor:
        """The mean of value over ranks (the loss DDP's averaged gradients belong to)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def wrap(self, model: nn.Module, sync_bn: bool, norm: str = "torch_bn") -> nn.Module:
        """The module to train: model with synchronized batch norm (sync_bn), in DDP when distributed.

        torch_bn's layers become torch_bn.SyncBatchNorm; nn's (norm "nn") nn.SyncBatchNorm.
        The conversion shares parameters and buffers, and the MLP's layers sit in a container, so
        ``model`` itself holds the converted layers; the wrapper only adds DDP.
        """
        if sync_bn:
            convert = nn.SyncBatchNorm.convert_sync_batchnorm if norm == "nn" else torch_bn.convert_sync_batchnorm
            model = convert(model)
        if not self.distributed:
            return model
        cuda = next(model.parameters()).is_cuda
        return torch_bn.DistributedDataParallel(model, device_ids=[self.local_rank] if cuda else None)

    def describe(self) -> dict[str, Any]:
        """What summary.json records about the launch: nothing for a single process."""
        return {"distributed": {"world_size": self.world_size, "backend": self.backend}} if self.distributed else {}

    def on_every_rank(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on every rank; if it raises on any rank, every rank raises (none hangs waiting)."""
        try:
            result, error = fn(*args), None
        except Exception as e:
            if not self.distributed:
                raise
            result, error = None, e
        if self.distributed:
            errors: list[Any] = [None] * self.world_size
            dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
            if error is not None:
                raise error
            for rank, e in enumerate(errors):
                if e is not None:
                    raise _rebuild(e, rank)
        return result

    def on_rank0(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on rank 0 only; every rank returns its result, or raises its error."""
        if not self.distributed:
            return fn(*args)
        message: list[Any] = [None]
        error = None
        if self.is_main:
            try:
                message[0] = ("ok", fn(*args))
            except Exception as e:
                error = e
                message[0] = ("error", (type(e).__name__, str(e)))
        dist.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        status, payload = message[0]
        if status == "error":
            raise _rebuild(payload, 0)
        return payload


_ERRORS = {"DataError": DataError, "DamagedRunError": DamagedRunError, "RunExistsError": RunExistsError,
           "ValueError": ValueError}


def _rebuild(error: tuple[str, str], rank: int) -> Exception:
    """Another rank's error, raised here too: train.py's own error types by name, else RuntimeError."""
    name, message = error
    return _ERRORS.get(name, RuntimeError)(message if name in _ERRORS else f"rank {rank}: {name}: {message}")


_context = Context()


def current() -> Context:
    """The context :func:`start` set up (a single process when it was not called)."""
    return _context


def start(device: str) -> Context:
    """Join torchrun's process group: gloo for CPU training, nccl for CUDA (device "cpu" or "cuda").

    Without torchrun nothing happens. On CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    global _context
    if not under_torchrun():
        return _context
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    _context = Context(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    return _context


def stop() -> None:
    """Leave the process group (if start() joined one); the context is a single process again."""
    global _context
    if _context.distributed:
        dist.destroy_process_group()
    _context = Context()
