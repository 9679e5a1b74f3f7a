"""TensorBoard logging of a training run, through tensorboard's SummaryWriter.

Every tag uses the iteration count as its step (epoch-level values at the iteration that ends
the epoch), so a resumed run can drop events past its checkpoint with ``purge_step``. Tags:

- ``loss/train`` every iteration, ``loss/train_epoch`` (the epoch's mean) and ``lr`` per epoch;
- ``accuracy/train``, ``accuracy/val`` at every accuracy check (several per epoch),
  ``accuracy/best_val`` (best so far) per epoch;
- ``layer<i>/...`` per layer, every ``log_every`` iterations: mean and std of the Linear's output
  (``pre_norm``; for a model without normalization, the Linear output feeding the activation) and
  of the batch norm's output (``post_norm``), and the norm of the Linear weight's gradient; per
  epoch, histograms of those outputs and of the batch norm's parameters and running statistics;
- the hparams plugin's experiment (the declared hparams and metrics) and session, a text card.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.plugins.hparams import summary_v2 as hp
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from .models import hidden_layers, weighted_layers

# The hparams as the HParams tab lists them: what the experiments vary first, then the rest.
HPARAMS = ("norm", "weight_scale", "num_train", "lr", "optimizer", "seed", "epochs", "batch_size", "hidden_dims",
           "dropout", "reg", "lr_decay", "device")
HISTOGRAM_BINS = 64  # fixed bins: ~10x cheaper to write than SummaryWriter's default edges, as legible
# The metrics the HParams tab shows: the last value of these scalar curves (no extra scalars).
METRICS = (("accuracy/best_val", "best val acc"), ("accuracy/val", "final val acc"),
           ("accuracy/train", "final train acc"), ("loss/train_epoch", "final epoch loss"))


def hparam_values(config: dict[str, Any], num_train: int, device: str) -> dict[str, bool | int | float | str]:
    """The run's hparams as the plugin takes them: the config with the training-set size and the
    device actually used; PyTorch's default init (weight_scale None) reads "default"."""
    values = {**config, "num_train": num_train, "device": device}
    if values.get("weight_scale") is None:
        values["weight_scale"] = "default"
    return {k: (v if isinstance(v, (bool, int, float, str)) else ",".join(map(str, v))
                if isinstance(v, (list, tuple)) else str(v)) for k, v in values.items()}


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

    def start(self, hparams: dict[str, Any], trial_id: str, card: str) -> None:
        """A fresh run's hparams (declared experiment + this session) and its text card, at step 0."""
        declared = [hp.HParam(name) for name in HPARAMS if name in hparams]
        declared += [hp.HParam(name) for name in sorted(hparams) if name not in HPARAMS]
        metrics = [hp.Metric(tag, display_name=name) for tag, name in METRICS]
        fw = self.writer.file_writer
        fw.add_summary(hp.hparams_config_pb(declared, metrics), 0)
        fw.add_summary(hp.hparams_pb(hparams, trial_id=trial_id), 0)
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
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(layer.norm, name, None)
                if t is not None:
                    self.writer.add_histogram(f"layer{i}/bn_{name}", t.detach().float().cpu(), step,
                                              bins=HISTOGRAM_BINS)

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
