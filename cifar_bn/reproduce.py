"""Regenerate every result the README quotes, from the current code, into one results file.

    python -m cifar_bn.reproduce --data-dir ../shared/data --no-verify

Runs, under a new folder runs/reproduce-<time>/ (TensorBoard dashboards included):
  - the notebook's section 2 (``--experiment deep``) over several seeds, at the chosen thread
    count, and some of them again at another, to measure how much the thread count moves the numbers;
  - the notebook's section 3 (``--experiment weight-scale``), with its two figures;
  - ``--compare`` on the full 49,000 images (10 epochs), with its curves figure;
  - the cost of the per-layer dashboard statistics: one epoch with and without them, alternated;
  - the notebook's batch-size experiment (``--experiment batch-size``) over several seeds, with its
    figures over all of them.
Writes the results file (default docs/results.md: tables, command, machine, threads, library
versions, date) and copies the figures the README shows into docs/figures/.
``--only batch-size`` runs the batch-size experiment alone and replaces only its section of the
results file (between its ``<!-- batch-size -->`` markers), keeping every other result.
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
from .training import LOG_EVERY, TrainConfig, run, versions

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
    config = TrainConfig(**{k: v for k, v in experiments.PRESETS["deep"].items() if k != "num_train"})
    out: dict[str, list[dict]] = {"torch_bn": [], "none": []}
    for seed in range(seeds):
        summaries = experiments.deep(replace(config, seed=seed), data, os.path.join(root, f"seed{seed}"),
                                     progress=progress)
        for norm, s in summaries.items():
            out[norm].append(s)
    return out


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


BATCH_SIZE_SECTION = "batch-size"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def public_command(argv: list[str]) -> str:
    """The command line as the results file shows it: the data folder, which is this machine's, as DIR."""
    out, hide = [], False
    for a in argv:
        out.append("DIR" if hide else "--data-dir=DIR" if a.startswith("--data-dir=") else shlex.quote(a))
        hide = a == "--data-dir"
    return " ".join(out)


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name} -->", f"<!-- /{name} -->"


