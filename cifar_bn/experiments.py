"""The runs train.py can launch: one model, a three-way comparison, and the notebook's experiments.

Each writes its runs under one root folder (one TensorBoard run per sub-folder), and each can
be resumed: finished runs are read back, unfinished ones continue from their checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from .dashboard import RunLogger
from .data import CIFAR10Data
from .figures import deep_figure, weight_scale_figure
from .models import NORMS
from .training import TrainConfig, run
from .vectorized import run_many

# The notebook's sections 2 and 3: 1,000 training images, 10 epochs, batch 50, Adam 1e-3.
PRESETS = {
    "deep": dict(hidden_dims=(100,) * 5, weight_scale=2e-2, epochs=10, batch_size=50, optimizer="adam", lr=1e-3,
                 num_train=1000),
    "weight-scale": dict(hidden_dims=(50,) * 7, epochs=10, batch_size=50, optimizer="adam", lr=1e-3,
                         num_train=1000),
}
LABELS = {"torch_bn": "batchnorm (torch_bn)", "torch": "nn.BatchNorm1d", "none": "baseline (no norm)"}


def compare(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
            resume: bool = False, norms: tuple[str, ...] = NORMS) -> dict[str, dict]:
    """Train the same config once per norm, from identical initial Linear weights and batch order
    (each run seeds the same generators), into root/<norm>; returns norm -> summary."""
    return {norm: run(replace(config, norm=norm), data, os.path.join(root, norm), progress=progress, resume=resume)
            for norm in norms}


def deep(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
         resume: bool = False) -> dict[str, dict]:
    """The notebook's section 2: batch norm vs none on a deep net; writes root/deep.png and the figure to TensorBoard."""
    summaries = compare(config, data, root, progress=progress, resume=resume, norms=("torch_bn", "none"))
    fig = deep_figure({LABELS[n]: s["history"] for n, s in summaries.items()})
    save_figure(fig, root, "deep")
    return summaries


def weight_scales(num: int = 20) -> list[float]:
    return [float(s) for s in np.logspace(-4, 0, num=num)]


def weight_scale(config: TrainConfig, data: CIFAR10Data, root: str, *, progress: bool = True,
                 resume: bool = False, num_scales: int = 20, vectorized: bool = False) -> dict[str, list[dict]]:
    """The notebook's section 3: batch norm vs none across weight-init scales logspace(-4, 0); each run is a
    TensorBoard hparams row; writes root/weight_scale.png. Returns norm -> summaries by scale.
    vectorized: train all the runs at once as one vmapped program (cifar_bn.vectorized), same outputs."""
    scales = weight_scales(num_scales)
    results: dict[str, list[dict]] = {"torch_bn": [], "none": []}
    runs = [(norm, replace(config, norm=norm, weight_scale=scale), os.path.join(root, f"scale{i:02d}_{norm}"))
            for i, scale in enumerate(scales) for norm in results]
    if vectorized:
        summaries = run_many([c for _, c, _ in runs], data, [d for _, _, d in runs], root,
                             progress=progress, resume=resume)
    else:
        summaries = [run(c, data, d, progress=progress, resume=resume) for _, c, d in runs]
    for (norm, _, _), summary in zip(runs, summaries):
        results[norm].append(summary)
    fig = weight_scale_figure(scales, {LABELS[n]: r for n, r in results.items()})
    save_figure(fig, root, "weight_scale")
    return results


def save_figure(fig, root: str, name: str) -> str:
    """Write the figure as root/<name>.png (never over an existing file) and into root's dashboard."""
    path = os.path.join(root, f"{name}.png")
    if os.path.exists(path):  # a resumed experiment: keep the first figure, add a numbered one
        k = 1
        while os.path.exists(os.path.join(root, f"{name}.{k}.png")):
            k += 1
        path = os.path.join(root, f"{name}.{k}.png")
    fig.savefig(path, dpi=80)
    logger = RunLogger(root)
    logger.figure(name, fig)
    logger.close()
    return path
