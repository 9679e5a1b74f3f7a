"""The training loop: the notebook's Solver rebuilt from torch.optim, with checkpoints and resume.

One run = one classifier trained on one CIFAR10Data, logged to one run folder:
``checkpoint.pt`` (every epoch, atomically), TensorBoard events, and ``summary.json`` at the end.
``Trainer`` trains whatever model it is given; ``run`` builds the notebook's MLP for a config.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import distributed
from .dashboard import RunLogger
from .data import NUM_CLASSES, CIFAR10Data
from .models import MLP, l2_penalty, norm_layers

OPTIMIZERS = ("adam", "sgd", "sgd_momentum", "rmsprop")
TRAIN_ACC_SAMPLES = 1000  # the notebook checks training accuracy on 1,000 training images
FINAL_LOSS_WINDOW = 100  # summary's final_loss: the mean loss of the last this many iterations
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


class RunExistsError(Exception):
    """A run folder already exists; runs are never overwritten."""


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint and summary."""

    norm: str = "none"
    hidden_dims: tuple[int, ...] = (100, 100, 100, 100, 100)
    weight_scale: float | None = None
    dropout: float = 0.0
    reg: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 1.0
    batch_size: int = 50
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    sync_bn: bool = False  # batch norm over the global batch of all torchrun processes (cifar_bn.distributed)

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(self.hidden_dims)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("lr", "lr_decay", "batch_size", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class History:
    """Per-iteration training loss; per-epoch accuracies and lr (index 0: before training)."""

    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def holds_run(run_dir: str) -> bool:
    """Whether run_dir already has a run's files (checkpoint, summary or TensorBoard events)."""
    return os.path.isdir(run_dir) and any(
        f in (CHECKPOINT, SUMMARY) or f.startswith("events.out.tfevents") for f in os.listdir(run_dir))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return device


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    return torch.optim.RMSprop(params, lr=config.lr, alpha=0.99, eps=1e-8)  # the notebook's decay and eps


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification accuracy in eval mode (running statistics), restoring the model's mode."""
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


def versions() -> dict[str, str]:
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}


def load_checkpoint(run_dir: str) -> dict | None:
    """The run folder's checkpoint, or None when it has none yet."""
    path = os.path.join(run_dir, CHECKPOINT)
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None


