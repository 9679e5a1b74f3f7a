"""Regenerate every result the README quotes, from the current code, into one results file.

    python -m cifar_bn.reproduce [--data-dir DIR]

Runs, under a new folder runs/reproduce-<time>/ (TensorBoard dashboards included):
  - the notebook's section 2 (``--experiment deep``) over several seeds, at the chosen thread
    count, and some of them again at another, to measure how much the thread count moves the numbers;
  - the notebook's section 3 (``--experiment weight-scale``), with its two figures;
  - ``--compare`` on the full 49,000 images (10 epochs) over seeds, with its curves figure, and
    seed 0 again at the other thread count;
  - the cost of the per-layer dashboard statistics: one epoch with and without them, alternated;
  - the notebook's batch-size experiment (``--experiment batch-size``) over several seeds, with its
    figures over all of them, and the wall and CPU time of the whole experiment per seed.
Writes the results file (default docs/results.md: tables, command, machine, threads, library
versions, date) and copies the figures the README shows into docs/figures/.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace

import torch

from . import batch_size as batch_sizes
from . import experiments
from .data import DataError, load_cifar10
from .figures import LABELS
from .config import PRESETS, TrainConfig
from .lifecycle import LOG_EVERY, versions
from .runs import write_atomic
from .training import run

# The notebook's section 2 as it printed it (last printed train accuracy, at epoch 9; best printed
# validation accuracy), from its numpy code on the original pixels.
NOTEBOOK_DEEP = {"torch_bn": (0.697, 0.362), "none": (0.367, 0.264)}
KEYS = (("final_train_acc", "final train acc"), ("best_val_acc", "best val acc"), ("test_acc", "test acc"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def deep_seeds(data, root: str, seeds: int, progress: bool) -> dict[str, list[dict]]:
    """``--experiment deep`` at seeds 0..seeds-1: norm -> summaries by seed."""
    config = TrainConfig(**{k: v for k, v in PRESETS["deep"].items() if k != "num_train"})
    out: dict[str, list[dict]] = {"torch_bn": [], "none": []}
    for seed in range(seeds):
        summaries = experiments.deep(replace(config, seed=seed), data, os.path.join(root, f"seed{seed}"),
                                     progress=progress)
        for norm, s in summaries.items():
            out[norm].append(s)
    return out


def compare_seeds(data, root: str, seeds: int, progress: bool) -> dict[str, list[dict]]:
    """``--compare`` at seeds 0..seeds-1: norm -> summaries by seed."""
    out: dict[str, list[dict]] = {}
    for seed in range(seeds):
        for norm, s in experiments.compare(TrainConfig(seed=seed), data, os.path.join(root, f"seed{seed}"),
                                           progress=progress).items():
            out.setdefault(norm, []).append(s)
    return out


def thread_table(runs: dict[str, list[dict]], other: dict[str, list[dict]], keys) -> list[str]:
    """Per model, the largest difference between the runs and the same runs at another thread count,
    and how many differ at all."""
    lines = ["| model | " + " | ".join(name for _, name in keys) + " |", "| --- |" + " --- |" * len(keys)]
    for norm in runs:
        cells = []
        for k, _ in keys:
            diffs = [abs(a[k] - b[k]) for a, b in zip(runs[norm], other[norm])]
            cells.append(f"{max(diffs):.3f} ({sum(d > 0 for d in diffs)} of {len(diffs)} differ)")
        lines.append(f"| {LABELS[norm]} | " + " | ".join(cells) + " |")
    return lines + [""]


def with_threads(threads: int, fn, *args):
    """fn(*args) at torch.set_num_threads(threads), the thread count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def deep_result(small, root: str, args: argparse.Namespace, progress: bool) -> list[str]:
    """The notebook's section 2 over seeds, and some seeds again at another thread count."""
    deep = deep_seeds(small, os.path.join(root, "deep"), args.seeds, progress)
    other = with_threads(args.other_threads, deep_seeds, small, os.path.join(root, f"deep-{args.other_threads}threads"),
                         min(args.thread_seeds, args.seeds), progress)
    lines = [
        f"## Deep network (the notebook's section 2), {args.seeds} seeds", "",
        f"`--experiment deep`: 5 hidden layers of 100, weight scale 2e-2, Adam 1e-3, 1,000 images, 10 epochs; "
        f"seeds 0-{args.seeds - 1}, mean (min-max). The notebook printed one run (last printed train accuracy, "
        f"epoch 9; best printed val accuracy). Last two columns: medians; the share of the wall time spent "
        f"in the per-layer statistics and histograms.", "",
        "| model | final train acc | best val acc | test acc | notebook (train / best val) | wall s per run "
        "| dashboard statistics |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for norm, summaries in deep.items():
        nb = NOTEBOOK_DEEP[norm]
        lines.append(f"| {LABELS[norm]} | " + " | ".join(spread([s[k] for s in summaries]) for k, _ in KEYS)
                     + f" | {nb[0]:.3f} / {nb[1]:.3f} | {statistics.median(s['wall_time_s'] for s in summaries):.1f} | "
                     f"{100 * statistics.median(s['logging_time_s'] / s['wall_time_s'] for s in summaries):.1f}% |")
    lines += ["", "Seed 0 alone: " + "; ".join(
        f"{LABELS[n]} " + " / ".join(f"{deep[n][0][k]:.3f}" for k, _ in KEYS) for n in deep)
        + " (final train / best val / test).", ""]
    n_other = len(other["none"])
    lines += [f"### {args.threads} vs {args.other_threads} threads", "",
              f"The deep runs of seeds 0-{n_other - 1} again at torch.set_num_threads({args.other_threads}): the "
              f"largest difference from the {args.threads}-thread runs, and the number of runs whose value differs "
              f"at all.", ""]
    return lines + thread_table(deep, other, KEYS + (("final_loss", "final loss"),))


def weight_scale_result(small, root: str, args: argparse.Namespace, progress: bool) -> list[str]:
    """The notebook's section 3: every scale with and without batch norm, and the activation stds."""
    config = TrainConfig(**{k: v for k, v in PRESETS["weight-scale"].items() if k != "num_train"})
    ws = experiments.weight_scale(config, small, os.path.join(root, "weight-scale"), progress=progress,
                                  num_scales=args.num_scales)
    lines = ["## Weight-initialization scale (the notebook's section 3)", "",
             f"`--experiment weight-scale`: 7 hidden layers of 50, {args.num_scales} scales logspace(-4, 0), "
             "Adam 1e-3, 1,000 images, 10 epochs, seed 0.", "",
             "| weight scale | " + " | ".join(f"{LABELS[n]}: best train / best val / final loss"
                                              for n in ws) + " |", "| --- | --- | --- |"]
    for i, s_bn in enumerate(ws["torch_bn"]):
        cells = [f"{r[i]['best_train_acc']:.3f} / {r[i]['best_val_acc']:.3f} / {r[i]['final_loss']:.3g}"
                 for r in ws.values()]
        lines.append(f"| {s_bn['config']['weight_scale']:.2e} | " + " | ".join(cells) + " |")
    stds = {n: {when: [r[k]["activation_std"][when] for k in (0, len(r) - 1)] for when in ("init", "final")}
            for n, r in ws.items()}
    return lines + ["", "Std of the last hidden layer's output (after ReLU; figure `activation_std.png` shows every "
                    "layer) at the smallest and largest scale, at init -> after training: " + "; ".join(
                        f"{LABELS[n]} " + ", ".join(
                            f"{stds[n]['init'][j][-1]:.2g} -> {stds[n]['final'][j][-1]:.2g}" for j in (0, 1))
                        for n in stds) + ".", ""]


def compare_result(data, root: str, args: argparse.Namespace, progress: bool) -> list[str]:
    """``--compare`` on the full training set over seeds, and seed 0 again at another thread count."""
    runs = compare_seeds(data, os.path.join(root, "compare"), args.compare_seeds, progress)
    other = with_threads(args.other_threads, compare_seeds, data,
                         os.path.join(root, f"compare-{args.other_threads}threads"), 1, progress)
    lines = ["## Compare on the full training set", "",
             f"`--compare`: 5 hidden layers of 100, PyTorch's default init, Adam 1e-3, batch 50, 49,000 images, "
             f"10 epochs; seeds 0-{args.compare_seeds - 1}, mean (min-max); wall times: medians.", "",
             "| model | final train acc | best val acc | test acc | wall s | of which dashboard statistics |",
             "| --- | --- | --- | --- | --- | --- |"]
    for norm, summaries in runs.items():
        wall = statistics.median(s["wall_time_s"] for s in summaries)
        logging = statistics.median(s["logging_time_s"] for s in summaries)
        lines.append(f"| {LABELS[norm]} | " + " | ".join(spread([s[k] for s in summaries]) for k, _ in KEYS)
                     + f" | {wall:.0f} | {logging:.2f} s ({100 * logging / wall:.1f}%) |")
    lines += ["", f"Seed 0 again at torch.set_num_threads({args.other_threads}): the difference from the "
              f"{args.threads}-thread run.", ""]
    return lines + thread_table({n: r[:1] for n, r in runs.items()}, other, KEYS)


def overhead_result(data, root: str, args: argparse.Namespace, progress: bool) -> list[str]:
    """The cost of the per-layer dashboard statistics: one epoch with and without, alternated."""
    overhead, with_stats, without = logging_overhead(data, os.path.join(root, "overhead"), args.overhead_repeats,
                                                     progress)
    return ["## Cost of the per-layer dashboard statistics", "",
            f"One epoch of the compare's torch_bn run (980 iterations) with the per-layer statistics every "
            f"{LOG_EVERY} iterations and per-epoch histograms, and without (log_every=0), alternated "
            f"{args.overhead_repeats} times: median overhead {100 * overhead:+.1f}% (with: "
            + ", ".join(f"{t:.1f}" for t in with_stats) + " s; without: " + ", ".join(f"{t:.1f}" for t in without)
            + " s). The compare table's last column is the time measured inside the logging calls.", ""]


def logging_overhead(data, root: str, repeats: int, progress: bool) -> tuple[float, list[float], list[float]]:
    """One epoch of the full-data torch_bn run with the per-layer statistics (every LOG_EVERY
    iterations) and without, alternated `repeats` times: (median ratio - 1, with, without)."""
    config = TrainConfig(norm="torch_bn", epochs=1)
    with_stats, without = [], []
    for r in range(repeats):
        for log_every, times in ((LOG_EVERY, with_stats), (0, without)):
            s = run(config, data, os.path.join(root, f"rep{r}_log_every{log_every}"), progress=progress,
                    log_every=log_every)
            times.append(s["wall_time_s"])
    return statistics.median(w / o for w, o in zip(with_stats, without)) - 1, with_stats, without


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def batch_size_result(data, root: str, args: argparse.Namespace, progress: bool) -> list[str]:
    """``--experiment batch-size`` over seeds 0..--batch-size-seeds - 1 on the first
    --batch-size-num-train images (each seed into root/batch-size/seed<k>), its figures over all
    seeds (root/batch-size/batch_size_*.png), and its section: settings, the load, per seed the wall
    and CPU time, the table."""
    data = data.subset(args.batch_size_num_train)
    root = os.path.join(root, "batch-size")
    seeds, epochs = args.batch_size_seeds, args.batch_size_epochs
    config = replace(TrainConfig(**{k: v for k, v in PRESETS["batch-size"].items() if k != "num_train"}), epochs=epochs)
    load_before = os.getloadavg()
    seeds_results, times, cpu = [], [], []
    for seed in range(seeds):
        t0, c0 = time.perf_counter(), cpu_seconds()
        seeds_results.append(experiments.batch_size(replace(config, seed=seed), data,
                                                    os.path.join(root, f"seed{seed}"), progress=progress))
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    load_after = os.getloadavg()
    # The figures over all seeds, and their card, in a run of their own (the seeds' runs hold their own).
    seeds_run = os.path.join(root, "all-seeds")
    experiments.publish(root, seeds_run, batch_sizes.card(f" Over seeds 0-{seeds - 1}: curves are means with the "
                        f"min-max range shaded, error bars span the seeds."), batch_sizes.figures(seeds_results))
    runs = len(batch_sizes.plan(config))
    return [
        f"## Batch size (the notebook's batch-size section), {seeds} seeds", "",
        f"`--experiment batch-size`: 5 hidden layers of 100, weight scale 2e-2, Adam at lr 10^-3.5, "
        f"{len(data.X_train):,} training images, {len(data.X_val):,} validation images, {epochs} epochs; "
        f"batch renormalization with rmax {batch_sizes.RENORM_RMAX:g}, dmax {batch_sizes.RENORM_DMAX:g} and plain "
        f"batch norm for the first epoch ({', '.join(f'{len(data.X_train) // b} steps at batch {b}' for b in batch_sizes.BATCH_SIZES)}); "
        f"ghost batch norm in batches of {batch_sizes.GHOST_BATCH} with statistics over chunks of "
        f"{' and '.join(map(str, batch_sizes.VIRTUAL_BATCH_SIZES))}. Seeds 0-{seeds - 1}: mean (min-max).",
        "",
        f"Wall time of the whole experiment ({runs} runs one after another, dashboards and figures included) per "
        f"seed: " + ", ".join(f"{t:.0f} s" for t in times) + " (CPU time of the process: "
        + ", ".join(f"{t:.0f} s" for t in cpu) + f"; the rest is waiting for the shared cores: load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores).", "",
        *batch_sizes.table(seeds_results), "",
        "Figures (all seeds): [batch_size_summary.png](figures/batch_size_summary.png), "
        "[batch_size_train.png](figures/batch_size_train.png), [batch_size_val.png](figures/batch_size_val.png).", "",
    ]


def command_line(argv: list[str] | None) -> str:
    """The command that ran, as the results file quotes it: the data folder as DIR (where the data
    lies is the machine's business, not the result's)."""
    words = list(argv if argv is not None else sys.argv[1:])
    for i, word in enumerate(words[:-1]):
        if word == "--data-dir":
            words[i + 1] = "DIR"
    return "`python -m cifar_bn.reproduce " + " ".join(shlex.quote(a) for a in words) + "`"


def header(argv: list[str] | None, root: str, args: argparse.Namespace, started: str, total: float) -> list[str]:
    """The results file's title, command, machine, threads, versions and date."""
    return [
        "# Results quoted in the README",
        "",
        f"Regenerated by {command_line(argv)} (DIR: the folder holding cifar-10-batches-py) from the code of this "
        f"commit; every run and dashboard is in `{root}` of that machine.",
        "",
        f"- date: {started}; total {total / 60:.1f} min",
        f"- machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}",
        f"- threads: torch.set_num_threads({args.threads}) (the {args.other_threads}-thread repeats aside)",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in versions().items()),
        "- wall-clock times were taken on a shared CPU with other jobs running: read them as rough; the accuracies "
        "are deterministic for a machine and thread count",
        "",
    ]


