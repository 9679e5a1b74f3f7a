"""Time the notebook's weight-scale sweep trained sequentially and vectorized, and check they agree.

    python -m bench.vectorized_sweep --data-dir DIR --no-verify [--threads 2] [--repeats 1]

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
import statistics
import tempfile
import time

import torch


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _sweep(vectorized: bool, args: dict, root: str, queue) -> None:
    """Child process: load the data, train the sweep into root, report time and memory."""
    torch.set_num_threads(args["threads"])
    from dataclasses import replace

    from cifar_bn import experiments
    from cifar_bn.data import load_cifar10
    from cifar_bn.config import PRESETS, TrainConfig

    preset = dict(PRESETS["weight-scale"])
    num_train = preset.pop("num_train")
    data = load_cifar10(args["data_dir"], num_train, verify=args["verify"])
    config = replace(TrainConfig(**preset), device="cpu")
    before = _rss_mib()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now: the sweep's own peak
        f.write("5")
    start = time.perf_counter()
    experiments.weight_scale(config, data, root, progress=False, num_scales=args["num_scales"], vectorized=vectorized)
    wall = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    queue.put({"wall_s": wall, "peak_rss_mib": peak, "rss_before_mib": before})


def run_child(vectorized: bool, args: dict, root: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_sweep, args=(vectorized, args, root, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def compare(seq_root: str, vec_root: str) -> list[dict]:
    """Per run, the largest differences between the two sweeps: losses per iteration, accuracies (images of
    1,000), weights (relative to the tensor's largest entry), and the Linear biases that feed a BN with their
    running means (absolute: zero true gradient, see the tests)."""
    import json

    from cifar_bn.vectorized import load_state_dicts

    runs = sorted(d for d in os.listdir(seq_root) if os.path.isdir(os.path.join(seq_root, d)))
    vec_states = load_state_dicts(vec_root)
    order = [f"scale{i:02d}_{n}" for i in range(len(runs) // 2) for n in ("torch_bn", "none")]
    rows = []
    for k, d in enumerate(order):
        with open(os.path.join(seq_root, d, "summary.json")) as f:
            a = json.load(f)
        with open(os.path.join(vec_root, d, "summary.json")) as f:
            b = json.load(f)
        row = {"run": d, "scale": a["config"]["weight_scale"], "final_loss": a["final_loss"], "loss_rel": 0.0,
               "acc_images": 0, "weight_rel": 0.0, "bias_before_bn_abs": 0.0}
        for x, y in zip(a["history"]["loss"], b["history"]["loss"]):
            row["loss_rel"] = max(row["loss_rel"], abs(x - y) / max(abs(x), 1e-12))
        for key in ("train_acc", "val_acc"):
            row["acc_images"] = max([row["acc_images"]] + [round(abs(x - y) * 1000) for x, y in
                                                            zip(a["history"][key], b["history"][key])])
        row["acc_images"] = max(row["acc_images"], round(abs(a["test_acc"] - b["test_acc"]) * 1000))
        ref = torch.load(os.path.join(seq_root, d, "checkpoint.pt"), weights_only=True)["model"]
        for name, v in ref.items():
            if not v.is_floating_point():
                continue
            diff = (vec_states[k][name].double() - v.double()).abs().max().item()
            feeds_bn = f"net.{int(name.split('.')[1]) + 1}.running_mean" in ref
            if feeds_bn and (name.endswith(".bias") or name.endswith("running_mean")):
                row["bias_before_bn_abs"] = max(row["bias_before_bn_abs"], diff)
            else:
                row["weight_rel"] = max(row["weight_rel"], diff / max(v.abs().max().item(), 1e-30))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="sweeps of each kind, alternating")
    p.add_argument("--num-scales", type=int, default=20)
    p.add_argument("--keep", metavar="DIR", help="train into DIR (must not exist) and keep the runs")
    a = p.parse_args()
    args = {"data_dir": a.data_dir, "verify": not a.no_verify, "threads": a.threads, "num_scales": a.num_scales}
    times: dict[str, list[dict]] = {"sequential": [], "vectorized": []}
    if a.keep:
        os.makedirs(a.keep)  # refuses an existing folder: nothing is overwritten
    with tempfile.TemporaryDirectory() as scratch:
        tmp = a.keep or scratch
        for r in range(a.repeats):
            for kind in ("sequential", "vectorized"):
                root = os.path.join(tmp, f"{kind}{r}")
                times[kind].append(run_child(kind == "vectorized", args, root))
                print(f"{kind:<10} repeat {r}: {times[kind][-1]['wall_s']:.1f} s, "
                      f"peak RSS {times[kind][-1]['peak_rss_mib']:.0f} MiB", flush=True)
        rows = compare(os.path.join(tmp, f"sequential{a.repeats - 1}"), os.path.join(tmp, f"vectorized{a.repeats - 1}"))
    med = {k: statistics.median(t["wall_s"] for t in v) for k, v in times.items()}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} thread(s), {2 * a.num_scales} runs per sweep, {a.repeats} repeat(s), load average "
          f"{os.getloadavg()[0]:.1f}")
    for k in times:
        print(f"{k:<10}: median {med[k]:.1f} s, peak RSS during the sweep "
              f"{max(t['peak_rss_mib'] for t in times[k]):.0f} MiB (after loading the data: "
              f"{times[k][0]['rss_before_mib']:.0f} MiB)")
    print(f"speedup: {med['sequential'] / med['vectorized']:.2f}x")
    print(f"\nagreement per run (last repeat): {'run':<17} {'final loss':>10} {'loss rel':>9} {'acc imgs':>8} "
          f"{'weight rel':>10} {'bias->BN abs':>12}")
    for r in rows:
        print(f"{'':<33}{r['run']:<17} {r['final_loss']:>10.3g} {r['loss_rel']:>9.1e} {r['acc_images']:>8d} "
              f"{r['weight_rel']:>10.1e} {r['bias_before_bn_abs']:>12.1e}")


if __name__ == "__main__":
    main()
