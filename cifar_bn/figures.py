"""The figures, drawn with matplotlib from run summaries (no display needed).

Each figure is a set of panels. ``panels`` gives one card-sized figure per panel (what
TensorBoard shows, one image each, legible in its card); ``row`` draws the same panels side by
side in one figure (the PNG in the run folder and the README). Each normalization has one colour
and one label in every figure (COLORS, LABELS).
"""
from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# TensorBoard's run colours (2.x, its default palette): it lists a logdir's runs in the order they
# started (first event) and gives the i-th PALETTE[i % 7]; a log cannot choose a colour.
TENSORBOARD_PALETTE = ("#ff7043", "#0077bb", "#cc3311", "#33bbee", "#ee3377", "#009988", "#bbbbbb")
# The experiments train batch norm first, then none, then nn.BatchNorm1d (COMPARE_ORDER), so these
# are also the colours of their runs in TensorBoard's charts (a sweep's many runs excepted).
COMPARE_ORDER = ("torch_bn", "none", "nn")
COLORS = dict(zip(COMPARE_ORDER, TENSORBOARD_PALETTE))
LABELS = {"torch_bn": "batch norm (torch_bn)", "nn": "nn.BatchNorm1d", "none": "no normalization"}
COLOR_NAMES = {"#ff7043": "orange", "#0077bb": "blue", "#cc3311": "red"}
CARD = (5.0, 3.4)  # inches at 100 dpi: 500 x 340 px; the Images dashboard shows it about 340 px wide
FONT = 13  # points: about 12 px on screen where TensorBoard shrinks the image to its ~340 px card


def colour_note(norms: list[str], charts: bool) -> str:
    """The text card's line on colours; charts: whether TensorBoard's charts use the figures' colours
    (each norm one run, started in COMPARE_ORDER)."""
    names = ", ".join(f"{LABELS[n]} {COLOR_NAMES[COLORS[n]]}" for n in norms)
    if charts:
        return (f"Colours: {names}, in the figures and in the Scalars, Custom Scalars, Images and Histograms "
                f"charts (TensorBoard colours runs in the order they started; a log cannot choose a colour). "
                f"Time Series picks its own colours: set them with the palette in its runs table.")
    regex = "/(" + "|".join(norms) + ")$"
    return (f"Colours: in the figures {names}. TensorBoard colours runs in the order they started and a log "
            f"cannot choose a colour, so with this many runs its charts repeat seven colours; to colour them by "
            f"normalization, open Time Series and colour its runs by the regex `{regex}` (the palette in its "
            f"runs table).")


Panel = Callable[[Axes], None]


def panels(draws: dict[str, Panel]) -> dict[str, Figure]:
    """One card-sized figure per panel: name -> Figure."""
    out = {}
    for name, draw in draws.items():
        with plt.rc_context({"font.size": FONT}):
            fig, ax = plt.subplots(figsize=CARD, dpi=100)
            draw(ax)
        fig.tight_layout()
        out[name] = fig
    return out


def row(draws: dict[str, Panel]) -> Figure:
    """All panels side by side in one figure."""
    fig, axes = plt.subplots(1, len(draws), figsize=(CARD[0] * len(draws), CARD[1]), dpi=100, squeeze=False)
    for ax, draw in zip(axes[0], draws.values()):
        draw(ax)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    """Release a figure drawn here (pyplot keeps every figure until closed)."""
    plt.close(fig)


def _epochs(history: dict) -> tuple[np.ndarray, np.ndarray]:
    """(epoch of each iteration, epoch of each accuracy check): iterations as fractions of epochs."""
    epochs = max(len(history["train_acc"]) - 1, 1)
    per_epoch = max(len(history["loss"]) / epochs, 1)
    iters = np.arange(1, len(history["loss"]) + 1) / per_epoch
    checks = np.asarray(history.get("check_step") or np.arange(len(history["val_acc"])) * per_epoch) / per_epoch
    return iters, checks


