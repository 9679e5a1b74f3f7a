"""TensorBoard logging of a training run, through tensorboard's SummaryWriter.

Every tag uses the iteration count as its step (epoch-level values at the iteration that ends
the epoch), so a resumed run can drop events past its checkpoint with ``purge_step``. Tags:

- ``loss/train`` every iteration, ``loss/train_epoch`` (the epoch's mean) and ``lr`` per epoch;
- ``accuracy/train``, ``accuracy/val`` at every accuracy check (several per epoch),
  ``accuracy/best_val`` (best so far) per epoch;
- ``layer<i>/...`` per layer, every ``log_every`` iterations: mean and std of the Linear's output
  (``pre_norm``; for a model without normalization, the Linear output feeding the activation) and
  of the batch norm's output (``post_norm``), and the norm of the Linear weight's gradient; per
  epoch, histograms of those outputs and of the batch norm's parameters and running statistics
  (the running variance as its square root, ``bn_running_std``);
- the hparams plugin's experiment (every hparam with its domain, and the metrics; the same in
  every run) and session (no trial id: TensorBoard keys the row by the run's path under the logdir);
- the custom scalars layout: each layer's pre- and post-norm mean and std on one chart;
- text cards, and the figures of an experiment (in its first run).
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import summary_v2 as hp
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from .config import NORMS
from .models import hidden_layers, weighted_layers

# Every hparam a run declares, with its domain: discrete for the categorical ones (every value
# the application accepts, so HParams' checkbox filters start with all of them), numeric intervals
# for the rest (what TrainConfig accepts; where it has no upper bound, a bound above any value that
# trains on CIFAR-10: HParams' interval filters start empty, so a run beyond one is still listed).
# Every run declares the same set with the same domains: HParams takes the declaration of any one run.
NORM_DOMAIN = NORMS
OPTIMIZER_DOMAIN = ("adam", "sgd", "sgd_momentum", "rmsprop")  # config.OPTIMIZERS (a test keeps them equal)
HPARAM_DOMAINS: dict[str, hp.Domain | None] = {
    "norm": hp.Discrete(list(NORM_DOMAIN)),
    "weight_scale": hp.RealInterval(0.0, 10.0),  # absent for PyTorch's default init
    "batch_size": hp.IntInterval(1, 50_000),  # CIFAR-10 has 50,000 training images
    "num_train": hp.IntInterval(1, 50_000),
    "lr": hp.RealInterval(0.0, 10.0),
    "optimizer": hp.Discrete(list(OPTIMIZER_DOMAIN)),
    "epochs": hp.IntInterval(1, 100_000),
    "seed": hp.IntInterval(0, 2**63 - 1),
    "hidden_dims": None,  # widths as text ("100,100"): HParams filters it by regular expression
    "dropout": hp.RealInterval(0.0, 1.0),
    "reg": hp.RealInterval(0.0, 1e3),
    "lr_decay": hp.RealInterval(0.0, 10.0),
    "device": hp.Discrete(["cpu", "cuda"]),
    "sync_bn": hp.Discrete([False, True]),
    "virtual_batch_size": hp.IntInterval(1, 50_000),  # norm "ghost" only (at most the batch)
    "renorm_warmup": hp.IntInterval(0, 2**31 - 1),  # norm "renorm" only: steps of plain batch norm first
}
# What the experiments vary, marked `differs`: HParams sorts the declared hparams by `differs`,
# then by name, and ticks the first five, so these are always shown.
VARIED = ("norm", "weight_scale", "batch_size")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")  # each batch norm's, histogrammed per epoch
HISTOGRAM_BINS = 64  # fixed bins: ~10x cheaper to write than SummaryWriter's default edges, as legible
# The metrics the HParams tab shows: the last value of these scalar curves (no extra scalars).
METRICS = (("accuracy/best_val", "best val acc"), ("accuracy/val", "final val acc"),
           ("accuracy/train", "final train acc"), ("loss/train_epoch", "final epoch loss"))
# The most runs under one logdir for which TensorBoard's Scalars, Images, Text and Histograms
# dashboards select every run when they open (above it they select none): each launch of
# train.py is one logdir and writes at most this many runs.
MAX_RUNS_PER_LOGDIR = 40


def hparam_values(config: dict[str, Any], num_train: int, device: str) -> dict[str, bool | int | float | str]:
    """The run's hparams as the plugin takes them: the config with the training-set size and the
    device actually used, each of one type in every run (str, bool, or a number); an unset field
    (PyTorch's default init: weight_scale None) is left out, so HParams shows it blank."""
    values = {**config, "num_train": num_train, "device": device}
    unknown = sorted(set(values) - set(HPARAM_DOMAINS))
    if unknown:
        raise ValueError(f"hparams {', '.join(unknown)} have no domain in cifar_bn.dashboard.HPARAM_DOMAINS; "
                         f"declare them there")
    out: dict[str, bool | int | float | str] = {}
    for name, v in values.items():
        if v is None:
            continue
        domain = HPARAM_DOMAINS[name]
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        elif isinstance(domain, hp.RealInterval):
            v = float(v)
        elif isinstance(domain, hp.IntInterval):
            v = int(v)
        out[name] = v
    return out


def bn_histogram(name: str, values: Tensor) -> tuple[str, Tensor]:
    """The tag (after ``layer<i>/``) and values of the histogram of a batch norm's tensor ``name``:
    running_var as its square root, ``bn_running_std``, on the scale of ``pre_norm_std`` (variances
    up to 1e5 give tick labels that overlap); the others as they are, ``bn_<name>``."""
    if name == "running_var":
        return "bn_running_std", values.clamp_min(0).sqrt()
    return f"bn_{name}", values


def hparams_config_pb() -> Summary:
    """The hparams plugin's experiment: every hparam of HPARAM_DOMAINS with its domain, the
    VARIED ones marked ``differs``, and METRICS; the same for every run."""
    infos = []
    for name, domain in HPARAM_DOMAINS.items():
        info = api_pb2.HParamInfo(name=name, differs=name in VARIED)
        if domain is not None:
            domain.update_hparam_info(info)
        else:
            info.type = api_pb2.DATA_TYPE_STRING
        infos.append(info)
    metrics = [hp.Metric(tag, display_name=name).as_proto() for tag, name in METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    summary = Summary()
    summary.value.add(tag=hp_metadata.EXPERIMENT_TAG, tensor=hp_metadata.NULL_TENSOR,
                      metadata=hp_metadata.create_summary_metadata(
                          plugin_data_pb2.HParamsPluginData(experiment=experiment)))
    return summary


def layer_layout(layers: int) -> dict:
    """The custom scalars layout: per hidden layer, one chart of the Linear output's and the batch
    norm's output's mean and std (``layer<i>/(pre|post)_norm_(mean|std)``). On one chart they share
    one scale, and with batch norm that scale spans at least its output's mean (beta, near 0) to
    its std (gamma, near 1): a deviation of 0.001 stays a thousandth of the axis instead of being
    autoscaled into a drift, and the pre-norm values (0.01 or 200) stand against it."""
    charts = {f"layer {i}: mean and std, before and after the norm":
              ["Multiline", [rf"^layer{i}/(pre|post)_norm_(mean|std)$"]] for i in range(1, layers + 1)}
    return {"per-layer statistics": charts}


@torch.no_grad()
def histogram_protos(values: Tensor, bins: int = HISTOGRAM_BINS) -> list[HistogramProto]:
    """One histogram per row of ``values`` (R, n), as ``SummaryWriter.add_histogram(tag, row, bins=bins)``
    builds it (np.histogram's ``bins`` equal bins from the row's min to its max, the same float64
    arithmetic, trimmed to the bins that hold values), for all rows in a few tensor operations.
    ValueError for an empty or non-finite row, as add_histogram."""
    x = values.detach().reshape(len(values), -1).cpu().double()
    if x.shape[1] == 0:
        raise ValueError("The input has no element.")
    lo, hi = x.min(1).values, x.max(1).values
    if not (lo.isfinite().all() and hi.isfinite().all()):
        raise ValueError(f"autodetected range of [{lo.min().item()}, {hi.max().item()}] is not finite")
    first = torch.where(lo == hi, lo - 0.5, lo)[:, None]  # np.histogram widens a zero range by 0.5 each side
    last = torch.where(lo == hi, hi + 0.5, hi)[:, None]
    # np.linspace(first, last, bins + 1): arange * step + first, the last edge exactly last.
    edges = torch.arange(bins + 1, dtype=torch.float64) * ((last - first) / bins) + first
    edges[:, -1] = last[:, 0]
    # np.histogram's bin of each value: from the scaled offset, then corrected against the edges.
    index = ((x - first) / (last - first) * bins).long().clamp_(0, bins - 1)
    index -= (x < edges.gather(1, index)).long()
    index += ((x >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    rows = torch.arange(len(x))[:, None] * bins
    counts = torch.bincount((index + rows).flatten(), minlength=len(x) * bins).view(len(x), bins)
    stats = torch.stack([lo, hi, x.sum(1), (x * x).sum(1)], 1).tolist()
    protos = []
    for (mn, mx, total, squares), count, limit in zip(stats, counts.tolist(), edges.tolist()):
        used = [i for i, c in enumerate(count) if c]
        start, end = used[0], used[-1] + 1
        # As make_histogram: only right bin limits are stored, so an empty bin goes first.
        kept = count[start - 1:end] if start > 0 else [0] + count[:end]
        protos.append(HistogramProto(min=mn, max=mx, num=x.shape[1], sum=total, sum_squares=squares,
                                     bucket_limit=limit[start:end + 1], bucket=kept))
    return protos


class LayerProbe:
    """Statistics of each layer of ``model`` for the dashboard, taken on request.

    Forward hooks keep the output of every hidden Linear (``pre_norm``) and of the batch norm
    after it (``post_norm``) while ``armed`` is set; :meth:`stats` then gives their mean and std
    and the norm of every Linear weight's gradient (layers numbered from 1, the output layer
    last). Disarmed, each hook costs one attribute test.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = hidden_layers(model)
        self.weights = weighted_layers(model)
        self.armed = False
        self.outputs: dict[tuple[int, str], Tensor] = {}
        self.handles = []
        for i, layer in enumerate(self.layers, 1):
            self.handles.append(layer.linear.register_forward_hook(self._keeper(i, "pre_norm")))
            if layer.norm is not None:
                self.handles.append(layer.norm.register_forward_hook(self._keeper(i, "post_norm")))

    def _keeper(self, i: int, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self.armed:
                self.outputs[(i, name)] = output.detach()
        return hook

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """tag -> value for the last armed forward pass and the gradients now held."""
        tags, values = [], []
        for (i, name), out in sorted(self.outputs.items()):
            out = out.float()
            tags += [f"layer{i}/{name}_mean", f"layer{i}/{name}_std"]
            values += [out.mean(), out.std()]
        for i, m in enumerate(self.weights, 1):
            if m.weight.grad is not None:
                tags.append(f"layer{i}/weight_grad_norm")
                values.append(m.weight.grad.float().norm())
        return dict(zip(tags, torch.stack(values).tolist())) if values else {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _wait_past_existing_events(run_dir: str) -> None:
    """Wait until the clock has left the second in which run_dir's newest event file was opened.

    TensorBoard reads a run's event files in name order, and a name is
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``: a file opened in the same second as
    an earlier one can sort before it (counter 13 before 9), and a resumed run's purge would then
    drop the earlier file's events. Waits only when a run is reopened within a second.
    """
    if not os.path.isdir(run_dir):
        return
    stamps = [int(f.split(".")[3]) for f in os.listdir(run_dir)
              if f.startswith("events.out.tfevents.") and f.split(".")[3].isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


class NoLogger:
    """The dashboard of torchrun ranks other than 0: every logging call does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class RunLogger:
    """One run's dashboard: scalars, histograms, hparams, text and figures in ``run_dir``."""

    def __init__(self, run_dir: str, purge_step: int | None = None) -> None:
        _wait_past_existing_events(run_dir)
        self.writer = SummaryWriter(run_dir, purge_step=purge_step)

    def start(self, config: dict[str, Any], num_train: int, device: str, card: str) -> None:
        """A fresh run's dashboard at step 0: the hparams experiment and this run's session (its
        trial id left empty, so TensorBoard uses the run's path under the logdir it opens: one
        HParams row per run, whatever the logdir), the per-layer custom scalars layout and the
        text card."""
        fw = self.writer.file_writer
        fw.add_summary(hparams_config_pb(), 0)
        fw.add_summary(hp.hparams_pb(hparam_values(config, num_train, device), trial_id=""), 0)
        self.writer.add_custom_scalars(layer_layout(len(config["hidden_dims"])))
        self.text("about", card, 0)

    def iteration(self, step: int, loss: float) -> None:
        self.writer.add_scalar("loss/train", loss, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def accuracy(self, step: int, train_acc: float, val_acc: float) -> None:
        self.writer.add_scalar("accuracy/train", train_acc, step)
        self.writer.add_scalar("accuracy/val", val_acc, step)

    def epoch(self, step: int, lr: float, epoch_loss: float | None, best_val_acc: float, probe: LayerProbe) -> None:
        """Per-epoch scalars and the histograms of each layer's outputs and batch-norm tensors."""
        self.epoch_scalars(step, lr, epoch_loss, best_val_acc)
        for (i, name), out in sorted(probe.outputs.items()):
            self.writer.add_histogram(f"layer{i}/{name}", out.float().cpu(), step, bins=HISTOGRAM_BINS)
        for i, layer in enumerate(probe.layers, 1):
            for name in BN_TENSORS:
                t = getattr(layer.norm, name, None)
                if t is not None:
                    tag, values = bn_histogram(name, t.detach().float().cpu())
                    self.writer.add_histogram(f"layer{i}/{tag}", values, step, bins=HISTOGRAM_BINS)

    def epoch_scalars(self, step: int, lr: float, epoch_loss: float | None, best_val_acc: float) -> None:
        """The per-epoch scalars of :meth:`epoch`: lr, best val accuracy so far, the epoch's mean loss."""
        self.writer.add_scalar("lr", lr, step)
        self.writer.add_scalar("accuracy/best_val", best_val_acc, step)
        if epoch_loss is not None:
            self.writer.add_scalar("loss/train_epoch", epoch_loss, step)

    def histograms(self, protos: dict[str, HistogramProto], step: int) -> None:
        """Histograms built by :func:`histogram_protos`, tag -> histogram, in one event."""
        if protos:
            summary = Summary(value=[Summary.Value(tag=tag, histo=h) for tag, h in protos.items()])
            self.writer.file_writer.add_summary(summary, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        self.writer.add_figure(tag, fig, step, close=False)

    def flush(self) -> None:
        """Write what was logged so far to disk (an interrupted run keeps its events)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
