"""The run lifecycle both trainers share: checks, schedule, epochs, checkpoints, summaries, resume.

A run trains on one CIFAR10Data, logs to its own folder (TensorBoard events, ``checkpoint`` every
epoch end, ``summary.json`` at the end) and can be resumed from its last epoch end. ``Lifecycle``
does all of that for K runs trained together on the same minibatches (K = 1 for
:class:`cifar_bn.training.Trainer`, K models stacked for
:class:`cifar_bn.vectorized.VectorizedTrainer`); a subclass supplies only what differs between
one model and a stack of models, in the methods marked "supplied by the trainer".

What every run shares, from ``config.seed``: the batch order, a fixed 1,000-image sample of the
training set for the train-accuracy curve, and the iterations at which accuracies are checked.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from .config import RENORM_DMAX, RENORM_RMAX, TrainConfig
from .dashboard import NoLogger, RunLogger
from .data import CIFAR10Data
from .runs import SUMMARY, RunExistsError, holds_run, keep_aside, read_json, save_checkpoint, write_json

TRAIN_ACC_SAMPLES = 1000  # the notebook checks training accuracy on 1,000 training images
# Accuracy checks (train sample and validation set, forward only) per epoch: this many, fewer
# where they would cost more than EVAL_COST_SHARE of the epoch's training compute (a forward
# pass costs about a third of a training step per image). The epoch end always checks.
CHECKS_PER_EPOCH = 10
EVAL_COST_SHARE = 0.15
LOG_EVERY = 10  # per-layer dashboard statistics every this many iterations
FINAL_LOSS_WINDOW = 100  # summary's final_loss: the mean loss of the last this many iterations
SPLITS = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")
RESUME_MAY_CHANGE = ("epochs", "device")  # what a resumed run may change of its checkpoint's configs


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


def resolve_device(device: str) -> str:
    """The device a config's "auto", "cpu" or "cuda" means here; ValueError for CUDA without one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return device


def device_name(device: str) -> str:
    """The device in words: the GPU's name, or the CPU's architecture, cores and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """The versions of Python and of every library a run's numbers depend on."""
    import matplotlib
    import numpy
    import tensorboard
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "tensorboard": tensorboard.__version__, "matplotlib": matplotlib.__version__}


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The torch.optim optimizer ``config.optimizer`` names, at ``config.lr``, with the notebook's settings."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    return torch.optim.RMSprop(params, lr=config.lr, alpha=0.99, eps=1e-8)  # the notebook's decay and eps


def checks_per_epoch(train_images: int, eval_images: int) -> int:
    """Accuracy checks per epoch: CHECKS_PER_EPOCH, fewer where evaluating eval_images (forward
    only) that often would cost more than EVAL_COST_SHARE of training on train_images; at least 1."""
    return max(1, min(CHECKS_PER_EPOCH, int(EVAL_COST_SHARE * 3 * train_images / max(eval_images, 1))))


def run_card(config: TrainConfig, num_train: int, device: str) -> str:
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


def read_back(run_dirs: list[str], epochs: int) -> list[dict] | None:
    """The resume read-back: the runs' summaries when every run finished with at least ``epochs``
    epochs; otherwise None, after keeping aside (as summary.<N>epochs.json) the summaries of runs
    finished with fewer, which continue from their checkpoints and write new ones at the end."""
    paths = [os.path.join(d, SUMMARY) for d in run_dirs]
    done = [read_json(p) if os.path.isfile(p) else None for p in paths]
    epochs_done = [s.get("epochs_done", s["config"]["epochs"]) if s is not None else -1 for s in done]
    if all(n >= epochs for n in epochs_done):
        return done
    for path, n in zip(paths, epochs_done):
        if n >= 0:
            keep_aside(path, f"{n}epochs")
    return None


