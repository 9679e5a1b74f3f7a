"""The notebook's batch-size experiment: batch norm at batch sizes 5, 10 and 50, with batch
renormalization, ghost batch norm and layer norm beside it.

Later editions of the CS231n notebook train section 2's network (5 hidden layers of 100, weights
~ N(0, 0.02^2), Adam at 10^-3.5, 1,000 images, 10 epochs) at batch sizes 5, 10 and 50 with and
without batch norm: the smaller the batch, the noisier its statistics, and the less batch norm helps.
Here every method runs at every batch size: no normalization, torch_bn's batch norm, batch
renormalization (which corrects the batch statistics towards the running ones; designed for small
batches) and nn.LayerNorm (statistics over each sample's features: no batch dependence at all).
Ghost batch norm runs at batch 50 with statistics over chunks of 5 and of 10 samples: the noise of
a small batch's statistics with the gradient of a large batch, which separates the two effects.

This module defines the runs (:func:`plan`), the figures and the results table;
:func:`cifar_bn.experiments.batch_size` trains them into ``root/bs<B>/<method>`` (``bs5/renorm``,
``bs50/ghost10``: 14 TensorBoard runs, each with its text card and hparams) and gives ``root`` the
figures and the experiment's card.
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import NamedTuple

from .config import PRESETS, RENORM_DMAX, RENORM_RMAX, TrainConfig
from .figures import LABELS, batch_size_curve_draws, batch_size_summary_draws, colour_note

PRESET = PRESETS["batch-size"]
BATCH_SIZES = (5, 10, 50)
NORMS = ("none", "torch_bn", "renorm", "layernorm")  # at every batch size
GHOST_BATCH, VIRTUAL_BATCH_SIZES = 50, (5, 10)  # ghost batch norm: batches of 50, statistics over 5 or 10
KEYS = (("final_train_acc", "final train acc"), ("best_val_acc", "best val acc"))
CARD = ("**Batch size** (the notebook's batch-size section): the 5-hidden-layer MLP of `deep`, weights ~ "
        "N(0, 0.02^2), Adam at lr 10^-3.5, 1,000 images, 10 epochs, at batch sizes 5, 10 and 50 with no "
        "normalization, torch_bn batch norm, batch renormalization (`renorm`: rmax {rmax:g}, dmax {dmax:g}, plain "
        "batch norm for the first epoch) and nn.LayerNorm, and ghost batch norm at batch 50 with statistics over "
        "chunks of 5 and 10 samples (`bs50/ghost5`, `bs50/ghost10`). Runs are named `bs<batch>/<method>`. "
        "Figures: `batch_size_train/*` and `batch_size_val/*`, accuracy per epoch, one panel per batch size; "
        "`batch_size_summary/*`, best val and final train accuracy against the batch size (ghost: against its "
        "virtual batch size, joined to batch norm at 50).").format(rmax=RENORM_RMAX, dmax=RENORM_DMAX)


def card(note: str = "") -> str:
    """The experiment's text card: CARD, then ``note`` (e.g. the seeds of a reproduction), then the
    figures' colours (TensorBoard's charts cannot take them for 14 runs: the card says how to colour
    them by normalization)."""
    return CARD + note + "\n\n" + colour_note([*NORMS, "ghost"], charts=False)


class Run(NamedTuple):
    """One run of the experiment: its batch size, method ("ghost5" for ghost batch norm over 5
    samples, otherwise the norm), config and folder under the experiment's root."""

    batch_size: int
    method: str
    config: TrainConfig
    name: str


def plan(config: TrainConfig) -> list[Run]:
    """The experiment's runs for ``config`` (its norm, batch size and norm options are replaced)."""
    base = replace(config, norm="none", virtual_batch_size=None, renorm_warmup=None)
    runs = [Run(b, norm, replace(base, norm=norm, batch_size=b), f"bs{b}/{norm}")
            for b in BATCH_SIZES for norm in NORMS]
    runs += [Run(GHOST_BATCH, f"ghost{v}", replace(base, norm="ghost", batch_size=GHOST_BATCH, virtual_batch_size=v),
                 f"bs{GHOST_BATCH}/ghost{v}") for v in VIRTUAL_BATCH_SIZES]
    return runs


def label(method: str) -> str:
    if method.startswith("ghost"):
        return f"ghost batch norm, {int(method[5:])} of {GHOST_BATCH}"
    return LABELS[method]


def norm_of(method: str) -> str:
    return "ghost" if method.startswith("ghost") else method


Results = dict[str, dict[int, dict]]  # method -> batch size -> summary


def figures(seeds: list[Results]) -> dict[str, dict]:
    """The experiment's figures (name -> panel draws) from one Results per seed."""
    curves: dict[int, dict] = {}
    for method, by_batch in seeds[0].items():
        for b in by_batch:
            curves.setdefault(b, {})[method] = (norm_of(method), label(method), [s[method][b] for s in seeds])
    curves = {b: curves[b] for b in sorted(curves)}
    lines = {m: (m, LABELS[m], {b: [s[m][b] for s in seeds] for b in seeds[0][m]})
             for m in seeds[0] if not m.startswith("ghost")}
    ghosts = sorted(m for m in seeds[0] if m.startswith("ghost"))
    if ghosts:
        points = {int(m[5:]): [s[m][GHOST_BATCH] for s in seeds] for m in ghosts}
        if GHOST_BATCH in seeds[0].get("torch_bn", {}):  # virtual batch = batch: plain batch norm
            points[GHOST_BATCH] = [s["torch_bn"][GHOST_BATCH] for s in seeds]
        lines["ghost"] = ("ghost", f"ghost batch norm in batches of {GHOST_BATCH}", points)
    return {"batch_size_train": batch_size_curve_draws(curves, "train_acc", "Training accuracy"),
            "batch_size_val": batch_size_curve_draws(curves, "val_acc", "Validation accuracy"),
            "batch_size_summary": batch_size_summary_draws(lines)}


def spread(values: list[float]) -> str:
    """Mean (min-max) to 3 decimals."""
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(seeds: list[Results]) -> list[str]:
    """Markdown rows: one per method and batch size, final train and best val accuracy as mean (range) over seeds,
    and the median wall time of one run."""
    lines = ["| normalization | batch size | " + " | ".join(name for _, name in KEYS) + " | wall s per run |",
             "| --- | --- | --- | --- | --- |"]
    for method, by_batch in seeds[0].items():
        for b in sorted(by_batch):
            runs = [s[method][b] for s in seeds]
            lines.append(f"| {label(method)} | {b} | " + " | ".join(spread([r[k] for r in runs]) for k, _ in KEYS)
                         + f" | {statistics.median(r['wall_time_s'] for r in runs):.1f} |")
    return lines
