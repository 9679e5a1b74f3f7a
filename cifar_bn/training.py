"""The training loop: the notebook's Solver rebuilt from torch.optim, with checkpoints and resume.

One run = one classifier trained on one CIFAR10Data, logged to one run folder:
``checkpoint.pt`` (every epoch, atomically), TensorBoard events, and ``summary.json`` at the end.
``Trainer`` trains whatever model it is given; ``run`` builds the notebook's MLP for a config.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import distributed
from .dashboard import LayerProbe, RunLogger
from .data import NUM_CLASSES, CIFAR10Data
from .models import MLP, RENORM_DMAX, RENORM_RMAX, activation_stds, canonical_norm, check_norm_options, l2_penalty

OPTIMIZERS = ("adam", "sgd", "sgd_momentum", "rmsprop")
DEVICES = ("auto", "cpu", "cuda")
TRAIN_ACC_SAMPLES = 1000  # the notebook checks training accuracy on 1,000 training images
# Accuracy checks (train sample and validation set, forward only) per epoch: this many, fewer
# where they would cost more than EVAL_COST_SHARE of the epoch's training compute (a forward
# pass costs about a third of a training step per image). The epoch end always checks.
CHECKS_PER_EPOCH = 10
EVAL_COST_SHARE = 0.15
LOG_EVERY = 10  # per-layer dashboard statistics every this many iterations
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
    virtual_batch_size: int | None = None  # norm "ghost": statistics over chunks of this many samples
    renorm_warmup: int | None = None  # norm "renorm": steps of plain batch norm first (None: one epoch)

    def __post_init__(self) -> None:
        """Check every field, so that a bad configuration fails before anything is written."""
        self.norm = canonical_norm(self.norm)
        self.hidden_dims = tuple(self.hidden_dims)
        if not self.hidden_dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.hidden_dims):
            raise ValueError(f"hidden_dims must be one or more positive layer widths such as 100,100,100, "
                             f"got {','.join(map(str, self.hidden_dims)) or 'none'}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.weight_scale is not None and not (math.isfinite(self.weight_scale) and self.weight_scale > 0):
            raise ValueError(f"weight_scale is the std of the initial Linear weights and must be positive "
                             f"(leave it out for PyTorch's init), got {self.weight_scale}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is the probability of zeroing an activation and must be in [0, 1), "
                             f"got {self.dropout}")
        if not (math.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"reg (the L2 penalty) must be zero or positive, got {self.reg}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        check_norm_options(self.norm, self.virtual_batch_size, self.renorm_warmup or 0)
        if self.renorm_warmup is not None and self.norm != "renorm":
            raise ValueError(f"a renormalization warm-up is batch renormalization's (--norm renorm), but norm is "
                             f"{self.norm!r}; drop --renorm-warmup or use --norm renorm")
        if self.virtual_batch_size is not None:
            if self.virtual_batch_size > self.batch_size:
                raise ValueError(f"--virtual-batch-size {self.virtual_batch_size} is larger than the batch of "
                                 f"{self.batch_size}; ghost batch norm splits each batch into chunks of that size "
                                 f"(one chunk of the whole batch is --norm torch_bn)")
            if self.batch_size % self.virtual_batch_size == 1:
                raise ValueError(f"batch {self.batch_size} in chunks of {self.virtual_batch_size} leaves a last "
                                 f"chunk of one sample, which has no variance; choose a virtual batch size that "
                                 f"divides the batch (or leaves at least 2)")

    def resolved(self, num_train: int) -> "TrainConfig":
        """This config with the defaults that depend on the data made explicit: batch
        renormalization's warm-up None becomes one epoch's iterations (num_train // batch_size)."""
        if self.norm == "renorm" and self.renorm_warmup is None:
            return replace(self, renorm_warmup=num_train // self.batch_size)
        return self


@dataclass
class History:
    """Per-iteration training loss; per-epoch accuracies and lr (index 0: before training); every
    accuracy check (several per epoch, the epoch ends included) with its iteration; the std of
    each hidden layer's output at initialization."""

    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    check_step: list[int] = field(default_factory=list)
    check_train_acc: list[float] = field(default_factory=list)
    check_val_acc: list[float] = field(default_factory=list)
    activation_std_init: list[float] = field(default_factory=list)


def holds_run(run_dir: str) -> bool:
    """Whether run_dir already has a run's files (checkpoint, summary or TensorBoard events)."""
    return os.path.isdir(run_dir) and any(
        f in (CHECKPOINT, SUMMARY) or f.startswith("events.out.tfevents") for f in os.listdir(run_dir))


def resolve_device(device: str) -> str:
    """The device a config's "auto", "cpu" or "cuda" means here; ValueError for CUDA without one."""
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
    import matplotlib
    import numpy
    import tensorboard
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "tensorboard": tensorboard.__version__, "matplotlib": matplotlib.__version__}


def device_name(device: str) -> str:
    """The device in words: the GPU's name, or the CPU's architecture, cores and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def checks_per_epoch(train_images: int, eval_images: int) -> int:
    """Accuracy checks per epoch: CHECKS_PER_EPOCH, fewer where evaluating eval_images (forward
    only) that often would cost more than EVAL_COST_SHARE of training on train_images; at least 1."""
    return max(1, min(CHECKS_PER_EPOCH, int(EVAL_COST_SHARE * 3 * train_images / max(eval_images, 1))))


def run_card(config: "TrainConfig", num_train: int, device: str) -> str:
    """The run's text card: what it trains and how to read its dashboard."""
    norm = {"torch_bn": "torch_bn.BatchNorm1d", "nn": "nn.BatchNorm1d", "none": "no normalization",
            "renorm": f"torch_bn.BatchRenorm1d (rmax {RENORM_RMAX:g}, dmax {RENORM_DMAX:g}, plain batch norm for "
                      f"the first {config.renorm_warmup} steps)",
            "ghost": f"torch_bn.GhostBatchNorm1d (statistics over chunks of {config.virtual_batch_size} samples)",
            "layernorm": "nn.LayerNorm (statistics over each sample's features)"}[config.norm]
    init = "PyTorch's default init" if config.weight_scale is None else f"weights ~ N(0, {config.weight_scale:.3g}^2)"
    return (f"**{norm}**: MLP 3072-{'-'.join(map(str, config.hidden_dims))}-10, {init}, {config.optimizer} "
            f"lr {config.lr:g}, batch {config.batch_size}, {config.epochs} epochs on {num_train} images, seed "
            f"{config.seed}, {device}.\n\n"
            f"Scalars: `loss/*` and `accuracy/*` (train = a fixed 1,000-image sample, checked several times per "
            f"epoch; the best-val weights are tested at the end). `layer<i>/pre_norm_*` is the Linear output, "
            f"`layer<i>/post_norm_*` the batch norm's (absent without normalization): with batch norm the "
            f"post-norm std stays near its gamma at every depth whatever the pre-norm scale; without it the "
            f"Linear outputs shrink or grow layer by layer; Custom Scalars shows each layer's pre- and post-norm "
            f"mean and std on one chart, one scale. `layer<i>/weight_grad_norm`: how large an update "
            f"each layer gets. Histograms: the same outputs per epoch, and the batch-norm tensors.")


def load_checkpoint(run_dir: str) -> dict | None:
    """The run folder's checkpoint, or None when it has none yet."""
    path = os.path.join(run_dir, CHECKPOINT)
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None


class Trainer:
    """Trains ``model`` (any classifier of CIFAR-10 images) per ``config`` on ``data``, logging to
    ``run_dir``.

    A new run needs a folder that holds no run yet; ``resume=True`` continues the folder's run
    from ``checkpoint`` (from :func:`load_checkpoint`; None: start over, dropping what was logged):
    model, optimizer, generators and history are restored from it, and ``config.epochs`` may be
    larger than the checkpoint's to extend a finished run. ``config.seed`` fixes the batch order
    and the train-accuracy sample; the model's initialization is the caller's (see :func:`run`).
    ``log_every``: per-layer dashboard statistics every this many iterations (0: none).

    Args:
        config: the run's settings (TrainConfig).
        model: the classifier to train; moved to the config's device.
        data: the three splits (CIFAR10Data); at least one batch of training images.
        run_dir: the run's folder (created if missing).

    Examples:
        >>> trainer = Trainer(TrainConfig(norm="torch_bn"), build_model(TrainConfig(norm="torch_bn"), 3072),
        ...                   data, "runs/bn")  # doctest: +SKIP
        >>> summary = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module, data: CIFAR10Data, run_dir: str, *,
                 progress: bool = True, resume: bool = False, checkpoint: dict | None = None,
                 log_every: int = LOG_EVERY) -> None:
        self.dist = distributed.current()  # rank 0 of 1 without torchrun; only rank 0 writes files
        if self.dist.is_main and not resume and holds_run(run_dir):
            raise RunExistsError(f"run folder {run_dir} already holds a run and runs are never overwritten; "
                                 f"choose another --run-name, or continue it with --resume")
        n = len(data.X_train)
        if n < config.batch_size:
            raise ValueError(f"{n} training images are fewer than one batch of {config.batch_size}; "
                             f"use more training images (--num-train) or a smaller --batch-size")
        if len(data.X_val) < 1:
            raise ValueError("the validation set is empty; keep at least one validation image (--num-val)")
        self.device = resolve_device(config.device)
        if self.dist.is_main:
            os.makedirs(run_dir, exist_ok=True)
        self.config, self.run_dir, self.log_every = config, run_dir, log_every
        self.progress = progress and self.dist.is_main
        self.data = {k: getattr(data, k).to(self.device) for k in
                     ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")}
        self.model = model.to(self.device)
        self.train_model = self.dist.wrap(self.model, config.sync_bn, config.norm)  # DDP under torchrun
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config.lr_decay)
        self.batch_order = torch.Generator().manual_seed(config.seed)
        # A fixed sample of the training set for the train-accuracy curve.
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 1))[:TRAIN_ACC_SAMPLES]
        self.train_sample = sample.to(self.device)
        self.iters_per_epoch = n // config.batch_size
        checks = checks_per_epoch(self.iters_per_epoch * config.batch_size, len(sample) + len(data.X_val))
        self.check_every = max(self.iters_per_epoch // checks, 1)  # more checks than iterations: every one
        self.history = History()
        self.epoch = 0
        self.best_val_acc = -1.0
        self.best_state: dict[str, Tensor] = {}
        self.wall_time = 0.0
        self.logging_time = 0.0  # seconds spent on the per-layer statistics and histograms
        if checkpoint is not None:
            self._load(checkpoint)
        # On resume, drop the events logged after the checkpoint (an interrupted epoch): those
        # at steps past it, or all of them when there was no checkpoint yet.
        purge = (self.step + 1 if checkpoint is not None else 0) if resume else None
        self.logger = RunLogger(run_dir, purge_step=purge) if self.dist.is_main else distributed.NoLogger()
        self.probe = LayerProbe(self.model)
        if checkpoint is None:
            self.logger.start(asdict(config), n, self.device, run_card(config, n, self.device))

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
        self.logging_time = ckpt.get("logging_time", 0.0)
        self.best_state = ckpt["best_state"]

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        ckpt = {
            "config": asdict(self.config), "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "batch_order": self.batch_order.get_state(), "torch_rng": torch.get_rng_state(),
            "history": asdict(self.history), "best_val_acc": self.best_val_acc,
            "best_state": self.best_state, "wall_time": self.wall_time, "logging_time": self.logging_time,
        }
        if self.device == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state()
        path = os.path.join(self.run_dir, CHECKPOINT)
        try:
            torch.save(ckpt, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint or the new one
        finally:
            if os.path.exists(path + ".tmp"):  # interrupted while writing: the old checkpoint stands
                os.remove(path + ".tmp")

    def _check(self, step: int) -> tuple[float, float]:
        """Accuracy on the fixed train sample and the validation set, logged at ``step``."""
        d = self.data
        train_acc = accuracy(self.model, d["X_train"][self.train_sample], d["y_train"][self.train_sample])
        val_acc = accuracy(self.model, d["X_val"], d["y_val"])
        self.history.check_step.append(step)
        self.history.check_train_acc.append(train_acc)
        self.history.check_val_acc.append(val_acc)
        self.logger.accuracy(step, train_acc, val_acc)
        return train_acc, val_acc

    def _evaluate(self) -> None:
        """The notebook's end-of-epoch check: accuracies, best-val weights, dashboard, checkpoint."""
        train_acc, val_acc = self._check(self.step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.history.train_acc.append(train_acc)
        self.history.val_acc.append(val_acc)
        self.history.lr.append(lr)
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        epoch_losses = self.history.loss[-self.iters_per_epoch:] if self.epoch > 0 else []
        start = time.perf_counter()
        self.logger.epoch(self.step, lr, sum(epoch_losses) / len(epoch_losses) if epoch_losses else None,
                          self.best_val_acc, self.probe)
        self.logging_time += time.perf_counter() - start

    def _train_epoch(self, bar) -> None:
        x, y = self.data["X_train"], self.data["y_train"]
        order = torch.randperm(len(x), generator=self.batch_order).to(self.device)
        bs = self.config.batch_size
        self.model.train()
        for i in range(self.iters_per_epoch):
            step = self.step + i + 1
            self.probe.armed = self.log_every > 0 and step % self.log_every == 0
            idx = self.dist.shard(order[i * bs:(i + 1) * bs])  # this rank's part of the global batch
            loss = self.dist.shard_loss(F.cross_entropy(self.train_model(x[idx]), y[idx], reduction="sum"), bs)
            if self.config.reg:
                loss = loss + l2_penalty(self.model, self.config.reg)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.probe.armed:
                self.probe.armed = False
                start = time.perf_counter()
                self.logger.scalars(self.probe.stats(), step)
                self.logging_time += time.perf_counter() - start
            self.optimizer.step()
            value = self.dist.average(loss).item()  # the global batch's loss
            self.history.loss.append(value)
            self.logger.iteration(step, value)
            if (i + 1) % self.check_every == 0 and i + 1 < self.iters_per_epoch - self.check_every // 2:
                self._check(step)  # between epoch ends; the epoch end's check is _evaluate's
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{value:.3f}", val_acc=f"{self.history.check_val_acc[-1]:.3f}")
        self.scheduler.step()  # the notebook's lr decay, once per epoch

    def fit(self, on_epoch_end=None) -> dict:
        """Train to config.epochs; return (and write) the summary. on_epoch_end(trainer) runs after each
        epoch's checkpoint (tests use it to simulate an interruption)."""
        start = time.perf_counter()
        if self.epoch == 0 and not self.history.val_acc:
            d = self.data
            self.history.activation_std_init = activation_stds(self.model, d["X_train"][self.train_sample])
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
            self.logger.flush()  # interrupted or not, the events logged so far are on disk
        self.wall_time += time.perf_counter() - start
        return self._finish()

    def _finish(self) -> dict:
        d = self.data
        activation_std_final = activation_stds(self.model, d["X_train"][self.train_sample])
        self.model.load_state_dict(self.best_state)  # as the notebook: keep the best-val weights
        test_acc = accuracy(self.model, d["X_test"], d["y_test"])
        last = self.history.loss[-FINAL_LOSS_WINDOW:]
        summary = {
            "config": asdict(self.config),
            "num_train": len(d["X_train"]),
            "epochs_done": self.epoch,
            "best_val_acc": self.best_val_acc,
            "final_train_acc": self.history.train_acc[-1],
            "best_train_acc": max(self.history.train_acc),
            "final_loss": sum(last) / len(last) if last else float("nan"),
            "test_acc": test_acc,
            "wall_time_s": self.wall_time,
            "logging_time_s": self.logging_time,
            "device": device_name(self.device),
            "versions": versions(),
            "activation_std": {"init": self.history.activation_std_init, "final": activation_std_final},
            "history": asdict(self.history),
            **self.dist.describe(),
        }
        self.logger.text("results", f"After {self.epoch} epochs: final train acc {summary['final_train_acc']:.3f}, "
                                    f"best val acc {self.best_val_acc:.3f}, test acc (best-val weights) "
                                    f"{test_acc:.3f}, final loss {summary['final_loss']:.3f}; "
                                    f"{self.wall_time:.1f} s on {summary['device']}.", self.step)
        self.logger.close()
        self.probe.remove()
        if self.dist.is_main:
            path = os.path.join(self.run_dir, SUMMARY)
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(path + ".tmp", path)
        return summary


def build_model(config: TrainConfig, input_dim: int) -> MLP:
    """The notebook's MLP for ``config``, initialized from ``config.seed`` (so every norm of a
    comparison starts from the same Linear weights)."""
    torch.manual_seed(config.seed)
    return MLP(input_dim, config.hidden_dims, NUM_CLASSES, config.norm, config.weight_scale, config.dropout,
               virtual_batch_size=config.virtual_batch_size, renorm_warmup=config.renorm_warmup or 0)


def keep_aside(path: str, label: str) -> str:
    """Rename ``path`` to ``<stem>.<label>[.k]<ext>`` (never over an existing file); return the new path."""
    stem, ext = os.path.splitext(path)
    new, k = f"{stem}.{label}{ext}", 1
    while os.path.exists(new):
        new, k = f"{stem}.{label}.{k}{ext}", k + 1
    os.replace(path, new)
    return new


def run(config: TrainConfig, data: CIFAR10Data, run_dir: str, *, progress: bool = True, resume: bool = False,
        log_every: int = LOG_EVERY) -> dict:
    """Train the notebook's MLP for one run and return its summary.

    With resume, the run's checkpoint holds its settings (they win, except the device and the
    number of epochs): a run finished with at least config.epochs epochs is read back; otherwise
    it continues from its checkpoint to config.epochs (a finished run's summary is kept aside as
    summary.<N>epochs.json and a new one written at the end)."""
    done = os.path.join(run_dir, SUMMARY)
    if resume and os.path.isfile(done):
        with open(done) as f:
            summary = json.load(f)
        epochs_done = summary.get("epochs_done", summary["config"]["epochs"])
        if epochs_done >= config.epochs:
            return summary
        keep_aside(done, f"{epochs_done}epochs")
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        config = TrainConfig(**{**checkpoint["config"], "device": config.device,
                                "epochs": max(config.epochs, checkpoint["epoch"])})
    config = config.resolved(len(data.X_train))
    model = build_model(config, data.X_train[0].numel())
    return Trainer(config, model, data, run_dir, progress=progress, resume=resume, checkpoint=checkpoint,
                   log_every=log_every).fit()
