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

import os
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_bn
from .config import VECTORIZED_NORMS, TrainConfig, check_vectorized
from .dashboard import BN_TENSORS, bn_histogram, histogram_protos
from .data import CIFAR10Data
from .lifecycle import LOG_EVERY, Lifecycle, build_optimizer, read_back
from .models import hidden_layers
from .runs import VECTORIZED_CHECKPOINT, load_checkpoint
from .training import build_model

PROBED = ("pre_norm", "post_norm")  # the outputs the dashboard's per-layer statistics describe


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


class VectorizedTrainer(Lifecycle):
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

    SHARED_WALL_TIME = True

    def __init__(self, configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], state_dir: str, *,
                 progress: bool = True, resume: bool = False, log_every: int = LOG_EVERY) -> None:
        check_vectorized(configs)
        if len(run_dirs) != len(configs):
            raise ValueError(f"one run folder per config: got {len(run_dirs)} folders for {len(configs)} configs")
        # Models of one norm next to each other, so that each group is a slice of the first layer.
        self.order = sorted(range(len(configs)), key=lambda i: VECTORIZED_NORMS.index(configs[i].norm))
        super().__init__([configs[i] for i in self.order], data, [run_dirs[i] for i in self.order],
                         os.path.join(state_dir, VECTORIZED_CHECKPOINT), progress=progress, resume=resume,
                         log_every=log_every)
        self.state_dir = state_dir
        self.data = {k: v.flatten(1) if k.startswith("X") else v for k, v in self.data.items()}
        dim = self.data["X_train"].shape[1]

        models = [build_model(c, dim).to(self.device) for c in self.configs]
        # The first layer of every model, stacked: (M, H, D) and (M, H).
        self.first = {"weight": torch.stack([m.net[0].weight.detach() for m in models]).requires_grad_(),
                      "bias": torch.stack([m.net[0].bias.detach() for m in models]).requires_grad_()}
        self.groups = []
        for norm in VECTORIZED_NORMS:
            idx = [i for i, c in enumerate(self.configs) if c.norm == norm]
            if idx:
                self.groups.append(_Group([models[i] for i in idx], slice(idx[0], idx[-1] + 1)))
        params = list(self.first.values()) + [p for g in self.groups for p in g.params.values()]
        self.optimizer = build_stacked_optimizer(self.config, params)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.config.lr_decay)
        self.best = self._state()  # the best-val weights of every model, replaced at epoch 0
        # The per-layer outputs of the last iteration whose statistics were logged, per group
        # (stacked), for the epoch's histograms; as LayerProbe.outputs, empty until one is.
        self.probed: list[dict[tuple[int, str], Tensor]] = [{} for _ in self.groups]
        self._losses: list[Tensor] = []  # this epoch's losses, (M,) per iteration, read back at its end
        self._stats_logged: list[tuple[int, list[Tensor], list[list[str]]]] = []
        self._open(load_checkpoint(self.checkpoint_path) if resume else None, resume)

    def fit(self, on_epoch_end=None) -> list[dict]:
        """Train every model to config.epochs; return (and write) one summary per run, in the order of the
        configs given. on_epoch_end(trainer) runs after each epoch's checkpoint (tests use it to simulate an
        interruption)."""
        summaries = self._fit(on_epoch_end, f"{len(self.configs)} models")
        return [summaries[self.order.index(i)] for i in range(len(self.configs))]

    # ---- the models --------------------------------------------------------------------------

    def _first_layer(self, x: Tensor, first: dict[str, Tensor]) -> Tensor:
        """Every model's first Linear on the same x (N, D): one matrix product, (N, M, H)."""
        w, b = first["weight"], first["bias"]
        return torch.addmm(b.flatten(), x, w.flatten(0, 1).t()).view(len(x), *b.shape)

    def _train_step(self, idx: Tensor, step: int, probe: bool) -> None:
        """One optimizer step of every model on the minibatch idx; keeps the losses (M,) and, with
        probe, the dashboard's per-layer statistics of every model (M, T) (see :meth:`_stats`), to be
        read back once at the epoch end."""
        x, y = self.data["X_train"][idx], self.data["y_train"][idx]
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
        if probe:  # the gradients of this step, before the optimizer uses them (as the sequential runs)
            start = time.perf_counter()
            self.probed = outputs
            self._stats_logged.append((step, self._stats(), [self._stat_tags(g) for g in range(len(self.groups))]))
            self.logging_time += time.perf_counter() - start
        self.optimizer.step()
        self._losses.append(loss.detach())

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
    def _accuracies_of(self, x: Tensor, labels: list[Tensor], state: dict) -> list[list[float]]:
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

    # ---- the lifecycle's steps, for all models at once ------------------------------------------

    def _accuracies(self) -> tuple[list[float], list[float]]:
        d = self.data
        train_acc, val_acc = self._accuracies_of(torch.cat([d["X_train"][self.train_sample], d["X_val"]]),
                                                 [d["y_train"][self.train_sample], d["y_val"]], self._live())
        return train_acc, val_acc

    def _test_accuracies(self) -> list[float]:
        (test_acc,) = self._accuracies_of(self.data["X_test"], [self.data["y_test"]], self.best)
        return test_acc

    def _log_epoch(self, lr: float) -> None:
        for g, probed in zip(self.groups, self.probed):
            # The histograms RunLogger.epoch writes, built for all the group's models at once: the
            # outputs of the last iteration whose statistics were logged, and the batch-norm tensors.
            stacked = {f"layer{i}/{kind}": t for (i, kind), t in sorted(probed.items())}
            stacked.update(g.norm_tensors())
            tags, protos = list(stacked), [histogram_protos(t) for t in stacked.values()]
            for local, k in enumerate(range(g.index.start, g.index.stop)):
                self.loggers[k].epoch_scalars(self.step, lr, self.epoch_loss(k), self.best_val_acc[k])
                self.loggers[k].histograms({tag: p[local] for tag, p in zip(tags, protos)}, self.step)

    def _keep_best(self, improved: list[int]) -> None:
        live, best = self._live(), self.best
        with torch.no_grad():
            for k, v in live["first"].items():
                best["first"][k][improved] = v[improved]
            for g, (params, buffers), (bp, bb) in zip(self.groups, live["groups"], best["groups"]):
                local = [k - g.index.start for k in improved if g.index.start <= k < g.index.stop]
                if local:
                    for name, v in {**params, **buffers}.items():
                        (bp if name in bp else bb)[name][local] = v[local]

    def _epoch_ends(self) -> None:
        """The epoch's losses and per-layer statistics into the histories and dashboards: one
        read-back each for all the models."""
        first = self.step + 1
        for k, values in enumerate(torch.stack(self._losses).t().tolist()):
            self.histories[k].loss.extend(values)
            for i, value in enumerate(values):
                self.loggers[k].iteration(first + i, value)
        start = time.perf_counter()
        values = [[t.tolist() for t in per_group] for _, per_group, _ in self._stats_logged]
        for (step, _, tags), per_group in zip(self._stats_logged, values):
            for g, rows, group_tags in zip(self.groups, per_group, tags):
                for local, row in enumerate(rows):
                    self.loggers[g.index.start + local].scalars(dict(zip(group_tags, row)), step)
        self.logging_time += time.perf_counter() - start
        self._losses, self._stats_logged = [], []

    def _postfix(self) -> dict[str, str]:
        return {"best_val_acc": f"{max(self.best_val_acc):.3f}"}

    def _models_state(self) -> dict:
        return {"order": self.order, "state": self._state(), "best": self.best}

    def _load_models(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["state"]["first"].items():
                self.first[k].copy_(v)
            for g, (params, buffers) in zip(self.groups, state["state"]["groups"]):
                for k, v in params.items():
                    g.params[k].copy_(v)
                g.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.best = {"first": {k: v.to(self.device) for k, v in state["best"]["first"].items()},
                     "groups": [({k: v.to(self.device) for k, v in p.items()}, {k: v.to(self.device) for k, v in b.items()})
                                for p, b in state["best"]["groups"]]}

    def _summary_extra(self) -> dict:
        return {"vectorized_models": len(self.configs)}


def run_many(configs: list[TrainConfig], data: CIFAR10Data, run_dirs: list[str], state_dir: str, *,
             progress: bool = True, resume: bool = False, log_every: int = LOG_EVERY) -> list[dict]:
    """Train the runs together and return their summaries (in the order given); with resume, runs
    finished with at least config.epochs are read back, and otherwise all continue from the shared
    checkpoint (as :func:`cifar_bn.training.run`). log_every: per-layer dashboard statistics every
    this many iterations (0: none)."""
    if resume:
        load_checkpoint(os.path.join(state_dir, VECTORIZED_CHECKPOINT))  # a damaged one: refused before any rename
        summaries = read_back(run_dirs, configs[0].epochs if configs else 0)
        if summaries is not None:
            return summaries
    return VectorizedTrainer(configs, data, run_dirs, state_dir, progress=progress, resume=resume,
                             log_every=log_every).fit()


def load_state_dicts(state_dir: str) -> list[dict[str, Tensor]]:
    """Each model's state_dict (as ``MLP.state_dict()``) at the last checkpoint of the vectorized runs in
    state_dir, in the order of the configs they were launched with: a model of the batch can be loaded
    into an :class:`~cifar_bn.models.MLP` and used on its own."""
    path = os.path.join(state_dir, VECTORIZED_CHECKPOINT)
    ckpt = load_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no {VECTORIZED_CHECKPOINT} in {state_dir}: not the folder of vectorized runs")
    configs = [TrainConfig(**c) for c in ckpt["configs"]]
    state, order, out, pos_in_group = ckpt["models"]["state"], ckpt["models"]["order"], {}, 0
    groups = iter(state["groups"])
    params = buffers = None
    for pos, config in enumerate(configs):
        if pos == 0 or config.norm != configs[pos - 1].norm:  # the next group starts
            params, buffers = next(groups)
            pos_in_group = 0
        sd = {f"net.0.{k}": v[pos] for k, v in state["first"].items()}
        sd.update({f"net.{k}": v[pos_in_group] for k, v in {**params, **buffers}.items()})
        out[order[pos]] = sd
        pos_in_group += 1
    return [out[i] for i in range(len(configs))]