class Trainer:
    """Trains ``model`` (any classifier of CIFAR-10 images) per ``config`` on ``data``, logging to
    ``run_dir``.

    A new run needs a folder that holds no run yet; ``resume=True`` continues the folder's run
    from ``checkpoint`` (from :func:`load_checkpoint`; None: start over, dropping what was logged):
    model, optimizer, generators and history are restored from it.
    ``config.seed`` fixes the batch order and the train-accuracy sample; the model's
    initialization is the caller's (see :func:`run`).
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module, data: CIFAR10Data, run_dir: str, *,
                 progress: bool = True, resume: bool = False, checkpoint: dict | None = None) -> None:
        self.dist = distributed.current()  # rank 0 of 1 without torchrun; only rank 0 writes files
        if self.dist.is_main:
            if not resume and holds_run(run_dir):
                raise RunExistsError(f"run folder {run_dir} already holds a run and runs are never overwritten; "
                                     f"choose another --run-name, or continue it with --resume")
            os.makedirs(run_dir, exist_ok=True)
        self.config, self.run_dir, self.progress = config, run_dir, progress and self.dist.is_main
        self.device = resolve_device(config.device)
        self.data = {k: getattr(data, k).to(self.device) for k in
                     ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")}
        n = len(self.data["X_train"])
        self.model = model.to(self.device)
        self.train_model = self.dist.wrap(self.model, config.sync_bn, config.norm)  # DDP under torchrun
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config.lr_decay)
        self.batch_order = torch.Generator().manual_seed(config.seed)
        # A fixed sample of the training set for the train-accuracy curve.
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 1))[:TRAIN_ACC_SAMPLES]
        self.train_sample = sample.to(self.device)
        self.iters_per_epoch = max(n // config.batch_size, 1)
        self.history = History()
        self.epoch = 0
        self.best_val_acc = -1.0
        self.best_state: dict[str, Tensor] = {}
        self.wall_time = 0.0
        if checkpoint is not None:
            self._load(checkpoint)
        # On resume, drop the events logged after the checkpoint (an interrupted epoch): those
        # at steps past it, or all of them when there was no checkpoint yet.
        purge = (self.step + 1 if checkpoint is not None else 0) if resume else None
        self.logger = RunLogger(run_dir, purge_step=purge) if self.dist.is_main else distributed.NoLogger()

    @property
    def step(self) -> int:
        return self.epoch * self.iters_per_epoch

    def _load(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.batch_order.set_state(ckpt["batch_order"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        if self.device == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        self.history = History(**ckpt["history"])
        self.epoch, self.best_val_acc, self.wall_time = ckpt["epoch"], ckpt["best_val_acc"], ckpt["wall_time"]
        self.best_state = ckpt["best_state"]

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        ckpt = {
            "config": asdict(self.config), "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "batch_order": self.batch_order.get_state(), "torch_rng": torch.get_rng_state(),
            "history": asdict(self.history), "best_val_acc": self.best_val_acc,
            "best_state": self.best_state, "wall_time": self.wall_time,
        }
        if self.device == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state()
        path = os.path.join(self.run_dir, CHECKPOINT)
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint or the new one

    def _evaluate(self) -> None:
        """The notebook's end-of-epoch check: accuracies, best-val weights, dashboard, checkpoint."""
        d = self.data
        train_acc = accuracy(self.model, d["X_train"][self.train_sample], d["y_train"][self.train_sample])
        val_acc = accuracy(self.model, d["X_val"], d["y_val"])
        lr = self.optimizer.param_groups[0]["lr"]
        self.history.train_acc.append(train_acc)
        self.history.val_acc.append(val_acc)
        self.history.lr.append(lr)
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self.logger.epoch(self.step, train_acc, val_acc, lr, norm_layers(self.model))

    def _train_epoch(self, bar) -> None:
        x, y = self.data["X_train"], self.data["y_train"]
        order = torch.randperm(len(x), generator=self.batch_order).to(self.device)
        bs = self.config.batch_size
        self.model.train()
        for i in range(self.iters_per_epoch):
            idx = self.dist.shard(order[i * bs:(i + 1) * bs])  # this rank's part of the global batch
            loss = self.dist.shard_loss(F.cross_entropy(self.train_model(x[idx]), y[idx], reduction="sum"), bs)
            if self.config.reg:
                loss = loss + l2_penalty(self.model, self.config.reg)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            value = self.dist.average(loss).item()  # the global batch's loss
            self.history.loss.append(value)
            self.logger.iteration(self.step + i + 1, value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{value:.3f}", val_acc=f"{self.history.val_acc[-1]:.3f}")
        self.scheduler.step()  # the notebook's lr decay, once per epoch

    def fit(self, on_epoch_end=None) -> dict:
        """Train to config.epochs; return (and write) the summary. on_epoch_end(trainer) runs after each
        epoch's checkpoint (tests use it to simulate an interruption)."""
        start = time.perf_counter()
        if self.epoch == 0 and not self.history.val_acc:
            self._evaluate()  # epoch 0: accuracies before training, as the notebook records them
        total = self.config.epochs * self.iters_per_epoch
        bar = tqdm(total=total, initial=self.step, desc=os.path.basename(self.run_dir.rstrip("/")),
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        try:
            while self.epoch < self.config.epochs:
                self._train_epoch(bar)
                self.epoch += 1
                self._evaluate()
                self.wall_time += time.perf_counter() - start
                start = time.perf_counter()
                self._save()
                if on_epoch_end is not None:
                    on_epoch_end(self)
        finally:
            bar.close()
        self.wall_time += time.perf_counter() - start
        return self._finish()

    def _finish(self) -> dict:
        self.model.load_state_dict(self.best_state)  # as the notebook: keep the best-val weights
        test_acc = accuracy(self.model, self.data["X_test"], self.data["y_test"])
        last = self.history.loss[-FINAL_LOSS_WINDOW:]
        summary = {
            "config": asdict(self.config),
            "num_train": len(self.data["X_train"]),
            "best_val_acc": self.best_val_acc,
            "final_train_acc": self.history.train_acc[-1],
            "best_train_acc": max(self.history.train_acc),
            "final_loss": sum(last) / len(last) if last else float("nan"),
            "test_acc": test_acc,
            "wall_time_s": self.wall_time,
            "device": (torch.cuda.get_device_name() if self.device == "cuda"
                       else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"),
            "versions": versions(),
            "history": asdict(self.history),
            **self.dist.describe(),
        }
        metrics = {"hparam/best_val_acc": self.best_val_acc, "hparam/final_train_acc": summary["final_train_acc"],
                   "hparam/test_acc": test_acc, "hparam/final_loss": summary["final_loss"]}
        self.logger.hparams(asdict(self.config), metrics, self.step)
        self.logger.close()
        if self.dist.is_main:
            with open(os.path.join(self.run_dir, SUMMARY), "w") as f:
                json.dump(summary, f, indent=1)
        return summary


def build_model(config: TrainConfig, input_dim: int) -> MLP:
    """The notebook's MLP for ``config``, initialized from ``config.seed`` (so every norm of a
    comparison starts from the same Linear weights)."""
    torch.manual_seed(config.seed)
    return MLP(input_dim, config.hidden_dims, NUM_CLASSES, config.norm, config.weight_scale, config.dropout)


def run(config: TrainConfig, data: CIFAR10Data, run_dir: str, *, progress: bool = True, resume: bool = False) -> dict:
    """Train the notebook's MLP for one run and return its summary; with resume, a finished run's
    summary is read back and an unfinished one continues from its checkpoint (whose stored config
    wins, except the device)."""
    done = os.path.join(run_dir, SUMMARY)
    if resume and os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        config = TrainConfig(**{**checkpoint["config"], "device": config.device})
    model = build_model(config, data.X_train[0].numel())
    return Trainer(config, model, data, run_dir, progress=progress, resume=resume, checkpoint=checkpoint).fit()