def _smooth(values: list[float], n: int) -> np.ndarray:
    """Moving average over n points (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    i = np.arange(1, len(c))
    lo = np.maximum(i - n, 0)
    return (c[i] - c[lo]) / (i - lo)


def curve_draws(histories: dict[str, dict]) -> dict[str, Panel]:
    """Training loss (each iteration faint, a moving average solid), train and val accuracy at
    every check, against epochs; histories: norm -> History as a dict."""

    def loss(ax: Axes) -> None:
        for norm, h in histories.items():
            x, _ = _epochs(h)
            ax.plot(x, h["loss"], ".", markersize=2, alpha=0.25, color=COLORS[norm])
            ax.plot(x, _smooth(h["loss"], max(len(h["loss"]) // 50, 1)), color=COLORS[norm], label=LABELS[norm])
        ax.set(title="Training loss", xlabel="Epoch", ylabel="cross-entropy")
        ax.legend(loc="best")

    def accuracy(key: str, title: str) -> Panel:
        def draw(ax: Axes) -> None:
            for norm, h in histories.items():
                _, x = _epochs(h)
                ax.plot(x, h.get(f"check_{key}") or h[key], "-o", markersize=3, color=COLORS[norm], label=LABELS[norm])
            ax.set(title=title, xlabel="Epoch", ylabel="accuracy")
            ax.legend(loc="best")
        return draw

    return {"loss": loss, "train_accuracy": accuracy("train_acc", "Training accuracy (1,000 images)"),
            "val_accuracy": accuracy("val_acc", "Validation accuracy")}


def weight_scale_draws(scales: list[float], results: dict[str, list[dict]]) -> dict[str, Panel]:
    """The notebook's section 3: best val acc, best train acc and final training loss against the
    weight-initialization scale; results: norm -> one summary per scale."""

    def panel(key: str, ylabel: str) -> Panel:
        def draw(ax: Axes) -> None:
            for norm, summaries in results.items():
                ax.semilogx(scales, [s[key] for s in summaries], "-o", color=COLORS[norm], label=LABELS[norm])
            ax.set(title=f"{ylabel} vs init scale", xlabel="weight initialization scale", ylabel=ylabel)
            if key == "final_loss":
                ax.set_ylim(1.0, 3.5)  # as the notebook: diverged runs (huge loss) go off the top
            ax.legend(loc="best")
        return draw

    return {"best_val_acc": panel("best_val_acc", "Best val acc"),
            "best_train_acc": panel("best_train_acc", "Best train acc"),
            "final_loss": panel("final_loss", "Final loss")}


def activation_std_draws(runs: dict[str, tuple[float, dict[str, dict]]]) -> dict[str, Panel]:
    """The std of each hidden layer's output (depth on the x axis) at initialization (dashed) and
    after training (solid), per normalization: one panel per weight scale; runs: panel name
    (e.g. "tiny") -> (weight scale, norm -> summary with ``activation_std``)."""

    def panel(title: str, summaries: dict[str, dict]) -> Panel:
        def draw(ax: Axes) -> None:
            for norm, s in summaries.items():
                stds = s["activation_std"]
                depth = np.arange(1, len(stds["init"]) + 1)
                ax.semilogy(depth, stds["init"], "--o", markersize=4, color=COLORS[norm],
                            label=f"{LABELS[norm]}, init")
                ax.semilogy(depth, stds["final"], "-o", markersize=4, color=COLORS[norm],
                            label=f"{LABELS[norm]}, trained")
            ax.set(title=title, xlabel="hidden layer (depth)", ylabel="output std (after ReLU)")
            ax.set_xticks(depth)
            ax.legend(loc="best", fontsize="small")
        return draw

    return {name: panel(f"{name.capitalize()} init scale {scale:.1e}", summaries)
            for name, (scale, summaries) in runs.items()}