# Each result: the function that regenerates it, whether it trains on the notebook's 1,000 images,
# the heading its section of the results file starts with, and the README's figures it makes
# (copied from the run folder, under the figure's name).
RESULTS = {
    "deep": (deep_result, True, "## Deep network", {"deep.png": ("deep", "seed0", "deep.png")}),
    "weight-scale": (weight_scale_result, True, "## Weight-initialization scale",
                     {"weight_scale.png": ("weight-scale", "weight_scale.png"),
                      "activation_std.png": ("weight-scale", "activation_std.png")}),
    "compare": (compare_result, False, "## Compare on the full training set",
                {"compare.png": ("compare", "seed0", "compare.png")}),
    "overhead": (overhead_result, False, "## Cost of the per-layer dashboard statistics", {}),
    "batch-size": (batch_size_result, False, "## Batch size",
                   {f"batch_size_{k}.png": ("batch-size", f"batch_size_{k}.png") for k in ("summary", "train", "val")}),
}


def copy_figures(root: str, folder: str, names: list[str]) -> None:
    """The README's figures of the results ``names``, from this run into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        for figure, parts in RESULTS[name][3].items():
            shutil.copyfile(os.path.join(root, *parts), os.path.join(folder, figure))


def replace_sections(text: str, sections: dict[str, list[str]]) -> str:
    """The results file ``text`` with the sections of the results named in ``sections`` replaced
    (a section runs from its heading to the next "## " heading)."""
    lines, out, skipping = text.split("\n"), [], False
    headings = {RESULTS[name][2]: name for name in sections}
    for line in lines:
        if line.startswith("## "):
            name = next((n for h, n in headings.items() if line.startswith(h)), None)
            skipping = name is not None
            if name is not None:
                out += sections[name]
                continue
        if not skipping:
            out.append(line)
    missing = [n for h, n in headings.items() if not any(line.startswith(h) for line in lines)]
    return "\n".join(out + [line for n in missing for line in sections[n]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py")
    p.add_argument("--no-verify", action="store_true", help="skip only torchvision's md5 check")
    p.add_argument("--num-val", type=int, default=1000, help="validation images (the notebook's 1,000)")
    p.add_argument("--num-test", type=int, default=1000, help="test images (the notebook's 1,000)")
    p.add_argument("--seeds", type=int, default=8, help="seeds of the deep experiment")
    p.add_argument("--compare-seeds", type=int, default=3, help="seeds of --compare (on the full training set)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every run (one: on a shared "
                   "machine, two threads wait on each other)")
    p.add_argument("--other-threads", type=int, default=2,
                   help="the thread count some deep runs and the compare's seed 0 are repeated at")
    p.add_argument("--thread-seeds", type=int, default=4, help="seeds of the deep runs repeated at --other-threads")
    p.add_argument("--num-scales", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--batch-size-seeds", type=int, default=3, help="seeds of the batch-size experiment")
    p.add_argument("--batch-size-epochs", type=int, default=PRESETS["batch-size"]["epochs"],
                   help="epochs of the batch-size experiment (default the notebook's)")
    p.add_argument("--batch-size-num-train", type=int, default=PRESETS["batch-size"]["num_train"],
                   help="training images of the batch-size experiment (default the notebook's)")
    p.add_argument("--logdir", default="runs")
    p.add_argument("--out", default=os.path.join("docs", "results.md"), help="the results file")
    p.add_argument("--figures", default=os.path.join("docs", "figures"), help="where the README's figures go")
    p.add_argument("--only", nargs="+", choices=list(RESULTS), help="regenerate only these results, replacing "
                   "their sections of an existing --out (each then says its own command, date and threads)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.seeds, args.compare_seeds, args.threads, args.other_threads, args.thread_seeds,
           args.overhead_repeats) < 1 or args.num_scales < 2:
        print("reproduce: error: --seeds, --compare-seeds, --threads, --other-threads, --thread-seeds and "
              "--overhead-repeats must be positive, --num-scales at least 2", file=sys.stderr)
        return 2
    if min(args.batch_size_seeds, args.batch_size_epochs, args.batch_size_num_train) < 1:
        print("reproduce: error: --batch-size-seeds, --batch-size-epochs and --batch-size-num-train must be "
              "positive", file=sys.stderr)
        return 2
    if args.only and not os.path.isfile(args.out):
        print(f"reproduce: error: --only replaces sections of {args.out}, which does not exist; run without --only "
              f"first", file=sys.stderr)
        return 2
    names = args.only or list(RESULTS)
    try:
        data = load_cifar10(args.data_dir, num_val=args.num_val, num_test=args.num_test, verify=not args.no_verify)
        # The notebook's 1,000 images, as --experiment deep, for the results that train on them.
        small = data.subset(PRESETS["deep"]["num_train"]) if any(RESULTS[n][1] for n in names) else None
        if "batch-size" in names:
            data.subset(args.batch_size_num_train)  # enough images, before anything is written
    except DataError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    root = os.path.join(args.logdir, time.strftime("reproduce-%Y%m%d-%H%M%S"))
    os.makedirs(root)  # a new folder: nothing earlier is overwritten
    progress = not args.quiet
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    sections = {name: RESULTS[name][0](small if RESULTS[name][1] else data, root, args, progress) for name in names}
    copy_figures(root, args.figures, names)
    if args.only:
        for name, lines in sections.items():
            lines[1:1] = ["", f"Regenerated alone by {command_line(argv)} on {started} ({cpu_name()}, "
                              f"{os.cpu_count()} cores, torch.set_num_threads({args.threads}), runs in `{root}`)."]
        with open(args.out) as f:
            text = replace_sections(f.read(), sections)
    else:
        text = "\n".join(header(argv, root, args, started, time.perf_counter() - t0)
                         + [line for lines in sections.values() for line in lines])
    write_text(args.out, text)
    print(f"results in {args.out}; runs in {root}")
    return 0


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


if __name__ == "__main__":
    sys.exit(main())
