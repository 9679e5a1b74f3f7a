"""TensorBoard logging of a training run, through tensorboard's SummaryWriter.

Every tag uses the iteration count as its step (epoch-level scalars at the iteration that
ends the epoch), so a resumed run can drop events past its checkpoint with ``purge_step``.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


class RunLogger:
    """One run's dashboard: scalars, BN histograms, hparams and figures in ``run_dir``."""

    def __init__(self, run_dir: str, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(run_dir, purge_step=purge_step)

    def iteration(self, step: int, loss: float) -> None:
        self.writer.add_scalar("loss/train", loss, step)

    def epoch(self, step: int, train_acc: float, val_acc: float, lr: float, norms: list[nn.Module]) -> None:
        self.writer.add_scalar("accuracy/train", train_acc, step)
        self.writer.add_scalar("accuracy/val", val_acc, step)
        self.writer.add_scalar("lr", lr, step)
        for i, bn in enumerate(norms):
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(bn, name, None)
                if t is not None:
                    self.writer.add_histogram(f"bn{i}/{name}", t.detach().float().cpu(), step)

    def hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """One row in TensorBoard's HPARAMS tab for this run (written into this run's folder,
        unlike SummaryWriter.add_hparams, which opens a sub-folder per call)."""
        flat = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in config.items()}
        for summary in hparams(flat, metrics):
            self.writer.file_writer.add_summary(summary, step)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        self.writer.add_figure(tag, fig, step, close=False)

    def close(self) -> None:
        self.writer.close()
