"""Benchmark: the CIFAR-10 MLP's training time with torch_bn against nn.BatchNorm1d.

    python -m bench.train_time --data-dir DIR --seeds 6
    python -m bench.train_time --data-dir DIR --seeds 6 --num-train 20000 --epochs 2 --threads 2
    python -m bench.train_time --steps --threads 1      # one training step, in one process

Runs ``python train.py --compare --norms torch_bn,nn`` once per seed, and again with the order
swapped (``--norms nn,torch_bn``): the compare trains its models one after the other, so a drift of
a shared machine would otherwise fall on one of them; each run writes its own wall time (training
and evaluation, the dashboards' logging included) to summary.json, and the ratio torch_bn / nn is
taken within each compare. Prints every ratio and their median; the logs go to a temporary folder,
removed at the end. Extra arguments after ``--`` go to train.py.

Whole runs of a few seconds each vary by 20% on a shared machine. ``--steps`` measures in one
process instead: a training step (forward, cross-entropy, backward, Adam) of the compare's model
(``cifar_bn.models.MLP``, five hidden layers of 100, batch 50) with torch_bn and with nn.BatchNorm1d,
in random turns, medians of the thread's CPU time and of the wall clock; no data needed (the timing
does not depend on the pixel values).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def compare_once(norms: str, seed: int, args: argparse.Namespace, logdir: str) -> dict[str, float]:
    """One ``train.py --compare`` run: the wall time of each normalization, in seconds."""
    command = [sys.executable, TRAIN, "--compare", "--norms", norms, "--seed", str(seed), "--num-train",
               str(args.num_train), "--epochs", str(args.epochs), "--logdir", logdir, "--quiet", *args.train_args]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.no_verify:
        command.append("--no-verify")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"train.py failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    (run,) = [os.path.join(logdir, d) for d in os.listdir(logdir)]
    return {name: json.load(open(os.path.join(run, name, "summary.json")))["wall_time_s"] for name in norms.split(",")}


def step_times(threads: int, samples: int, steps: int = 5) -> dict[str, tuple[float, float]]:
    """Per training step, medians in microseconds: norm -> (CPU time, wall time)."""
    import torch

    from cifar_bn.models import MLP

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, labels = torch.randn(50, 3072), torch.randint(0, 10, (50,))
    models = {norm: MLP(3072, (100,) * 5, 10, norm=norm) for norm in ("torch_bn", "nn")}
    models["torch_bn"].load_state_dict(models["nn"].state_dict())
    optimizers = {norm: torch.optim.Adam(m.parameters(), lr=1e-3) for norm, m in models.items()}

    def step(norm: str) -> None:
        optimizers[norm].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(models[norm](x), labels).backward()
        optimizers[norm].step()

    for norm in models:
        for _ in range(20):
            step(norm)
    cpu, wall = {norm: [] for norm in models}, {norm: [] for norm in models}
    order = list(models)
    for _ in range(samples):
        random.shuffle(order)
        for norm in order:
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(steps):
                step(norm)
            cpu[norm].append((time.thread_time_ns() - c0) / steps / 1e3)
            wall[norm].append((time.perf_counter_ns() - w0) / steps / 1e3)
    return {norm: (statistics.median(cpu[norm]), statistics.median(wall[norm])) for norm in models}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="CIFAR-10 folder, as train.py's --data-dir")
    p.add_argument("--no-verify", action="store_true", help="as train.py's --no-verify")
    p.add_argument("--seeds", type=int, default=6, help="seeds 0..SEEDS-1, each in both orders")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for train.py (default: its own); "
                   "--steps: torch.set_num_threads (default 1)")
    p.add_argument("--steps", action="store_true", help="time one training step in one process instead of runs")
    p.add_argument("--samples", type=int, default=200, help="--steps: timed samples of 5 steps per model")
    p.add_argument("train_args", nargs="*", help="after --: more train.py arguments")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.num_train < 1 or args.epochs < 1 or args.samples < 1:
        p.error("--seeds, --num-train, --epochs and --samples must be positive")
    if args.steps:
        t = step_times(args.threads or 1, args.samples)
        for norm, (cpu, wall) in t.items():
            print(f"{norm}: {cpu:.0f} us CPU, {wall:.0f} us wall per training step")
        print(f"torch_bn / nn.BatchNorm1d per training step ({args.threads or 1} thread(s), {args.samples} samples "
              f"of 5 steps): CPU {t['torch_bn'][0] / t['nn'][0]:.3f}, wall {t['torch_bn'][1] / t['nn'][1]:.3f}")
        return
    ratios = []
    with tempfile.TemporaryDirectory(prefix="torch_bn_train_time_") as tmp:
        for seed in range(args.seeds):
            for norms in ("torch_bn,nn", "nn,torch_bn"):
                logdir = os.path.join(tmp, f"{seed}_{norms.replace(',', '_')}")
                os.makedirs(logdir)
                t = compare_once(norms, seed, args, logdir)
                ratios.append(t["torch_bn"] / t["nn"])
                print(f"seed {seed}, --norms {norms}: torch_bn {t['torch_bn']:.2f} s, nn {t['nn']:.2f} s, "
                      f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"torch_bn / nn.BatchNorm1d training time over {len(ratios)} runs: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}); --num-train {args.num_train} --epochs {args.epochs}")


if __name__ == "__main__":
    main()
