"""Many runs of the notebook's MLP trained at once, as one vmapped program.

K runs that differ only in their initialization (weight scale) and normalization are K models of
one architecture: their parameters are stacked with ``torch.func.stack_module_state`` and every
step runs all of them, ``torch.vmap`` over :func:`torch_bn.func.functional_call` (which returns the
new batch-norm statistics instead of writing them). The optimizer (Adam by default) works
elementwise, so one optimizer over the stacked tensors is K independent optimizers. Every model
sees the same minibatches as its sequential run (the same seeded batch order), so each run ends
with the numbers :func:`cifar_bn.training.run` gives it, up to float32 rounding.

Work shared across the models: every model multiplies the same minibatch in its first layer, so
that layer is one matrix product for all of them (and its weight gradient another); evaluation
runs all models on the train sample and validation set in one pass; the losses of an epoch are
read back once; one checkpoint holds every model. Each run still gets its own folder with the
same TensorBoard tags, hparams row and ``summary.json`` as a sequential run.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, fields
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import torch_bn
from .dashboard import RunLogger
from .data import CIFAR10Data
from .training import (FINAL_LOSS_WINDOW, SUMMARY, TRAIN_ACC_SAMPLES, History, RunExistsError, TrainConfig,
                       build_model, build_optimizer, holds_run, resolve_device, versions)

CHECKPOINT = "vectorized_checkpoint.pt"  # in the experiment's root folder: every model's state
NORMS = ("torch_bn", "none")  # layers that run without side effects under vmap
SHARED_FIELDS = [f.name for f in fields(TrainConfig) if f.name not in ("norm", "weight_scale")]


def check_configs(configs: list[TrainConfig]) -> None:
    """Raise ValueError unless the configs can be trained together: same everything but norm and weight scale."""
    if not configs:
        raise ValueError("the vectorized trainer needs at least one config")
    for c in configs:
        for name in SHARED_FIELDS:
            if getattr(c, name) != getattr(configs[0], name):
                raise ValueError(f"vectorized runs must share {name} (got {getattr(configs[0], name)!r} and "
                                 f"{getattr(c, name)!r}); only norm and weight_scale may differ, so train the "
                                 f"others separately")
        if c.norm not in NORMS:
            raise ValueError(f"the vectorized trainer runs norm {' or '.join(NORMS)} (layers that return their "
                             f"statistics under vmap), got {c.norm!r}; train that run sequentially")
    if configs[0].dropout:
        raise ValueError("the vectorized trainer does not train with dropout (its random masks would differ from "
                         "the sequential runs'); use --dropout 0 or train sequentially")


class _Group:
    """The models of one norm: their stacked parameters and buffers past the first layer, and the
    vmapped functions that train and evaluate them."""

    def __init__(self, models: list[nn.Module], index: slice) -> None:
        self.index = index  # the group's models in the trainer's model order
        params, buffers = torch.func.stack_module_state([m.net[1:] for m in models])
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        # The stacked tensors are the parameters; the template only supplies the structure.
        self.template = models[0].net[1:]

        def loss(params: dict, buffers: dict, h: Tensor, y: Tensor):
            out, new_buffers = torch_bn.func.functional_call(self.template, {**params, **buffers}, (h,))
            return F.cross_entropy(out, y), new_buffers

        def logits(params: dict, buffers: dict, h: Tensor) -> Tensor:
            return torch_bn.func.functional_call(self.template, {**params, **buffers}, (h,))[0]

        # h: the first layer's output for every model, (N, K, H): batched along dim 1.
        self.loss = torch.vmap(loss, in_dims=(0, 0, 1, None))
        self.logits = torch.vmap(logits, in_dims=(0, 0, 1))

    def norm_layers(self, k: int) -> list[SimpleNamespace]:
        """Model k's batch-norm layers as (weight, bias, running_mean, running_var), as RunLogger reads them."""
        layers = [name for name, m in self.template.named_modules() if isinstance(m, torch_bn.BatchNorm1d)]
        pick = {**self.params, **self.buffers}
        return [SimpleNamespace(**{t: pick[f"{name}.{t}"][k].detach() for t in
                                   ("weight", "bias", "running_mean", "running_var")}) for name in layers]


