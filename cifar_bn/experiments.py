"""The runs train.py can launch: one model, a three-way comparison, and the notebook's experiments.

Each writes its runs under one root folder (one TensorBoard run per sub-folder), and each can
be resumed: finished runs are read back, unfinished ones continue from their checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from .config import NORMS, TrainConfig
from .dashboard import RunLogger
from .data import CIFAR10Data
from .figures import activation_std_draws, close, curve_draws, panels, row, weight_scale_draws
from .lifecycle import LOG_EVERY
from .training import run
from .vectorized import run_many

CARDS = {
    "compare": "**Compare**: the same MLP with torch_bn.BatchNorm1d, nn.BatchNorm1d and no normalization, from "
               "identical initial Linear weights and batch order (one run each). torch_bn and nn.BatchNorm1d "
               "compute the same function, so their curves agree closely (with Adam they drift apart slowly: "
               "rounding noise in the zero-gradient Linear biases before each BN becomes +-lr steps). "
               "Figures: `compare/loss`, `compare/train_accuracy`, `compare/val_accuracy`.",
    "deep": "**Deep** (the notebook's section 2): a 5-hidden-layer MLP, weights ~ N(0, 0.02^2), trained on "
            "1,000 images with and without batch norm. With batch norm the loss falls faster and training "
            "accuracy ends far higher; both overfit (validation stays near 0.33). Figures: `deep/*`; compare "
            "`layer<i>/pre_norm_std` of the two runs to see the signal shrink layer by layer without BN.",
    "weight-scale": "**Weight scale** (the notebook's section 3): an 8-layer MLP at weight-init scales 1e-4 to "
                    "1, with and without batch norm, one run each (one HParams row each). Without BN only a "
                    "narrow band of scales trains; with BN every scale does. `weight_scale/*`: accuracy and "
                    "loss against the scale. `activation_std/*`: each hidden layer's output std at init "
                    "(dashed) and after training (solid) at a tiny, the baseline's best and a large scale: flat "
                    "with BN, vanishing or exploding without.",
}


def compare(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True, resume: bool = False,
            norms: tuple[str, ...] = NORMS, log_every: int = LOG_EVERY, name: str = "compare") -> dict[str, dict]:
    """Train the same config once per norm, from identical initial Linear weights and batch order
    (each run seeds the same generators), into root/<norm>; writes the loss and accuracy curves of
    all of them (root/<name>.png, and one TensorBoard image per panel) and root's text card.
    Returns norm -> summary."""
    summaries = {norm: run(replace(config, norm=norm), data, os.path.join(root, norm), progress=progress,
                           resume=resume, log_every=log_every) for norm in norms}
    publish(root, CARDS[name], {name: curve_draws({n: s["history"] for n, s in summaries.items()})})
    return summaries


def deep(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
         resume: bool = False, log_every: int = LOG_EVERY) -> dict[str, dict]:
    """The notebook's section 2: batch norm vs none on a deep net; writes root/deep.png and its panels to TensorBoard."""
    return compare(config, data, root, progress=progress, resume=resume, norms=("torch_bn", "none"),
                   log_every=log_every, name="deep")


def weight_scales(num: int = 20) -> list[float]:
    return [float(s) for s in np.logspace(-4, 0, num=num)]


def weight_scale(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
                 resume: bool = False, num_scales: int = 20, log_every: int = LOG_EVERY,
                 vectorized: bool = False) -> dict[str, list[dict]]:
    """The notebook's section 3: batch norm vs none across weight-init scales logspace(-4, 0); each run is a
    TensorBoard hparams row. Writes root/weight_scale.png (accuracy and loss against the scale) and
    root/activation_std.png (each hidden layer's output std at init and after training, at the
    smallest scale, the baseline's best and the largest), each panel also as a TensorBoard image.
    vectorized: train all the runs at once as one vmapped program (cifar_bn.vectorized), same outputs.
    Returns norm -> summaries by scale."""
    scales = weight_scales(num_scales)
    results: dict[str, list[dict]] = {"torch_bn": [], "none": []}
    runs = [(norm, replace(config, norm=norm, weight_scale=scale), os.path.join(root, f"scale{i:02d}_{norm}"))
            for i, scale in enumerate(scales) for norm in results]
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
    publish(root, CARDS["weight-scale"], {"weight_scale": weight_scale_draws(scales, results),
                                          "activation_std": activation_std_draws(std_runs)})
    return results


def publish(root: str, card: str, figures: dict[str, dict]) -> list[str]:
    """Write each figure (name -> panel draws) as root/<name>.png, its panels side by side (never
    over an existing file: a resumed experiment adds a numbered one), and into root's dashboard one
    image per panel (tag <name>/<panel>), with the text card; returns the PNG paths."""
    logger = RunLogger(root)
    logger.text("about", card, 0)
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