def splice(text: str, name: str, lines: list[str]) -> str:
    """text with the section ``name`` (between its markers) replaced by lines, or added at the end."""
    begin, end = section_markers(name)
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def batch_size_section(data, root: str, seeds: int, epochs: int, progress: bool, threads: int,
                       figures_dir: str, command: str) -> list[str]:
    """The batch-size experiment over seeds 0..seeds-1 (each into root/seed<k>), its figures over all
    seeds (root/batch_size_*.png, copied into figures_dir) and the results file's section: the
    command, machine, load, the wall time of each seed's whole experiment, and the table."""
    config = replace(TrainConfig(**{k: v for k, v in batch_sizes.PRESET.items() if k != "num_train"}), epochs=epochs)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
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
    paths = experiments.publish(root, seeds_run, batch_sizes.card(f" Over seeds 0-{seeds - 1}: curves are means with "
                                f"the min-max range shaded, error bars span the seeds."), batch_sizes.figures(seeds_results))
    os.makedirs(figures_dir, exist_ok=True)
    for path in paths:
        shutil.copyfile(path, os.path.join(figures_dir, os.path.basename(path)))
    runs = len(batch_sizes.plan(config))
    return [
        f"## Batch size (the notebook's batch-size section), {seeds} seeds", "",
        f"Regenerated by `python -m cifar_bn.reproduce {command}` on {started}; runs in `{root}`.",
        f"`--experiment batch-size`: 5 hidden layers of 100, weight scale 2e-2, Adam at lr 10^-3.5, "
        f"{len(data.X_train):,} training images, {len(data.X_val):,} validation images, {epochs} epochs, "
        f"torch.set_num_threads({threads}), {cpu_name()} ({os.cpu_count()} cores, shared: load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after). Batch renormalization: rmax "
        f"{batch_sizes.RENORM_RMAX:g}, dmax {batch_sizes.RENORM_DMAX:g}, plain batch norm for the first epoch "
        f"({', '.join(f'{len(data.X_train) // b} steps at batch {b}' for b in batch_sizes.BATCH_SIZES)}). Ghost "
        f"batch norm: batches of {batch_sizes.GHOST_BATCH}, statistics over chunks of "
        f"{' and '.join(map(str, batch_sizes.VIRTUAL_BATCH_SIZES))}. Seeds 0-{seeds - 1}: mean (min-max).",
        "",
        f"Wall time of the whole experiment ({runs} runs, sequential, dashboards and figures included), per seed: "
        + ", ".join(f"{t:.0f} s" for t in times) + " (CPU time of the process: "
        + ", ".join(f"{t:.0f} s" for t in cpu) + "; the rest is waiting for the shared cores).", "",
        *batch_sizes.table(seeds_results), "",
        "Figures (all seeds): " + ", ".join(f"[{os.path.basename(p)}](figures/{os.path.basename(p)})" for p in paths)
        + ".",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py")
    p.add_argument("--no-verify", action="store_true", help="skip only torchvision's md5 check")
    p.add_argument("--num-val", type=int, default=1000, help="validation images (the notebook's 1,000)")
    p.add_argument("--num-test", type=int, default=1000, help="test images (the notebook's 1,000)")
    p.add_argument("--seeds", type=int, default=8, help="seeds of the deep experiment")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every run (one: on a shared "
                   "machine, two threads wait on each other)")
    p.add_argument("--other-threads", type=int, default=2, help="the thread count the deep runs are repeated at")
    p.add_argument("--thread-seeds", type=int, default=4, help="seeds of the deep runs repeated at --other-threads")
    p.add_argument("--num-scales", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--logdir", default="runs")
    p.add_argument("--out", default=os.path.join("docs", "results.md"), help="the results file")
    p.add_argument("--figures", default=os.path.join("docs", "figures"), help="where the README's figures go")
    p.add_argument("--only", choices=(BATCH_SIZE_SECTION,), help="run this result alone and replace only its "
                   "section of the results file")
    p.add_argument("--batch-size-seeds", type=int, default=3, help="seeds of the batch-size experiment")
    p.add_argument("--batch-size-epochs", type=int, default=batch_sizes.PRESET["epochs"],
                   help="epochs of the batch-size experiment (default the notebook's)")
    p.add_argument("--batch-size-num-train", type=int, default=batch_sizes.PRESET["num_train"],
                   help="training images of the batch-size experiment (default the notebook's)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if min(args.batch_size_seeds, args.batch_size_epochs, args.batch_size_num_train) < 1:
        print("reproduce: error: --batch-size-seeds, --batch-size-epochs and --batch-size-num-train must be "
              "positive", file=sys.stderr)
        return 2
    if min(args.seeds, args.threads, args.other_threads, args.thread_seeds, args.overhead_repeats) < 1 \
            or args.num_scales < 2:
        print("reproduce: error: --seeds, --threads, --other-threads, --thread-seeds and --overhead-repeats must "
              "be positive, --num-scales at "
              "least 2", file=sys.stderr)
        return 2
    try:
        data = load_cifar10(args.data_dir, num_val=args.num_val, num_test=args.num_test, verify=not args.no_verify)
    except DataError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    try:
        bs_data = data.subset(args.batch_size_num_train)
    except DataError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    root = os.path.join(args.logdir, time.strftime("reproduce-%Y%m%d-%H%M%S"))
    os.makedirs(root)  # a new folder: nothing earlier is overwritten
    progress = not args.quiet
    command = public_command(argv if argv is not None else sys.argv[1:])
    if args.only == BATCH_SIZE_SECTION:
        torch.set_num_threads(args.threads)
        lines = batch_size_section(bs_data, os.path.join(root, "batch-size"), args.batch_size_seeds,
                                   args.batch_size_epochs, progress, args.threads, args.figures, command)
        text = ""
        if os.path.isfile(args.out):
            with open(args.out) as f:
                text = f.read()
        write_text(args.out, splice(text or "# Results quoted in the README\n", BATCH_SIZE_SECTION, lines))
        print(f"results in {args.out} (section {BATCH_SIZE_SECTION}); runs in {root}")
        return 0
    small = data.subset(1000)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()

    torch.set_num_threads(args.threads)
    deep = deep_seeds(small, os.path.join(root, "deep"), args.seeds, progress)
    torch.set_num_threads(args.other_threads)
    deep_other = deep_seeds(small, os.path.join(root, f"deep-{args.other_threads}threads"),
                            min(args.thread_seeds, args.seeds), progress)
    torch.set_num_threads(args.threads)
    ws_config = TrainConfig(**{k: v for k, v in experiments.PRESETS["weight-scale"].items() if k != "num_train"})
    ws = experiments.weight_scale(ws_config, small, os.path.join(root, "weight-scale"), progress=progress,
                                  num_scales=args.num_scales)
    cmp_root = os.path.join(root, "compare")
    compare = experiments.compare(TrainConfig(), data, cmp_root, progress=progress)
    overhead, with_stats, without = logging_overhead(data, os.path.join(root, "overhead"), args.overhead_repeats,
                                                     progress)
    bs_lines = batch_size_section(bs_data, os.path.join(root, "batch-size"), args.batch_size_seeds,
                                  args.batch_size_epochs, progress, args.threads, args.figures, command)
    total = time.perf_counter() - t0

    os.makedirs(args.figures, exist_ok=True)
    for src, name in ((os.path.join(root, "deep", "seed0", "deep.png"), "deep.png"),
                      (os.path.join(root, "weight-scale", "weight_scale.png"), "weight_scale.png"),
                      (os.path.join(root, "weight-scale", "activation_std.png"), "activation_std.png"),
                      (os.path.join(cmp_root, "compare.png"), "compare.png")):
        shutil.copyfile(src, os.path.join(args.figures, name))

    v = versions()
    lines = [
        "# Results quoted in the README",
        "",
        "Regenerated by `python -m cifar_bn.reproduce " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        + "` from the code of this commit; every run and dashboard is in `" + root + "` of that machine.",
        "",
        f"- date: {started}; total {total / 60:.1f} min",
        f"- machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}",
        f"- threads: torch.set_num_threads({args.threads}) (the {args.other_threads}-thread repeat of the deep runs "
        f"aside)",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- wall-clock times were taken on a shared CPU with other jobs running: read them as rough; the accuracies "
        "are deterministic for a machine and thread count",
        "",
        f"## Deep network (the notebook's section 2), {args.seeds} seeds",
        "",
        f"`--experiment deep`: 5 hidden layers of 100, weight scale 2e-2, Adam 1e-3, 1,000 images, 10 epochs; "
        f"seeds 0-{args.seeds - 1}, mean (min-max). The notebook printed one run (last printed train accuracy, "
        f"epoch 9; best printed val accuracy). Last two columns: medians; the share of the wall time spent "
        f"in the per-layer statistics and histograms.",
        "",
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

    n_other = len(deep_other["none"])
    lines += [f"### {args.threads} vs {args.other_threads} threads", "",
              f"The deep runs of seeds 0-{n_other - 1} again at torch.set_num_threads({args.other_threads}): the "
              f"largest difference from the {args.threads}-thread runs, and the number of runs whose value differs "
              f"at all.", "",
              "| model | " + " | ".join(name for _, name in KEYS) + " | final loss |", "| --- | --- | --- | --- | --- |"]
    for norm in deep:
        cells = []
        for k in [k for k, _ in KEYS] + ["final_loss"]:
            diffs = [abs(a[k] - b[k]) for a, b in zip(deep[norm], deep_other[norm])]
            cells.append(f"{max(diffs):.3f} ({sum(d > 0 for d in diffs)} of {len(diffs)} differ)")
        lines.append(f"| {LABELS[norm]} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Weight-initialization scale (the notebook's section 3)", "",
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
    lines += ["", "Std of the last hidden layer's output (after ReLU; figure `activation_std.png` shows every "
              "layer) at the smallest and largest scale, at init -> after training: " + "; ".join(
                  f"{LABELS[n]} " + ", ".join(
                      f"{stds[n]['init'][j][-1]:.2g} -> {stds[n]['final'][j][-1]:.2g}" for j in (0, 1))
                  for n in stds) + ".", ""]

    lines += ["## Compare on the full training set", "",
              "`--compare`: 5 hidden layers of 100, PyTorch's default init, Adam 1e-3, batch 50, 49,000 images, "
              "10 epochs, seed 0.", "",
              "| model | final train acc | best val acc | test acc | wall s | of which dashboard statistics |",
              "| --- | --- | --- | --- | --- | --- |"]
    for norm, s in compare.items():
        lines.append(f"| {LABELS[norm]} | " + " | ".join(f"{s[k]:.3f}" for k, _ in KEYS)
                     + f" | {s['wall_time_s']:.0f} | {s['logging_time_s']:.2f} s "
                       f"({100 * s['logging_time_s'] / s['wall_time_s']:.1f}%) |")
    lines += ["", "## Cost of the per-layer dashboard statistics", "",
              f"One epoch of the compare's torch_bn run (980 iterations) with the per-layer statistics every "
              f"{LOG_EVERY} iterations and per-epoch histograms, and without (log_every=0), alternated "
              f"{args.overhead_repeats} times: median overhead {100 * overhead:+.1f}% (with: "
              + ", ".join(f"{t:.1f}" for t in with_stats) + " s; without: " + ", ".join(f"{t:.1f}" for t in without)
              + " s). The compare table's last column is the time measured inside the logging calls.", ""]
    write_text(args.out, splice("\n".join(lines), BATCH_SIZE_SECTION, bs_lines))
    print(f"results in {args.out}; runs in {root}")
    return 0


def write_text(path: str, text: str) -> None:
    """Write path atomically (a crash leaves the old file or the new one)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
