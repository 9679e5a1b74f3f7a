"""Time the notebook's weight-scale sweep trained sequentially and vectorized, and check they agree.

    python -m bench.vectorized_sweep --data-dir ../shared/data --no-verify [--threads 2] [--repeats 1]

One run of this script trains the whole sweep (20 scales x BN/none, hidden 50x7, 1,000 images, 10 epochs,
as ``python train.py --experiment weight-scale [--vectorized]``) both ways, alternating, each in a fresh child
process (so that each reports its own peak memory), on the same data and threads. Each sweep is the whole
experiment: training, evaluation, TensorBoard logging, checkpoints, summaries and the figure; data loading is
outside the time. Then it compares every model of the last two sweeps: losses per iteration, accuracies,
final weights.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sweep(vectorized: bool, args: dict, root: str, queue) -> None:
    """Child process: load the data, train the sweep into root, report time and memory."""
    torch.set_num_threads(args["threads"])
    from dataclasses import replace

    from cifar_bn import experiments
    from cifar_bn.data import load_cifar10
    from cifar_bn.training import TrainConfig

    preset = dict(experiments.PRESETS["weight-scale"])
    num_train = preset.pop("num_train")
    data = load_cifar10(args["data_dir"], num_train, verify=args["verify"])
    config = replace(TrainConfig(**preset), device="cpu")
    before = _rss_mib()
    start = time.perf_counter()
    experiments.weight_scale(config, data, root, progress=False, num_scales=args["num_scales"], vectorized=vectorized)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put({"wall_s": wall, "peak_rss_mib": peak, "rss_before_mib": before})


def run_child(vectorized: bool, args: dict, root: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_sweep, args=(vectorized, args, root, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def compare(seq_root: str, vec_root: str) -> dict:
    """Largest differences between the two sweeps over every model."""
    import json

    from cifar_bn.vectorized import load_state_dicts

    runs = sorted(d for d in os.listdir(seq_root) if os.path.isdir(os.path.join(seq_root, d)))
    worst = {"loss_abs": 0.0, "loss_rel": 0.0, "acc_images": 0, "test_acc_images": 0, "weight_rel": 0.0,
             "bias_before_bn_abs": 0.0, "runs": len(runs)}
    vec_states = load_state_dicts(vec_root)
    order = [f"scale{i:02d}_{n}" for i in range(len(runs) // 2) for n in ("torch_bn", "none")]
    for k, d in enumerate(order):
        with open(os.path.join(seq_root, d, "summary.json")) as f:
            a = json.load(f)
        with open(os.path.join(vec_root, d, "summary.json")) as f:
            b = json.load(f)
        for x, y in zip(a["history"]["loss"], b["history"]["loss"]):
            if x == x and y == y:  # diverged runs have inf/nan losses in both
                worst["loss_abs"] = max(worst["loss_abs"], abs(x - y))
                worst["loss_rel"] = max(worst["loss_rel"], abs(x - y) / max(abs(x), 1e-12))
        for key in ("train_acc", "val_acc"):
            worst["acc_images"] = max([worst["acc_images"]] + [round(abs(x - y) * 1000) for x, y in
                                                                zip(a["history"][key], b["history"][key])])
        worst["test_acc_images"] = max(worst["test_acc_images"], round(abs(a["test_acc"] - b["test_acc"]) * 1000))
        ref = torch.load(os.path.join(seq_root, d, "checkpoint.pt"), weights_only=True)["model"]
        for name, v in ref.items():
            if not v.is_floating_point():
                continue
            diff = (vec_states[k][name].double() - v.double()).abs().max().item()
            feeds_bn = f"net.{int(name.split('.')[1]) + 1}.running_mean" in ref
            if feeds_bn and (name.endswith(".bias") or name.endswith("running_mean")):
                worst["bias_before_bn_abs"] = max(worst["bias_before_bn_abs"], diff)
            elif v.abs().max() > 0 and torch.isfinite(v).all():
                worst["weight_rel"] = max(worst["weight_rel"], diff / v.abs().max().item())
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="sweeps of each kind, alternating")
    p.add_argument("--num-scales", type=int, default=20)
    a = p.parse_args()
    args = {"data_dir": a.data_dir, "verify": not a.no_verify, "threads": a.threads, "num_scales": a.num_scales}
    times: dict[str, list[dict]] = {"sequential": [], "vectorized": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for kind in ("sequential", "vectorized"):
                root = os.path.join(tmp, f"{kind}{r}")
                times[kind].append(run_child(kind == "vectorized", args, root))
                print(f"{kind:<10} repeat {r}: {times[kind][-1]['wall_s']:.1f} s, "
                      f"peak RSS {times[kind][-1]['peak_rss_mib']:.0f} MiB", flush=True)
        worst = compare(os.path.join(tmp, f"sequential{a.repeats - 1}"), os.path.join(tmp, f"vectorized{a.repeats - 1}"))
    med = {k: statistics.median(t["wall_s"] for t in v) for k, v in times.items()}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} thread(s), {2 * a.num_scales} runs per sweep, {a.repeats} repeat(s), load average "
          f"{os.getloadavg()[0]:.1f}")
    for k in times:
        print(f"{k:<10}: median {med[k]:.1f} s, peak RSS {max(t['peak_rss_mib'] for t in times[k]):.0f} MiB "
              f"(after loading the data: {times[k][0]['rss_before_mib']:.0f} MiB)")
    print(f"speedup: {med['sequential'] / med['vectorized']:.2f}x")
    print(f"agreement over {worst['runs']} runs: loss per iteration max |diff| {worst['loss_abs']:.2e} "
          f"(relative {worst['loss_rel']:.2e}); accuracies differ by at most {worst['acc_images']} of 1000 images "
          f"(test: {worst['test_acc_images']}); weights max relative diff {worst['weight_rel']:.2e}; "
          f"Linear biases feeding a BN and their running means max |diff| {worst['bias_before_bn_abs']:.2e}")


if __name__ == "__main__":
    main()
