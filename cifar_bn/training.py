"""One model's training: the notebook's Solver rebuilt from torch.optim, with checkpoints and resume.

One run = one classifier trained on one CIFAR10Data, logged to one run folder (see
:mod:`cifar_bn.lifecycle`, which holds the lifecycle this trainer shares with the vectorized one).
``Trainer`` trains whatever model it is given, on one process or data-parallel under torchrun;
``run`` builds the notebook's MLP for a config and resumes it.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

import torch_bn

from . import distributed
from .config import TrainConfig
from .dashboard import LayerProbe
from .data import NUM_CLASSES, CIFAR10Data
from .lifecycle import LOG_EVERY, Lifecycle, build_optimizer, read_back
from .models import MLP, activation_stds, l2_penalty
from .runs import CHECKPOINT, load_checkpoint


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification accuracy in eval mode (running statistics), restoring the model's mode."""
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


class Trainer(Lifecycle):
    """Trains ``model`` (any classifier of CIFAR-10 images) per ``config`` on ``data``, logging to
    ``run_dir``.

    A new run needs a folder that holds no run yet; ``resume=True`` continues the folder's run
    from ``checkpoint`` (from :func:`cifar_bn.runs.load_checkpoint`; None: start over, dropping
    what was logged): model, optimizer, generators and history are restored from it, and
    ``config.epochs`` may be larger than the checkpoint's to extend a finished run. ``config.seed``
    fixes the batch order and the train-accuracy sample; the model's initialization is the
    caller's (see :func:`run`). Under torchrun the model trains in DDP, each rank on its shard of
    every global batch, and rank 0 alone writes files.

    Args:
        config: the run's settings (TrainConfig).
        model: the classifier to train; moved to the config's device.
        data: the three splits (CIFAR10Data); at least one batch of training images.
        run_dir: the run's folder (created if missing).
        log_every: per-layer dashboard statistics every this many iterations (0: none).

    Examples:
        >>> trainer = Trainer(TrainConfig(norm="torch_bn"), build_model(TrainConfig(norm="torch_bn"), 3072),
        ...                   data, "runs/bn")  # doctest: +SKIP
        >>> summary = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module, data: CIFAR10Data, run_dir: str, *,
                 progress: bool = True, resume: bool = False, checkpoint: dict | None = None,
                 log_every: int = LOG_EVERY) -> None:
        self.dist = distributed.current()  # rank 0 of 1 without torchrun; only rank 0 writes files
        super().__init__([config], data, [run_dir], os.path.join(run_dir, CHECKPOINT), progress=progress,
                         resume=resume, log_every=log_every, is_main=self.dist.is_main)
        self.run_dir = run_dir
        self.model = model.to(self.device)
        if self.device == "cpu" and any(type(m).__module__.startswith("torch_bn.") for m in self.model.modules()):
            # torch_bn's layers train on its compiled CPU op: load it (or, the first time on a
            # machine, build it) now, so that its build is not counted as training time.
            torch_bn.cpp.op()
        self.train_model = self.dist.wrap(self.model, config.sync_bn, config.norm)  # DDP under torchrun
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config.lr_decay)
        self.best_state: dict[str, Tensor] = {}
        self._open(checkpoint, resume)
        self.probe = LayerProbe(self.model)

    def fit(self, on_epoch_end=None) -> dict:
        """Train to config.epochs; return (and write) the summary. on_epoch_end(trainer) runs after each
        epoch's checkpoint (tests use it to simulate an interruption)."""
        return self._fit(on_epoch_end, os.path.basename(self.run_dir.rstrip("/")))[0]

    # ---- one model -----------------------------------------------------------------------------

    def _accuracies(self) -> tuple[list[float], list[float]]:
        d = self.data
        return ([accuracy(self.model, d["X_train"][self.train_sample], d["y_train"][self.train_sample])],
                [accuracy(self.model, d["X_val"], d["y_val"])])

    def _activation_stds(self) -> list[list[float]]:
        return [activation_stds(self.model, self.data["X_train"][self.train_sample])]

    def _test_accuracies(self) -> list[float]:
        self.model.load_state_dict(self.best_state)  # as the notebook: keep the best-val weights
        return [accuracy(self.model, self.data["X_test"], self.data["y_test"])]

    def _keep_best(self, improved: list[int]) -> None:
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _epoch_begins(self) -> None:
        self.model.train()

    def _train_step(self, idx: Tensor, step: int, probe: bool) -> None:
        x, y = self.data["X_train"], self.data["y_train"]
        self.probe.armed = probe
        idx = self.dist.shard(idx)  # this rank's part of the global batch
        loss = self.dist.shard_loss(F.cross_entropy(self.train_model(x[idx]), y[idx], reduction="sum"),
                                    self.config.batch_size)
        if self.config.reg:
            loss = loss + l2_penalty(self.model, self.config.reg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.probe.armed:  # the gradients of this step, before the optimizer uses them
            self.probe.armed = False
            start = time.perf_counter()
            self.loggers[0].scalars(self.probe.stats(), step)
            self.logging_time += time.perf_counter() - start
        self.optimizer.step()
        value = self.dist.average(loss).item()  # the global batch's loss
        self.histories[0].loss.append(value)
        self.loggers[0].iteration(step, value)

    def _postfix(self) -> dict[str, str]:
        h = self.histories[0]
        return {"loss": f"{h.loss[-1]:.3f}", "val_acc": f"{h.check_val_acc[-1]:.3f}"}

    def _log_epoch(self, lr: float) -> None:
        self.loggers[0].epoch(self.step, lr, self.epoch_loss(0), self.best_val_acc[0], self.probe)

    def _models_state(self) -> dict:
        return {"model": self.model.state_dict(), "best": self.best_state}

    def _load_models(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.best_state = state["best"]

    def _summary_extra(self) -> dict:
        return self.dist.describe()

    def _close(self) -> None:
        self.probe.remove()


def build_model(config: TrainConfig, input_dim: int) -> MLP:
    """The notebook's MLP for ``config``, initialized from ``config.seed`` (so every norm of a
    comparison starts from the same Linear weights)."""
    torch.manual_seed(config.seed)
    return MLP(input_dim, config.hidden_dims, NUM_CLASSES, config.norm, config.weight_scale, config.dropout,
               virtual_batch_size=config.virtual_batch_size, renorm_warmup=config.renorm_warmup or 0)


def run(config: TrainConfig, data: CIFAR10Data, run_dir: str, *, progress: bool = True, resume: bool = False,
        log_every: int = LOG_EVERY) -> dict:
    """Train the notebook's MLP for one run and return its summary.

    With resume, the run's checkpoint holds its settings (they win, except the device and the
    number of epochs): a run finished with at least config.epochs epochs is read back; otherwise
    it continues from its checkpoint to config.epochs (a finished run's summary is kept aside as
    summary.<N>epochs.json and a new one written at the end). A damaged checkpoint or summary
    raises DamagedRunError before anything is renamed."""
    checkpoint = load_checkpoint(os.path.join(run_dir, CHECKPOINT)) if resume else None
    if resume:
        summaries = read_back([run_dir], config.epochs)
        if summaries is not None:
            return summaries[0]
    if checkpoint is not None:
        config = TrainConfig(**{**checkpoint["configs"][0], "device": config.device,
                                "epochs": max(config.epochs, checkpoint["epoch"])})
    config = config.resolved(len(data.X_train))
    model = build_model(config, data.X_train[0].numel())
    return Trainer(config, model, data, run_dir, progress=progress, resume=resume, checkpoint=checkpoint,
                   log_every=log_every).fit()
