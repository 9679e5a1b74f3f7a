"""The runs train.py can launch: one model, a three-way comparison, and the notebook's experiments.

Each launch writes its runs under one root folder, one TensorBoard run per sub-folder, and that
folder is the launch's TensorBoard logdir (``tensorboard --logdir runs/<launch>``): at most
``dashboard.MAX_RUNS_PER_LOGDIR`` (40) runs, so every dashboard opens with all of them selected.
A run's folder (its TensorBoard run name) says what differs, first and short: the norm in a
comparison (``torch_bn``), the weight scale then the norm in the sweep (``ws1e-04/torch_bn``);
an experiment over batch sizes would name its runs ``bs5/torch_bn``. The experiment's text card
and figures go into its first run (no parent run beside the runs). Each launch can be resumed:
finished runs are read back, unfinished ones continue from their checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from . import batch_size as batch_sizes
from .config import COMPARE_NORMS, TrainConfig, with_norm
from .dashboard import RunLogger
from .data import CIFAR10Data
from .figures import (COMPARE_ORDER, activation_std_draws, close, colour_note, curve_draws, panels, row,
                      weight_scale_draws)
from .lifecycle import LOG_EVERY
from .training import run
from .vectorized import run_many

CARDS = {
    "compare": "**Compare**: the same MLP with torch_bn.BatchNorm1d, nn.BatchNorm1d and no normalization (or the "
               "normalizations of --norms), from identical initial Linear weights and batch order (one run each). torch_bn and nn.BatchNorm1d "
               "compute the same function, so their curves agree closely (with Adam they drift apart slowly: "
               "rounding noise in the zero-gradient Linear biases before each BN becomes +-lr steps). "
               "Figures (Images, in this run): `compare/loss`, `compare/train_accuracy`, `compare/val_accuracy`.",
    "deep": "**Deep** (the notebook's section 2): a 5-hidden-layer MLP, weights ~ N(0, 0.02^2), trained on "
            "1,000 images with and without batch norm. With batch norm the loss falls faster and training "
            "accuracy ends far higher; both overfit (validation stays near 0.33). Figures (Images, in this run): "
            "`deep/*`. Custom Scalars, `layer i`: the signal shrinks layer by layer without BN.",
    "weight-scale": "**Weight scale** (the notebook's section 3): an 8-layer MLP at weight-init scales 1e-4 to "
                    "1, with and without batch norm, one run each (`ws<scale>/<norm>`, one HParams row each). "
                    "Without BN only a narrow band of scales trains; with BN every scale does. `weight_scale/*`: "
                    "accuracy and loss against the scale. `activation_std/*`: each hidden layer's output std at init "
                    "(dashed) and after training (solid) at a tiny, the baseline's best and a large scale: flat "
                    "with BN, vanishing or exploding without. The figures are in this run (Images).",
    "batch-size": batch_sizes.CARD,
}


def compare(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True, resume: bool = False,
            norms: tuple[str, ...] = COMPARE_NORMS, log_every: int = LOG_EVERY, name: str = "compare",
            virtual_batch_size: int | None = None, renorm_warmup: int | None = None) -> dict[str, dict]:
    """Train the same config once per norm (with its options: :func:`with_norm`), from identical
    initial Linear weights and batch order (each run seeds the same generators), into root/<norm>,
    in the order of norms (so that TensorBoard gives each its colour in the figures, COLORS, where
    norms is a prefix of COMPARE_ORDER); writes the loss and accuracy curves of all of them
    (root/<name>.png, and one TensorBoard image per panel, with the experiment's text card, in the
    first norm's run). Returns norm -> summary."""
    summaries = {norm: run(with_norm(config, norm, virtual_batch_size, renorm_warmup), data, os.path.join(root, norm),
                           progress=progress, resume=resume, log_every=log_every) for norm in norms}
    card = CARDS[name] + "\n\n" + colour_note(list(norms), charts=list(norms) == list(COMPARE_ORDER[:len(norms)]))
    curves = curve_draws({n: s["history"] for n, s in summaries.items()})
    publish(root, os.path.join(root, norms[0]), card, {name: curves})
    return summaries


def deep(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
         resume: bool = False, log_every: int = LOG_EVERY) -> dict[str, dict]:
    """The notebook's section 2: batch norm vs none on a deep net; writes root/deep.png and its panels to TensorBoard."""
    return compare(config, data, root, progress=progress, resume=resume, norms=("torch_bn", "none"),
                   log_every=log_every, name="deep")


def weight_scales(num: int = 20) -> list[float]:
    return [float(s) for s in np.logspace(-4, 0, num=num)]


def scale_names(scales: list[float]) -> list[str]:
    """Each weight scale as a short run-name part, ``ws1e-04``: the fewest significant digits that
    keep every scale's name distinct (20 scales from 1e-4 to 1 need one)."""
    for digits in range(0, 17):
        names = [f"ws{s:.{digits}e}" for s in scales]
        if len(set(names)) == len(set(scales)):
            return names
    raise ValueError(f"weight scales must be distinct, got {scales}")


def weight_scale_runs(config: TrainConfig, root: str, num_scales: int = 20) -> list[tuple[str, TrainConfig, str]]:
    """The sweep's runs: (norm, config, folder root/ws<scale>/<norm>), batch norm first at each scale."""
    scales = weight_scales(num_scales)
    return [(norm, replace(config, norm=norm, weight_scale=scale), os.path.join(root, name, norm))
            for scale, name in zip(scales, scale_names(scales)) for norm in ("torch_bn", "none")]


def weight_scale(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
                 resume: bool = False, num_scales: int = 20, log_every: int = LOG_EVERY,
                 vectorized: bool = False) -> dict[str, list[dict]]:
    """The notebook's section 3: batch norm vs none across weight-init scales logspace(-4, 0), into
    root/ws<scale>/<norm>; each run is a TensorBoard hparams row. Writes root/weight_scale.png
    (accuracy and loss against the scale) and root/activation_std.png (each hidden layer's output
    std at init and after training, at the smallest scale, the baseline's best and the largest),
    each panel also as a TensorBoard image in the first run, with the experiment's card.
    vectorized: train all the runs at once as one vmapped program (cifar_bn.vectorized), same outputs.
    Returns norm -> summaries by scale."""
    scales = weight_scales(num_scales)
    results: dict[str, list[dict]] = {"torch_bn": [], "none": []}
    runs = weight_scale_runs(config, root, num_scales)
    if vectorized:
        summaries = run_many([c for _, c, _ in runs], data, [d for _, _, d in runs], root,
                             progress=progress, resume=resume, log_every=log_every)
    else:
        summaries = [run(c, data, d, progress=progress, resume=resume, log_every=log_every) for _, c, d in runs]
    for (norm, _, _), summary in zip(runs, summaries):
        results[norm].append(summary)
    best = max(range(len(scales)), key=lambda i: results["none"][i]["best_val_acc"])
    picks = {"tiny": 0, "good": best, "large": len(scales) - 1}
    std_runs = {name: (scales[i], {n: r[i] for n, r in results.items()}) for name, i in picks.items()}
    card = CARDS["weight-scale"] + "\n\n" + colour_note(list(results), charts=False)
    publish(root, runs[0][2], card, {"weight_scale": weight_scale_draws(scales, results),
                                                      "activation_std": activation_std_draws(std_runs)})
    return results


def batch_size(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True, resume: bool = False,
               log_every: int = LOG_EVERY) -> batch_sizes.Results:
    """The notebook's batch-size experiment (:mod:`cifar_bn.batch_size`): its 14 runs one after another
    into root/bs<B>/<method>, then its figures (root/batch_size_{train,val,summary}.png, and each
    panel a TensorBoard image, with the experiment's card, in its first run). Returns method -> batch
    size -> summary."""
    results: batch_sizes.Results = {}
    runs = batch_sizes.plan(config)
    for r in runs:
        results.setdefault(r.method, {})[r.batch_size] = run(r.config, data, os.path.join(root, r.name),
                                                             progress=progress, resume=resume, log_every=log_every)
    publish(root, os.path.join(root, runs[0].name), batch_sizes.card(), batch_sizes.figures([results]))
    return results


def publish(root: str, run_dir: str, card: str, figures: dict[str, dict]) -> list[str]:
    """Write each figure (name -> panel draws) as root/<name>.png, its panels side by side (never
    over an existing file: a resumed experiment adds a numbered one), and into the dashboard of
    the run in run_dir one image per panel (tag <name>/<panel>), with the experiment's text card
    (tag ``experiment``); returns the PNG paths."""
    logger = RunLogger(run_dir)
    logger.text("experiment", card, 0)
    paths = []
    for name, draws in figures.items():
        path = os.path.join(root, f"{name}.png")
        k = 1
        while os.path.exists(path):
            path, k = os.path.join(root, f"{name}.{k}.png"), k + 1
        fig = row(draws)
        fig.savefig(path)
        close(fig)
        paths.append(path)
        for panel, fig in panels(draws).items():
            logger.figure(f"{name}/{panel}", fig)
            close(fig)
    logger.close()
    return paths