class VectorizedTrainer:
    """Trains one run per config (same everything but ``norm`` and ``weight_scale``) at once on ``data``.

    Each run's model is built exactly as :func:`cifar_bn.training.run` builds it, and logs into its own
    folder of ``run_dirs`` with the same TensorBoard tags, hparams and summary; ``state_dir`` receives the
    one checkpoint of all models, written atomically every epoch. ``resume=True`` continues from that
    checkpoint (or starts over when there is none yet, dropping what was logged).

    Args:
        configs: one TrainConfig per run; norm "torch_bn" or "none".
        data: the data set; every model sees the same minibatches, in the order ``config.seed`` fixes.
        run_dirs: one folder per run (none may hold a run unless resuming).
        state_dir: the folder for the shared checkpoint.
        progress: one tqdm bar for all the models.

    Example::

        >>> configs = [TrainConfig(norm=n, weight_scale=s) for n in ("torch_bn", "none") for s in (1e-2, 1e-1)]
        >>> summaries = VectorizedTrainer(configs, data, [f"runs/x/{i}" for i in range(4)], "runs/x").fit()
    """

    def __init__(self, configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], state_dir: str, *,
                 progress: bool = True, resume: bool = False) -> None:
        check_configs(configs)
        if len(run_dirs) != len(configs):
            raise ValueError(f"one run folder per config: got {len(run_dirs)} folders for {len(configs)} configs")
        if not resume:
            taken = [d for d in run_dirs if holds_run(d)]
            if taken or os.path.exists(os.path.join(state_dir, CHECKPOINT)):
                raise RunExistsError(f"{(taken or [state_dir])[0]} already holds a run and runs are never "
                                     f"overwritten; choose another --run-name, or continue with --resume")
        # Models of one norm next to each other, so that each group is a slice of the first layer.
        self.order = sorted(range(len(configs)), key=lambda i: NORMS.index(configs[i].norm))
        self.configs = [configs[i] for i in self.order]
        self.run_dirs = [run_dirs[i] for i in self.order]
        self.config, self.state_dir, self.progress = self.configs[0], state_dir, progress
        self.device = resolve_device(self.config.device)
        self.data = {k: getattr(data, k).to(self.device).flatten(1) if k.startswith("X") else
                     getattr(data, k).to(self.device) for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")}
        n, dim = self.data["X_train"].shape

        models = [build_model(c, dim).to(self.device) for c in self.configs]
        # The first layer of every model, stacked: (M, H, D) and (M, H).
        self.first = {"weight": torch.stack([m.net[0].weight.detach() for m in models]).requires_grad_(),
                      "bias": torch.stack([m.net[0].bias.detach() for m in models]).requires_grad_()}
        self.groups = []
        for norm in NORMS:
            idx = [i for i, c in enumerate(self.configs) if c.norm == norm]
            if idx:
                self.groups.append(_Group([models[i] for i in idx], slice(idx[0], idx[-1] + 1)))
        params = list(self.first.values()) + [p for g in self.groups for p in g.params.values()]
        self.optimizer = build_optimizer(self.config, params)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.config.lr_decay)
        self.batch_order = torch.Generator().manual_seed(self.config.seed)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1))[:TRAIN_ACC_SAMPLES]
        self.train_sample = sample.to(self.device)
        self.iters_per_epoch = max(n // self.config.batch_size, 1)
        self.histories = [History() for _ in self.configs]
        self.epoch = 0
        self.best_val_acc = [-1.0] * len(self.configs)
        self.best = self._state()  # the best-val weights of every model, replaced at epoch 0
        self.wall_time = 0.0
        checkpoint = self._load_checkpoint() if resume else None
        if checkpoint is not None:
            self._load(checkpoint)
        purge = (self.step + 1 if checkpoint is not None else 0) if resume else None
        for d in self.run_dirs:
            os.makedirs(d, exist_ok=True)
        self.loggers = [RunLogger(d, purge_step=purge) for d in self.run_dirs]

    @property
    def step(self) -> int:
        return self.epoch * self.iters_per_epoch

    # ---- the models --------------------------------------------------------------------------

    def _first_layer(self, x: Tensor, first: dict[str, Tensor]) -> Tensor:
        """Every model's first Linear on the same x (N, D): one matrix product, (N, M, H)."""
        w, b = first["weight"], first["bias"]
        return torch.addmm(b.flatten(), x, w.flatten(0, 1).t()).view(len(x), *b.shape)

    def _train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step of every model on the minibatch (x, y); returns the losses (M,)."""
        h = self._first_layer(x, self.first)
        losses = []
        for g in self.groups:
            g.template.train()
            loss, g.buffers = g.loss(g.params, g.buffers, h[:, g.index], y)
            losses.append(loss)
        loss = torch.cat(losses)
        if self.config.reg:
            loss = loss + 0.5 * self.config.reg * self._weight_squares()
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # the models share no parameters: d sum / d theta_k = d loss_k / d theta_k
        self.optimizer.step()
        return loss.detach()

    def _weight_squares(self) -> Tensor:
        """Each model's sum of squared Linear weights (M,): the notebook's L2 penalty without 0.5 * reg."""
        out = self.first["weight"].square().sum((1, 2))
        rest = []
        for g in self.groups:
            linear = [p for name, p in g.params.items() if name.endswith("weight")
                      and isinstance(g.template.get_submodule(name.rpartition(".")[0]), nn.Linear)]
            rest.append(sum(p.square().flatten(1).sum(1) for p in linear))
        return out + torch.cat(rest)

    @torch.no_grad()
    def _accuracies(self, x: Tensor, labels: list[Tensor], state: dict) -> list[list[float]]:
        """Accuracy of every model, in eval mode with the weights in ``state``, on consecutive parts of x:
        one list (M,) per label tensor. One pass over x for all the models and parts."""
        h = self._first_layer(x, state["first"])
        preds = []
        for g, (params, buffers) in zip(self.groups, state["groups"]):
            g.template.eval()
            preds.append(g.logits(params, buffers, h[:, g.index]).argmax(-1))
        pred, out, start = torch.cat(preds), [], 0
        for y in labels:
            correct = (pred[:, start:start + len(y)] == y).sum(1).tolist()
            out.append([c / max(len(y), 1) for c in correct])
            start += len(y)
        return out

    def _state(self) -> dict:
        """A detached copy of every model's weights and buffers (stacked)."""
        return {"first": {k: v.detach().clone() for k, v in self.first.items()},
                "groups": [({k: v.detach().clone() for k, v in g.params.items()},
                            {k: v.clone() for k, v in g.buffers.items()}) for g in self.groups]}

    def _live(self) -> dict:
        return {"first": self.first, "groups": [(g.params, g.buffers) for g in self.groups]}

    # ---- epochs, evaluation, logging ---------------------------------------------------------

    def _evaluate(self, losses: list[list[float]]) -> None:
        """End of an epoch for every model: accuracies, best weights, and the epoch's losses and
        scalars in each run's dashboard."""
        d = self.data
        ys = d["y_train"][self.train_sample]
        train_acc, val_acc = self._accuracies(torch.cat([d["X_train"][self.train_sample], d["X_val"]]),
                                              [ys, d["y_val"]], self._live())
        lr = self.optimizer.param_groups[0]["lr"]
        improved = []
        for k, h in enumerate(self.histories):
            h.loss.extend(losses[k])
            h.train_acc.append(train_acc[k])
            h.val_acc.append(val_acc[k])
            h.lr.append(lr)
            if val_acc[k] > self.best_val_acc[k]:
                self.best_val_acc[k] = val_acc[k]
                improved.append(k)
        self._keep_best(improved)
        for g in self.groups:
            for k in range(g.index.start, g.index.stop):
                logger = self.loggers[k]
                for i, value in enumerate(losses[k]):
                    logger.iteration(self.step - len(losses[k]) + i + 1, value)
                logger.epoch(self.step, train_acc[k], val_acc[k], lr, g.norm_layers(k - g.index.start))

    def _keep_best(self, improved: list[int]) -> None:
        if not improved:
            return
        live, best = self._live(), self.best
        with torch.no_grad():
            for k, v in live["first"].items():
                best["first"][k][improved] = v[improved]
            for g, (params, buffers), (bp, bb) in zip(self.groups, live["groups"], best["groups"]):
                local = [k - g.index.start for k in improved if g.index.start <= k < g.index.stop]
                if local:
                    for name, v in {**params, **buffers}.items():
                        (bp if name in bp else bb)[name][local] = v[local]

    def _train_epoch(self, bar) -> list[list[float]]:
        x, y = self.data["X_train"], self.data["y_train"]
        order = torch.randperm(len(x), generator=self.batch_order).to(self.device)
        bs = self.config.batch_size
        losses = []
        for i in range(self.iters_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            losses.append(self._train_step(x[idx], y[idx]))
            if bar is not None:
                bar.update(1)
        self.scheduler.step()
        return torch.stack(losses).t().tolist()  # one read-back per epoch: (M, iterations)

    # ---- checkpoint --------------------------------------------------------------------------

    def _load_checkpoint(self) -> dict | None:
        path = os.path.join(self.state_dir, CHECKPOINT)
        return torch.load(path, map_location=self.device, weights_only=True) if os.path.isfile(path) else None

    def _save(self) -> None:
        ckpt = {"configs": [asdict(c) for c in self.configs], "order": self.order, "epoch": self.epoch,
                "state": self._state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "batch_order": self.batch_order.get_state(), "histories": [asdict(h) for h in self.histories],
                "best_val_acc": self.best_val_acc, "best": self.best, "wall_time": self.wall_time}
        path = os.path.join(self.state_dir, CHECKPOINT)
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint or the new one

    def _load(self, ckpt: dict) -> None:
        if ckpt["configs"] != [asdict(c) for c in self.configs]:
            raise ValueError(f"{os.path.join(self.state_dir, CHECKPOINT)} was written for other runs; resume "
                             f"with the launch that wrote it")
        with torch.no_grad():
            for k, v in ckpt["state"]["first"].items():
                self.first[k].copy_(v)
            for g, (params, buffers) in zip(self.groups, ckpt["state"]["groups"]):
                for k, v in params.items():
                    g.params[k].copy_(v)
                g.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.batch_order.set_state(ckpt["batch_order"])
        self.histories = [History(**h) for h in ckpt["histories"]]
        self.epoch, self.best_val_acc, self.wall_time = ckpt["epoch"], ckpt["best_val_acc"], ckpt["wall_time"]
        self.best = ckpt["best"]

    # ---- the run -----------------------------------------------------------------------------

    def fit(self, on_epoch_end=None) -> list[dict]:
        """Train every model to config.epochs; return (and write) one summary per run, in the order of the
        configs given. on_epoch_end(trainer) runs after each epoch's checkpoint (tests use it to simulate an
        interruption)."""
        start = time.perf_counter()
        if self.epoch == 0 and not self.histories[0].val_acc:
            self._evaluate([[] for _ in self.configs])  # epoch 0: accuracies before training
        total = self.config.epochs * self.iters_per_epoch
        bar = tqdm(total=total, initial=self.step, desc=f"{len(self.configs)} models", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        try:
            while self.epoch < self.config.epochs:
                losses = self._train_epoch(bar)
                self.epoch += 1
                self._evaluate(losses)
                bar.set_postfix(epoch=self.epoch, best_val_acc=f"{max(self.best_val_acc):.3f}")
                self.wall_time += time.perf_counter() - start
                start = time.perf_counter()
                self._save()
                if on_epoch_end is not None:
                    on_epoch_end(self)
        finally:
            bar.close()
        self.wall_time += time.perf_counter() - start
        summaries = self._finish()
        return [summaries[self.order.index(i)] for i in range(len(self.configs))]

    def _finish(self) -> list[dict]:
        """Test accuracy with the best-val weights (as the notebook), then each run's hparams and summary."""
        d = self.data
        (test_acc,) = self._accuracies(d["X_test"], [d["y_test"]], self.best)
        device = (torch.cuda.get_device_name() if self.device == "cuda"
                  else f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
        summaries = []
        for k, (config, h, logger) in enumerate(zip(self.configs, self.histories, self.loggers)):
            last = h.loss[-FINAL_LOSS_WINDOW:]
            summary = {
                "config": asdict(config), "num_train": len(d["X_train"]), "best_val_acc": self.best_val_acc[k],
                "final_train_acc": h.train_acc[-1], "best_train_acc": max(h.train_acc),
                "final_loss": sum(last) / len(last) if last else float("nan"), "test_acc": test_acc[k],
                "wall_time_s": self.wall_time, "vectorized_models": len(self.configs), "device": device,
                "versions": versions(), "history": asdict(h),
            }
            metrics = {"hparam/best_val_acc": self.best_val_acc[k], "hparam/final_train_acc": summary["final_train_acc"],
                       "hparam/test_acc": test_acc[k], "hparam/final_loss": summary["final_loss"]}
            logger.hparams(asdict(config), metrics, self.step)
            logger.close()
            with open(os.path.join(self.run_dirs[k], SUMMARY), "w") as f:
                json.dump(summary, f, indent=1)
            summaries.append(summary)
        return summaries


def run_many(configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], state_dir: str, *,
             progress: bool = True, resume: bool = False) -> list[dict]:
    """Train the runs together and return their summaries (in the order given); with resume, finished runs
    are read back and unfinished ones continue from the shared checkpoint."""
    done = [os.path.join(d, SUMMARY) for d in run_dirs]
    if resume and all(os.path.isfile(p) for p in done):
        out = []
        for p in done:
            with open(p) as f:
                out.append(json.load(f))
        return out
    return VectorizedTrainer(configs, data, run_dirs, state_dir, progress=progress, resume=resume).fit()


def load_state_dicts(state_dir: str) -> list[dict[str, Tensor]]:
    """Each model's state_dict (as ``MLP.state_dict()``) at the last checkpoint of the vectorized runs in
    state_dir, in the order of the configs they were launched with: a model of the batch can be loaded
    into an :class:`~cifar_bn.models.MLP` and used on its own."""
    ckpt = torch.load(os.path.join(state_dir, CHECKPOINT), map_location="cpu", weights_only=True)
    configs = [TrainConfig(**c) for c in ckpt["configs"]]
    state, out, pos_in_group = ckpt["state"], {}, 0
    groups = iter(state["groups"])
    params = buffers = None
    for pos, config in enumerate(configs):
        if pos == 0 or config.norm != configs[pos - 1].norm:  # the next group starts
            params, buffers = next(groups)
            pos_in_group = 0
        sd = {f"net.0.{k}": v[pos] for k, v in state["first"].items()}
        sd.update({f"net.{k}": v[pos_in_group] for k, v in {**params, **buffers}.items()})
        out[ckpt["order"][pos]] = sd
        pos_in_group += 1
    return [out[i] for i in range(len(configs))]
