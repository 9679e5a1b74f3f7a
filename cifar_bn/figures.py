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
# The experiments train batch norm first, then none, then nn.BatchNorm1d, then the variants
# (COMPARE_ORDER), so these are also the colours of their runs in TensorBoard's charts where a launch
# runs a prefix of that order (a sweep's many runs, or --norms in another order, excepted).
COMPARE_ORDER = ("torch_bn", "none", "nn", "renorm", "ghost", "layernorm")
COLORS = dict(zip(COMPARE_ORDER, TENSORBOARD_PALETTE))
LABELS = {"torch_bn": "batch norm (torch_bn)", "nn": "nn.BatchNorm1d", "none": "no normalization",
          "renorm": "batch renorm (torch_bn)", "ghost": "ghost batch norm (torch_bn)", "layernorm": "nn.LayerNorm"}
COLOR_NAMES = {"#ff7043": "orange", "#0077bb": "blue", "#cc3311": "red", "#33bbee": "cyan", "#ee3377": "magenta",
               "#009988": "teal"}
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
    regex = "/(" + "|".join(norms) + r")\d*$"  # \d*: ghost batch norm's runs name their virtual batch (ghost5)
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


def _band(ax: Axes, x, runs: list[list[float]], color: str, label: str, style: str = "-o") -> None:
    """The mean of several runs' curves (same x), with their min-max range shaded (none for one run)."""
    values = np.asarray(runs, dtype=float)
    ax.plot(x, values.mean(0), style, markersize=3, color=color, label=label)
    if len(values) > 1:
        ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.15, linewidth=0)


def batch_size_curve_draws(results: dict[int, dict[str, tuple[str, str, list[dict]]]], key: str,
                           title: str) -> dict[str, Panel]:
    """The notebook's batch-size plots: the per-epoch accuracy ``key`` ("train_acc" or "val_acc"),
    one panel per batch size, one colour per normalization (a second line style for a second run of
    one normalization, such as two virtual batch sizes); several seeds give their mean and range.
    results: batch size -> method -> (norm, label, the summaries of its seeds)."""

    def panel(batch: int, methods: dict[str, tuple[str, str, list[dict]]]) -> Panel:
        def draw(ax: Axes) -> None:
            seen: dict[str, int] = {}
            for norm, label, summaries in methods.values():
                styles = ("-o", "--s", ":^")
                style = styles[seen.get(norm, 0) % len(styles)]
                seen[norm] = seen.get(norm, 0) + 1
                runs = [s["history"][key] for s in summaries]
                _band(ax, np.arange(len(runs[0])), runs, COLORS[norm], label, style)
            ax.set(title=f"{title}, batch size {batch}", xlabel="Epoch", ylabel="accuracy")
            ax.legend(loc="best", fontsize="small")
        return draw

    return {f"batch{batch:02d}": panel(batch, methods) for batch, methods in results.items()}


def batch_size_summary_draws(lines: dict[str, tuple[str, str, dict[int, list[dict]]]]) -> dict[str, Panel]:
    """Best validation accuracy and final training accuracy against the batch size, one line per
    normalization: the mean over seeds, error bars from the smallest to the largest seed.
    lines: name -> (norm, label, x value -> the summaries of its seeds); a line with a dashed
    style when its name starts with "ghost" (x is then the virtual batch size)."""

    def panel(key: str, ylabel: str) -> Panel:
        def draw(ax: Axes) -> None:
            for name, (norm, label, points) in lines.items():
                xs = sorted(points)
                values = [np.asarray([s[key] for s in points[x]], dtype=float) for x in xs]
                mean = np.asarray([v.mean() for v in values])
                err = np.asarray([[m - v.min() for m, v in zip(mean, values)],
                                  [v.max() - m for m, v in zip(mean, values)]])
                ax.errorbar(xs, mean, yerr=err, fmt="--s" if name.startswith("ghost") else "-o", markersize=4,
                            capsize=3, color=COLORS[norm], label=label)
            ax.set_xscale("log")
            ticks = sorted({x for _, _, points in lines.values() for x in points})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set(title=f"{ylabel} vs batch size", xlabel="batch size (ghost: virtual batch size, batches of 50)",
                   ylabel=ylabel)
            ax.legend(loc="best", fontsize="small")
        return draw

    return {"best_val_acc": panel("best_val_acc", "Best val accuracy"),
            "final_train_acc": panel("final_train_acc", "Final training accuracy")}
