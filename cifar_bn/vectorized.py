"""Many runs of the notebook's MLP trained at once, as one vmapped program.

K runs that differ only in their initialization (weight scale) and normalization are K models of
one architecture: their parameters are stacked with ``torch.func.stack_module_state`` and every
step runs all of them, ``torch.vmap`` over :func:`torch_bn.func.functional_call` (which returns the
new batch-norm statistics instead of writing them). The optimizer (Adam by default) works
elementwise, so one optimizer over the stacked tensors is K independent optimizers. Every model
sees the same minibatches as its sequential run (the same seeded batch order), so each run ends
with the numbers :func:`cifar_bn.training.run` gives it, up to float32 rounding.

Work shared across the models: every model multiplies the same minibatch in its first layer, so
that layer is one matrix product for all of them (and its weight gradient another); accuracy
checks run all models on the train sample and validation set in one pass; the dashboard's
per-layer statistics come out of the vmapped forward as stacked tensors (all models' means, stds
and gradient norms in a few tensor ops and one read-back); the losses of an epoch are read back
once; one checkpoint holds every model. Each run still gets its own folder with the same
TensorBoard tags, hparams, text cards and ``summary.json`` as a sequential run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import torch_bn
from .dashboard import BN_TENSORS, RunLogger, bn_histogram, histogram_protos
from .data import CIFAR10Data
from .models import hidden_layers
from .training import (FINAL_LOSS_WINDOW, LOG_EVERY, SUMMARY, TRAIN_ACC_SAMPLES, History, RunExistsError,
                       TrainConfig, build_model, build_optimizer, checks_per_epoch, device_name, holds_run,
                       resolve_device, run_card, versions)

CHECKPOINT = "vectorized_checkpoint.pt"  # in the experiment's root folder: every model's state
NORMS = ("torch_bn", "none")  # layers that run without side effects under vmap
SHARED_FIELDS = [f.name for f in fields(TrainConfig) if f.name not in ("norm", "weight_scale")]
PROBED = ("pre_norm", "post_norm")  # the outputs the dashboard's per-layer statistics describe


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


def build_stacked_optimizer(config: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    """The optimizer :func:`~cifar_bn.training.build_optimizer` gives ``config``, in its fused form
    where torch has one (Adam, SGD): one pass over each stacked tensor instead of one per operation
    (about 8x faster on the sweep's 40 stacked first layers at one thread). Elementwise as the
    per-model optimizers, so the same update up to float32 rounding."""
    optimizer = build_optimizer(config, params)
    if "fused" not in optimizer.defaults:  # RMSprop
        return optimizer
    return type(optimizer)(params, **{**optimizer.defaults, "foreach": None, "fused": True})


class _Group:
    """The models of one norm: their stacked parameters and buffers past the first layer, and the
    vmapped functions that train and evaluate them.

    Forward hooks on the template's modules hand the hidden layers' outputs out of the vmapped
    forward when asked for (``kinds``): ``pre_norm`` (Linear output; the first layer's is outside
    the group), ``post_norm`` (batch-norm output) and ``activation`` (ReLU output), keyed
    ``(layer, kind)`` with layers numbered from 1, as :class:`~cifar_bn.dashboard.LayerProbe` numbers
    them; they come back stacked, (K, N, H).
    """

    def __init__(self, models: list[nn.Module], index: slice) -> None:
        self.index = index  # the group's models in the trainer's model order
        params, buffers = torch.func.stack_module_state([m.net[1:] for m in models])
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        # The stacked tensors are the parameters; the template only supplies the structure.
        self.template = models[0].net[1:]
        self.layers = hidden_layers(models[0])
        self.norm_names = [self._name(layer.norm) for layer in self.layers] if self.layers[0].norm is not None else []
        self.linear_weights = [f"{self._name(m)}.weight" for m in self.template if isinstance(m, nn.Linear)]
        self._captured: dict[tuple[int, str], Tensor] | None = None
        self._kinds: tuple[str, ...] = ()
        for i, layer in enumerate(self.layers, 1):
            taps = [(layer.norm, "post_norm"), (layer.activation, "activation")]
            if i > 1:
                taps.append((layer.linear, "pre_norm"))
            for module, kind in taps:
                if module is not None:
                    module.register_forward_hook(self._tap((i, kind)))

        def forward(params: dict, buffers: dict, h: Tensor, kinds: tuple[str, ...]):
            self._captured, self._kinds = {}, kinds
            try:
                out, new_buffers = torch_bn.func.functional_call(self.template, {**params, **buffers}, (h,))
                return out, new_buffers, self._captured
            finally:
                self._captured = None

        def loss(params: dict, buffers: dict, h: Tensor, y: Tensor, kinds: tuple[str, ...]):
            out, new_buffers, captured = forward(params, buffers, h, kinds)
            return F.cross_entropy(out, y), new_buffers, captured

        # h: the first layer's output for every model, (N, K, H): batched along dim 1.
        self.loss = {kinds: torch.vmap(partial(loss, kinds=kinds), in_dims=(0, 0, 1, None)) for kinds in ((), PROBED)}
        self.forward = {kinds: torch.vmap(partial(forward, kinds=kinds), in_dims=(0, 0, 1))
                        for kinds in ((), ("activation",))}

    def _name(self, module: nn.Module) -> str:
        return next(name for name, m in self.template.named_modules() if m is module)

    def _tap(self, key: tuple[int, str]):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self._captured is not None and key[1] in self._kinds:
                self._captured[key] = output
        return hook

    def logits(self, params: dict, buffers: dict, h: Tensor) -> Tensor:
        return self.forward[()](params, buffers, h)[0]

    def norm_tensors(self) -> dict[str, Tensor]:
        """The batch-norm tensors RunLogger.epoch histograms, stacked (K, H), by their tag in a run's
        dashboard (as :func:`~cifar_bn.dashboard.bn_histogram` makes them); none without batch norm."""
        pick = {**self.params, **self.buffers}
        tensors = {}
        for i, name in enumerate(self.norm_names, 1):
            for t in BN_TENSORS:
                tag, values = bn_histogram(t, pick[f"{name}.{t}"].detach())
                tensors[f"layer{i}/{tag}"] = values
        return tensors


class VectorizedTrainer:
    """Trains one run per config (same everything but ``norm`` and ``weight_scale``) at once on ``data``.

    Each run's model is built exactly as :func:`cifar_bn.training.run` builds it, and logs into its own
    folder of ``run_dirs`` what a sequential run logs there (the same TensorBoard scalars, histograms,
    hparams and text cards, and ``summary.json`` with the same keys, plus ``vectorized_models``);
    ``state_dir`` receives the one checkpoint of all models, written atomically every epoch.
    ``resume=True`` continues from that checkpoint (or starts over when there is none yet, dropping
    what was logged). ``wall_time_s`` and ``logging_time_s`` in each summary are the whole batch's.

    Args:
        configs: one TrainConfig per run; norm "torch_bn" or "none".
        data: the data set; every model sees the same minibatches, in the order ``config.seed`` fixes.
        run_dirs: one folder per run (none may hold a run unless resuming).
        state_dir: the folder for the shared checkpoint.
        progress: one tqdm bar for all the models.
        log_every: per-layer dashboard statistics every this many iterations (0: none), as the
            sequential runs'.

    Example::

        >>> configs = [TrainConfig(norm=n, weight_scale=s) for n in ("torch_bn", "none") for s in (1e-2, 1e-1)]
        >>> summaries = VectorizedTrainer(configs, data, [f"runs/x/{i}" for i in range(4)], "runs/x").fit()
    """

    def __init__(self, configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], state_dir: str, *,
                 progress: bool = True, resume: bool = False, log_every: int = LOG_EVERY) -> None:
        check_configs(configs)
        if len(run_dirs) != len(configs):
            raise ValueError(f"one run folder per config: got {len(run_dirs)} folders for {len(configs)} configs")
        n, bs = len(data.X_train), configs[0].batch_size
        if n < bs:
            raise ValueError(f"{n} training images are fewer than one batch of {bs}; "
                             f"use more training images (--num-train) or a smaller --batch-size")
        if len(data.X_val) < 1:
            raise ValueError("the validation set is empty; keep at least one validation image (--num-val)")
        if not resume:
            taken = [d for d in run_dirs if holds_run(d)]
            if taken or os.path.exists(os.path.join(state_dir, CHECKPOINT)):
                raise RunExistsError(f"{(taken or [state_dir])[0]} already holds a run and runs are never "
                                     f"overwritten; choose another --run-name, or continue with --resume")
        # Models of one norm next to each other, so that each group is a slice of the first layer.
        self.order = sorted(range(len(configs)), key=lambda i: NORMS.index(configs[i].norm))
        self.configs = [configs[i] for i in self.order]
        self.run_dirs = [run_dirs[i] for i in self.order]
        self.config, self.state_dir, self.progress, self.log_every = self.configs[0], state_dir, progress, log_every
        self.device = resolve_device(self.config.device)
        self.data = {k: getattr(data, k).to(self.device).flatten(1) if k.startswith("X") else
                     getattr(data, k).to(self.device) for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")}
        dim = self.data["X_train"].shape[1]

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
        self.optimizer = build_stacked_optimizer(self.config, params)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.config.lr_decay)
        self.batch_order = torch.Generator().manual_seed(self.config.seed)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1))[:TRAIN_ACC_SAMPLES]
        self.train_sample = sample.to(self.device)
        self.iters_per_epoch = n // bs
        # Accuracy checks at the iterations the sequential runs check.
        checks = checks_per_epoch(self.iters_per_epoch * bs, len(sample) + len(data.X_val))
        self.check_every = max(self.iters_per_epoch // checks, 1)  # more checks than iterations: every one
        self.histories = [History() for _ in self.configs]
        self.epoch = 0
        self.best_val_acc = [-1.0] * len(self.configs)
        self.best = self._state()  # the best-val weights of every model, replaced at epoch 0
        self.wall_time = 0.0
        self.logging_time = 0.0  # seconds spent on the per-layer statistics and histograms, all models
        # The per-layer outputs of the last iteration whose statistics were logged, per group
        # (stacked), for the epoch's histograms; as LayerProbe.outputs, empty until one is.
        self.probed: list[dict[tuple[int, str], Tensor]] = [{} for _ in self.groups]
        checkpoint = self._load_checkpoint() if resume else None
        if checkpoint is not None:
            self._load(checkpoint)
        purge = (self.step + 1 if checkpoint is not None else 0) if resume else None
        for d in self.run_dirs:
            os.makedirs(d, exist_ok=True)
        self.loggers = [RunLogger(d, purge_step=purge) for d in self.run_dirs]
        if checkpoint is None:
            for config, logger in zip(self.configs, self.loggers):
                logger.start(asdict(config), n, self.device, run_card(config, n, self.device))

    @property
    def step(self) -> int:
        return self.epoch * self.iters_per_epoch

    # ---- the models --------------------------------------------------------------------------

    def _first_layer(self, x: Tensor, first: dict[str, Tensor]) -> Tensor:
        """Every model's first Linear on the same x (N, D): one matrix product, (N, M, H)."""
        w, b = first["weight"], first["bias"]
        return torch.addmm(b.flatten(), x, w.flatten(0, 1).t()).view(len(x), *b.shape)

    def _train_step(self, x: Tensor, y: Tensor, probe: bool) -> tuple[Tensor, Tensor | None]:
        """One optimizer step of every model on the minibatch (x, y); returns the losses (M,) and, with
        probe, the dashboard's per-layer statistics of every model (M, T) (see :meth:`_stats`)."""
        h = self._first_layer(x, self.first)
        kinds = PROBED if probe else ()
        losses, outputs = [], []
        for g in self.groups:
            g.template.train()
            loss, g.buffers, captured = g.loss[kinds](g.params, g.buffers, h[:, g.index], y)
            losses.append(loss)
            if probe:
                captured[(1, "pre_norm")] = h[:, g.index].transpose(0, 1)
                outputs.append({k: v.detach() for k, v in captured.items()})
        loss = torch.cat(losses)
        if self.config.reg:
            loss = loss + 0.5 * self.config.reg * self._weight_squares()
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # the models share no parameters: d sum / d theta_k = d loss_k / d theta_k
        stats = None
        if probe:  # the gradients of this step, before the optimizer uses them (as the sequential runs)
            start = time.perf_counter()
            self.probed = outputs
            stats = self._stats()
            self.logging_time += time.perf_counter() - start
        self.optimizer.step()
        return loss.detach(), stats

    @torch.no_grad()
    def _stats(self) -> list[Tensor]:
        """Per group, (K, T): each model's per-layer statistics in the order of :meth:`_stat_tags`: mean
        and std of every probed output (over the batch and the features, as LayerProbe.stats), then the
        norm of every Linear weight's gradient."""
        first = self.first["weight"].grad.flatten(1).norm(dim=1)
        out = []
        for g, probed in zip(self.groups, self.probed):
            cols = []
            for key in sorted(probed):
                t = probed[key].float().flatten(1)
                cols += [t.mean(1), t.std(1)]
            cols.append(first[g.index])
            cols += [g.params[name].grad.flatten(1).norm(dim=1) for name in g.linear_weights]
            out.append(torch.stack(cols, 1))
        return out

    def _stat_tags(self, g: int) -> list[str]:
        tags = []
        for i, name in sorted(self.probed[g]):
            tags += [f"layer{i}/{name}_mean", f"layer{i}/{name}_std"]
        return tags + [f"layer{i}/weight_grad_norm" for i in range(1, len(self.groups[g].linear_weights) + 2)]

    def _weight_squares(self) -> Tensor:
        """Each model's sum of squared Linear weights (M,): the notebook's L2 penalty without 0.5 * reg."""
        out = self.first["weight"].square().sum((1, 2))
        rest = [sum(g.params[name].square().flatten(1).sum(1) for name in g.linear_weights) for g in self.groups]
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

    @torch.no_grad()
    def _activation_stds(self) -> list[list[float]]:
        """Each model's std of every hidden layer's output (after the ReLU) on the train sample, with
        batch statistics and the running statistics left as they are: models.activation_stds, vmapped."""
        h = self._first_layer(self.data["X_train"][self.train_sample], self.first)
        out = []
        for g in self.groups:
            g.template.train()
            captured = g.forward[("activation",)](g.params, g.buffers, h[:, g.index])[2]
            out.append(torch.stack([captured[key].float().flatten(1).std(1) for key in sorted(captured)], 1))
        return torch.cat(out).tolist()

    def _state(self) -> dict:
        """A detached copy of every model's weights and buffers (stacked)."""
        return {"first": {k: v.detach().clone() for k, v in self.first.items()},
                "groups": [({k: v.detach().clone() for k, v in g.params.items()},
                            {k: v.clone() for k, v in g.buffers.items()}) for g in self.groups]}

    def _live(self) -> dict:
        return {"first": self.first, "groups": [(g.params, g.buffers) for g in self.groups]}

    # ---- accuracy checks, epochs, logging ----------------------------------------------------

    def _check(self, step: int) -> tuple[list[float], list[float]]:
        """Every model's accuracy on the fixed train sample and the validation set, logged at ``step``."""
        d = self.data
        train_acc, val_acc = self._accuracies(torch.cat([d["X_train"][self.train_sample], d["X_val"]]),
                                              [d["y_train"][self.train_sample], d["y_val"]], self._live())
        for k, (h, logger) in enumerate(zip(self.histories, self.loggers)):
            h.check_step.append(step)
            h.check_train_acc.append(train_acc[k])
            h.check_val_acc.append(val_acc[k])
            logger.accuracy(step, train_acc[k], val_acc[k])
        return train_acc, val_acc

    def _evaluate(self) -> None:
        """End of an epoch for every model: accuracies, best weights, and the epoch's scalars and
        histograms in each run's dashboard."""
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
        self._keep_best(improved)
        start = time.perf_counter()
        for g, probed in zip(self.groups, self.probed):
            # The histograms RunLogger.epoch writes, built for all the group's models at once: the
            # outputs of the last iteration whose statistics were logged, and the batch-norm tensors.
            stacked = {f"layer{i}/{kind}": t for (i, kind), t in sorted(probed.items())}
            stacked.update(g.norm_tensors())
            tags, protos = list(stacked), [histogram_protos(t) for t in stacked.values()]
            for local, k in enumerate(range(g.index.start, g.index.stop)):
                losses = self.histories[k].loss[-self.iters_per_epoch:] if self.epoch > 0 else []
                self.loggers[k].epoch_scalars(self.step, lr, sum(losses) / len(losses) if losses else None,
                                              self.best_val_acc[k])
                self.loggers[k].histograms({tag: p[local] for tag, p in zip(tags, protos)}, self.step)
        self.logging_time += time.perf_counter() - start

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

    def _log_stats(self, stats: list[tuple[int, list[Tensor], list[list[str]]]]) -> None:
        """Write the per-layer statistics gathered over an epoch, (step, per-group values, per-group tags)
        per logged iteration, into each run's dashboard."""
        start = time.perf_counter()
        values = [[t.tolist() for t in per_group] for _, per_group, _ in stats]
        for (step, _, tags), per_group in zip(stats, values):
            for g, rows, group_tags in zip(self.groups, per_group, tags):
                for local, row in enumerate(rows):
                    self.loggers[g.index.start + local].scalars(dict(zip(group_tags, row)), step)
        self.logging_time += time.perf_counter() - start

    def _train_epoch(self, bar) -> None:
        x, y = self.data["X_train"], self.data["y_train"]
        order = torch.randperm(len(x), generator=self.batch_order).to(self.device)
        bs = self.config.batch_size
        losses, stats = [], []
        for i in range(self.iters_per_epoch):
            step = self.step + i + 1
            probe = self.log_every > 0 and step % self.log_every == 0
            idx = order[i * bs:(i + 1) * bs]
            loss, stat = self._train_step(x[idx], y[idx], probe)
            losses.append(loss)
            if stat is not None:
                stats.append((step, stat, [self._stat_tags(g) for g in range(len(self.groups))]))
            if (i + 1) % self.check_every == 0 and i + 1 < self.iters_per_epoch - self.check_every // 2:
                self._check(step)  # between epoch ends, at the iterations the sequential runs check
            if bar is not None:
                bar.update(1)
        # The epoch's losses and statistics: one read-back each for all the models.
        for k, values in enumerate(torch.stack(losses).t().tolist()):
            self.histories[k].loss.extend(values)
            for i, value in enumerate(values):
                self.loggers[k].iteration(self.step + i + 1, value)
        self._log_stats(stats)
        self.scheduler.step()

    # ---- checkpoint --------------------------------------------------------------------------

    def _load_checkpoint(self) -> dict | None:
        path = os.path.join(self.state_dir, CHECKPOINT)
        return torch.load(path, map_location=self.device, weights_only=True) if os.path.isfile(path) else None

    def _save(self) -> None:
        ckpt = {"configs": [asdict(c) for c in self.configs], "order": self.order, "epoch": self.epoch,
                "state": self._state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "batch_order": self.batch_order.get_state(), "histories": [asdict(h) for h in self.histories],
                "best_val_acc": self.best_val_acc, "best": self.best, "wall_time": self.wall_time,
                "logging_time": self.logging_time}
        path = os.path.join(self.state_dir, CHECKPOINT)
        try:
            torch.save(ckpt, path + ".tmp")
            os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint or the new one
        finally:
            if os.path.exists(path + ".tmp"):  # interrupted while writing: the old checkpoint stands
                os.remove(path + ".tmp")

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
        self.logging_time = ckpt.get("logging_time", 0.0)
        self.best = ckpt["best"]

    # ---- the run -----------------------------------------------------------------------------

    def fit(self, on_epoch_end=None) -> list[dict]:
        """Train every model to config.epochs; return (and write) one summary per run, in the order of the
        configs given. on_epoch_end(trainer) runs after each epoch's checkpoint (tests use it to simulate an
        interruption)."""
        start = time.perf_counter()
        if self.epoch == 0 and not self.histories[0].val_acc:
            for h, stds in zip(self.histories, self._activation_stds()):
                h.activation_std_init = stds
            self._evaluate()  # epoch 0: accuracies before training
        total = self.config.epochs * self.iters_per_epoch
        bar = tqdm(total=total, initial=self.step, desc=f"{len(self.configs)} models", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        try:
            while self.epoch < self.config.epochs:
                self._train_epoch(bar)
                self.epoch += 1
                self._evaluate()
                bar.set_postfix(epoch=self.epoch, best_val_acc=f"{max(self.best_val_acc):.3f}")
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
        summaries = self._finish()
        return [summaries[self.order.index(i)] for i in range(len(self.configs))]

    def _finish(self) -> list[dict]:
        """Activation stds of the trained models, test accuracy with the best-val weights (as the
        notebook), then each run's results card and summary."""
        d = self.data
        activation_std_final = self._activation_stds()
        (test_acc,) = self._accuracies(d["X_test"], [d["y_test"]], self.best)
        device = device_name(self.device)
        summaries = []
        for k, (config, h, logger) in enumerate(zip(self.configs, self.histories, self.loggers)):
            last = h.loss[-FINAL_LOSS_WINDOW:]
            summary = {
                "config": asdict(config), "num_train": len(d["X_train"]), "epochs_done": self.epoch,
                "best_val_acc": self.best_val_acc[k], "final_train_acc": h.train_acc[-1],
                "best_train_acc": max(h.train_acc), "final_loss": sum(last) / len(last) if last else float("nan"),
                "test_acc": test_acc[k], "wall_time_s": self.wall_time, "logging_time_s": self.logging_time,
                "vectorized_models": len(self.configs), "device": device, "versions": versions(),
                "activation_std": {"init": h.activation_std_init, "final": activation_std_final[k]},
                "history": asdict(h),
            }
            logger.text("results", f"After {self.epoch} epochs: final train acc {summary['final_train_acc']:.3f}, "
                                   f"best val acc {self.best_val_acc[k]:.3f}, test acc (best-val weights) "
                                   f"{test_acc[k]:.3f}, final loss {summary['final_loss']:.3f}; "
                                   f"{self.wall_time:.1f} s for all {len(self.configs)} models on {device}.",
                        self.step)
            logger.close()
            path = os.path.join(self.run_dirs[k], SUMMARY)
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(path + ".tmp", path)
            summaries.append(summary)
        return summaries


def run_many(configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], state_dir: str, *,
             progress: bool = True, resume: bool = False, log_every: int = LOG_EVERY) -> list[dict]:
    """Train the runs together and return their summaries (in the order given); with resume, finished runs
    are read back and unfinished ones continue from the shared checkpoint. log_every: per-layer dashboard
    statistics every this many iterations (0: none)."""
    done = [os.path.join(d, SUMMARY) for d in run_dirs]
    if resume and all(os.path.isfile(p) for p in done):
        out = []
        for p in done:
            with open(p) as f:
                out.append(json.load(f))
        return out
    return VectorizedTrainer(configs, data, run_dirs, state_dir, progress=progress, resume=resume,
                             log_every=log_every).fit()


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
