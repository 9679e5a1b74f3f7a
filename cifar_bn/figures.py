"""The notebook's figures, drawn with matplotlib from run summaries (no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def deep_figure(histories: dict[str, dict]) -> Figure:
    """The notebook's section 2: training loss per iteration, train and val accuracy per epoch.

    histories: label -> History as a dict (loss, train_acc, val_acc).
    """
    fig, axes = plt.subplots(3, 1, figsize=(10, 12))
    for label, h in histories.items():
        axes[0].plot(h["loss"], "o", markersize=3, label=label)
        axes[1].plot(h["train_acc"], "-o", label=label)
        axes[2].plot(h["val_acc"], "-o", label=label)
    for ax, title, xlabel in zip(axes, ("Training loss", "Training accuracy", "Validation accuracy"),
                                 ("Iteration", "Epoch", "Epoch")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def weight_scale_figure(scales: list[float], results: dict[str, list[dict]]) -> Figure:
    """The notebook's section 3: best val acc, best train acc and final training loss vs weight scale.

    results: label -> one summary per scale (best_val_acc, best_train_acc, final_loss).
    """
    fig, axes = plt.subplots(3, 1, figsize=(10, 14))
    panels = [("best_val_acc", "Best val accuracy"), ("best_train_acc", "Best training accuracy"),
              ("final_loss", "Final training loss")]
    for ax, (key, ylabel) in zip(axes, panels):
        for label, summaries in results.items():
            ax.semilogx(scales, [s[key] for s in summaries], "-o", label=label)
        ax.set_title(f"{ylabel} vs weight initialization scale")
        ax.set_xlabel("Weight initialization scale")
        ax.set_ylabel(ylabel)
        ax.legend()
    axes[2].set_ylim(1.0, 3.5)  # as the notebook: diverged runs (huge loss) go off the top
    fig.tight_layout()
    return fig