class Lifecycle:
    """The lifecycle of K runs trained together; the base of both trainers (see the module's docstring).

    Args:
        configs: one TrainConfig per run; they share everything but what the models are built from.
        data: the three splits; at least one batch of training images and one validation image.
        run_dirs: one folder per run (created if missing); none may hold a run unless resuming.
        checkpoint_path: where the runs' one checkpoint is written at every epoch end.
        progress: a tqdm bar; log_every: per-layer dashboard statistics every this many iterations
            (0: none); is_main: whether this process writes files (rank 0 of a torchrun launch).
    """

    SHARED_WALL_TIME = False  # whether one wall time covers several models (said in the results card)

    def __init__(self, configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], checkpoint_path: str, *,
                 progress: bool, resume: bool, log_every: int, is_main: bool = True) -> None:
        if is_main and not resume:
            taken = [d for d in run_dirs if holds_run(d)] + [p for p in [checkpoint_path] if os.path.exists(p)]
            if taken:
                raise RunExistsError(f"{taken[0]} already holds a run and runs are never overwritten; choose "
                                     f"another --run-name, or continue it with --resume")
        config = configs[0]
        n, bs = len(data.X_train), config.batch_size
        if n < bs:
            raise ValueError(f"{n} training images are fewer than one batch of {bs}; "
                             f"use more training images (--num-train) or a smaller --batch-size")
        if len(data.X_val) < 1:
            raise ValueError("the validation set is empty; keep at least one validation image (--num-val)")
        self.configs, self.config, self.run_dirs, self.checkpoint_path = configs, config, run_dirs, checkpoint_path
        self.log_every, self.is_main, self.progress = log_every, is_main, progress and is_main
        self.num_train = n
        self.device = resolve_device(config.device)
        self.data = {k: getattr(data, k).to(self.device) for k in SPLITS}
        self.batch_order = torch.Generator().manual_seed(config.seed)
        # A fixed sample of the training set for the train-accuracy curve.
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 1))[:TRAIN_ACC_SAMPLES]
        self.train_sample = sample.to(self.device)
        self.iters_per_epoch = n // bs
        checks = checks_per_epoch(self.iters_per_epoch * bs, len(sample) + len(data.X_val))
        self.check_every = max(self.iters_per_epoch // checks, 1)  # more checks than iterations: every one
        self.histories = [History() for _ in configs]
        self.epoch = 0
        self.best_val_acc = [-1.0] * len(configs)
        self.wall_time = 0.0
        self.logging_time = 0.0  # seconds spent on the per-layer statistics and histograms, all models
        self.loggers: list = []

    def _open(self, checkpoint: dict | None, resume: bool) -> None:
        """Once the models and optimizer exist: restore ``checkpoint`` (None: a fresh start), and open
        each run's dashboard. On resume, the events logged after the checkpoint (an interrupted
        epoch) are dropped: those at steps past it, or all of them when there was no checkpoint yet."""
        if checkpoint is not None:
            self._load(checkpoint)
        purge = (self.step + 1 if checkpoint is not None else 0) if resume else None
        if self.is_main:
            for d in self.run_dirs:
                os.makedirs(d, exist_ok=True)
        self.loggers = [RunLogger(d, purge_step=purge) if self.is_main else NoLogger() for d in self.run_dirs]
        if checkpoint is None:
            for config, logger in zip(self.configs, self.loggers):
                logger.start(asdict(config), self.num_train, self.device, run_card(config, self.num_train, self.device))

    @property
    def step(self) -> int:
        """Iterations done: the step of the last epoch end."""
        return self.epoch * self.iters_per_epoch

    def checks_within_epoch(self, i: int) -> bool:
        """Whether iteration i (0-based) of an epoch ends with an accuracy check: every check_every
        iterations, but not within half an interval of the epoch end, which checks anyway."""
        return (i + 1) % self.check_every == 0 and i + 1 < self.iters_per_epoch - self.check_every // 2

    # ---- supplied by the trainer ---------------------------------------------------------------

    def _accuracies(self) -> tuple[list[float], list[float]]:
        """Every model's accuracy on the train sample and on the validation set."""
        raise NotImplementedError

    def _activation_stds(self) -> list[list[float]]:
        """Every model's std of each hidden layer's output on the train sample (models.activation_stds)."""
        raise NotImplementedError

    def _test_accuracies(self) -> list[float]:
        """Every model's test accuracy with its best-val weights (which the models then keep)."""
        raise NotImplementedError

    def _keep_best(self, improved: list[int]) -> None:
        """Keep the current weights of the models ``improved`` (indices) as their best-val weights."""
        raise NotImplementedError

    def _train_step(self, idx: Tensor, step: int, probe: bool) -> None:
        """One optimizer step of every model on the training images ``idx`` (the global batch); with
        probe, the per-layer dashboard statistics of this step."""
        raise NotImplementedError

    def _log_epoch(self, lr: float) -> None:
        """The epoch's scalars and histograms in each run's dashboard."""
        raise NotImplementedError

    def _models_state(self) -> dict:
        """The models' part of the checkpoint: weights, buffers and best-val weights."""
        raise NotImplementedError

    def _load_models(self, state: dict) -> None:
        """Restore what :meth:`_models_state` returned."""
        raise NotImplementedError

    def _epoch_begins(self) -> None:
        """Before an epoch's first step."""

    def _epoch_ends(self) -> None:
        """After an epoch's last step, before the lr decay."""

    def _postfix(self) -> dict[str, str]:
        """What the progress bar shows besides the epoch."""
        return {}

    def _summary_extra(self) -> dict:
        """Keys every summary adds to the common ones."""
        return {}

    def _close(self) -> None:
        """After the summaries are written."""

    # ---- the lifecycle -------------------------------------------------------------------------

    def _check(self, step: int) -> tuple[list[float], list[float]]:
        """Every model's accuracy on the fixed train sample and the validation set, logged at ``step``."""
        train_acc, val_acc = self._accuracies()
        for k, (h, logger) in enumerate(zip(self.histories, self.loggers)):
            h.check_step.append(step)
            h.check_train_acc.append(train_acc[k])
            h.check_val_acc.append(val_acc[k])
            logger.accuracy(step, train_acc[k], val_acc[k])
        return train_acc, val_acc

    def _evaluate(self) -> None:
        """The notebook's end-of-epoch check: accuracies, best-val weights, the epoch's dashboard."""
        train_acc, val_acc = self._check(self.step)
        lr = self.optimizer.param_groups[0]["lr"]
        improved = []
        for k, h in enumerate(self.histories):
            h.train_acc.append(train_acc[k])
            h.val_acc.append(val_acc[k])
            h.lr.append(lr)
            if val_acc[k] > self.best_val_acc[k]:
                self.best_val_acc[k] = val_acc[k]
                improved.append(k)
        if improved:
            self._keep_best(improved)
        start = time.perf_counter()
        self._log_epoch(lr)
        self.logging_time += time.perf_counter() - start

    def epoch_loss(self, k: int) -> float | None:
        """Run k's mean loss over the epoch just ended (None before training)."""
        losses = self.histories[k].loss[-self.iters_per_epoch:] if self.epoch > 0 else []
        return sum(losses) / len(losses) if losses else None

    def _train_epoch(self, bar) -> None:
        order = torch.randperm(len(self.data["X_train"]), generator=self.batch_order).to(self.device)
        bs = self.config.batch_size
        self._epoch_begins()
        for i in range(self.iters_per_epoch):
            step = self.step + i + 1
            self._train_step(order[i * bs:(i + 1) * bs], step, self.log_every > 0 and step % self.log_every == 0)
            if self.checks_within_epoch(i):
                self._check(step)  # between epoch ends; the epoch end's check is _evaluate's
            bar.update(1)
            if self.progress:
                bar.set_postfix(epoch=self.epoch + 1, **self._postfix())
        self._epoch_ends()
        self.scheduler.step()  # the notebook's lr decay, once per epoch

    def _save(self) -> None:
        """The checkpoint of every run at this epoch end (rank 0 only), atomically."""
        if not self.is_main:
            return
        checkpoint = {
            "configs": [asdict(c) for c in self.configs], "epoch": self.epoch, "models": self._models_state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "batch_order": self.batch_order.get_state(), "torch_rng": torch.get_rng_state(),
            "histories": [asdict(h) for h in self.histories], "best_val_acc": self.best_val_acc,
            "wall_time": self.wall_time, "logging_time": self.logging_time,
        }
        if self.device == "cuda":
            checkpoint["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(self.checkpoint_path, checkpoint)

    def _load(self, checkpoint: dict) -> None:
        def fixed(configs: list[dict]) -> list[dict]:
            return [{k: v for k, v in c.items() if k not in RESUME_MAY_CHANGE} for c in configs]

        if fixed(checkpoint["configs"]) != fixed([asdict(c) for c in self.configs]):
            raise ValueError(f"{self.checkpoint_path} was written for other runs; resume with the launch that "
                             f"wrote it")
        self._load_models(checkpoint["models"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.batch_order.set_state(checkpoint["batch_order"])
        torch.set_rng_state(checkpoint["torch_rng"])  # dropout draws from the global generator
        if self.device == "cuda" and "cuda_rng" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"])
        self.histories = [History(**h) for h in checkpoint["histories"]]
        self.epoch, self.best_val_acc = checkpoint["epoch"], list(checkpoint["best_val_acc"])
        self.wall_time, self.logging_time = checkpoint["wall_time"], checkpoint["logging_time"]

    def _fit(self, on_epoch_end=None, label: str = "") -> list[dict]:
        """Train to config.epochs; return (and write) each run's summary. on_epoch_end(trainer) runs
        after each epoch's checkpoint (tests use it to simulate an interruption)."""
        start = time.perf_counter()
        if self.epoch == 0 and not self.histories[0].val_acc:
            for h, stds in zip(self.histories, self._activation_stds()):
                h.activation_std_init = stds
            self._evaluate()  # epoch 0: accuracies before training, as the notebook records them
        bar = tqdm(total=self.config.epochs * self.iters_per_epoch, initial=self.step, desc=label,
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
            for logger in self.loggers:  # interrupted or not, the events logged so far are on disk
                logger.flush()
        self.wall_time += time.perf_counter() - start
        return self._finish()

    def _finish(self) -> list[dict]:
        """Activation stds of the trained models, test accuracy with the best-val weights (as the
        notebook), then each run's results card and summary."""
        activation_std_final = self._activation_stds()
        test_acc = self._test_accuracies()
        device = device_name(self.device)
        time_for = f" for all {len(self.configs)} models" if self.SHARED_WALL_TIME else ""
        summaries = []
        for k, (config, h, logger) in enumerate(zip(self.configs, self.histories, self.loggers)):
            last = h.loss[-FINAL_LOSS_WINDOW:]
            summary = {
                "config": asdict(config), "num_train": self.num_train, "epochs_done": self.epoch,
                "best_val_acc": self.best_val_acc[k], "final_train_acc": h.train_acc[-1],
                "best_train_acc": max(h.train_acc), "final_loss": sum(last) / len(last) if last else float("nan"),
                "test_acc": test_acc[k], "wall_time_s": self.wall_time, "logging_time_s": self.logging_time,
                "device": device, "versions": versions(),
                "activation_std": {"init": h.activation_std_init, "final": activation_std_final[k]},
                "history": asdict(h), **self._summary_extra(),
            }
            logger.text("results", f"After {self.epoch} epochs: final train acc {summary['final_train_acc']:.3f}, "
                                   f"best val acc {self.best_val_acc[k]:.3f}, test acc (best-val weights) "
                                   f"{test_acc[k]:.3f}, final loss {summary['final_loss']:.3f}; "
                                   f"{self.wall_time:.1f} s{time_for} on {device}.", self.step)
            logger.close()
            if self.is_main:
                write_json(os.path.join(self.run_dirs[k], SUMMARY), summary)
            summaries.append(summary)
        self._close()
        return summaries
