"""Train the CIFAR-10 MLP with or without batch norm and log it to TensorBoard.

    python train.py --batchnorm                                   # one run with torch_bn.BatchNorm1d
    python train.py --compare                                     # torch_bn vs nn.BatchNorm1d vs none
    python train.py --experiment deep                             # the notebook's section 2 (+ figure)
    python train.py --experiment weight-scale                     # the notebook's section 3 (+ figure)
    python train.py --experiment weight-scale --vectorized        # the same, all 40 runs at once (vmap)
    python train.py --resume runs/NAME                            # continue an interrupted run
    tensorboard --logdir runs                                     # the dashboards

On offline machines add --data-dir ../shared/data --no-verify.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields, replace

from cifar_bn import experiments
from cifar_bn.data import CIFAR10Data, DataError, load_cifar10
from cifar_bn.models import NORMS
from cifar_bn.training import OPTIMIZERS, RunExistsError, TrainConfig, run
from cifar_bn.vectorized import check_configs

RUN_FILE = "run.json"  # what was launched, so --resume can launch it again


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--batchnorm", action="store_true", help="use torch_bn.BatchNorm1d (same as --norm torch_bn)")
    what.add_argument("--norm", choices=NORMS, help="normalization after each hidden Linear (default: none)")
    what.add_argument("--compare", action="store_true", help="train torch_bn, torch and none into one dashboard")
    what.add_argument("--experiment", choices=sorted(experiments.PRESETS), help="an experiment of the notebook with its settings")
    what.add_argument("--num-scales", type=int, default=20, help="weight scales in --experiment weight-scale")
    what.add_argument("--vectorized", action="store_true",
                      help="--experiment weight-scale: train all its runs at once as one vmapped program")
    what.add_argument("--resume", metavar="RUN_DIR", help="continue the run (or experiment) in RUN_DIR")
    model = p.add_argument_group("model and training (default: TrainConfig's, or the experiment's)")
    model.add_argument("--hidden-dims", type=lambda s: tuple(int(d) for d in s.split(",")), help="e.g. 100,100,100")
    model.add_argument("--weight-scale", type=float, help="init std of Linear weights (default: PyTorch's init)")
    model.add_argument("--dropout", type=float)
    model.add_argument("--reg", type=float, help="L2 penalty 0.5*reg*sum(W^2) on Linear weights")
    model.add_argument("--optimizer", choices=OPTIMIZERS)
    model.add_argument("--lr", type=float)
    model.add_argument("--lr-decay", type=float, help="multiply the lr by this after every epoch")
    model.add_argument("--batch-size", type=int)
    model.add_argument("--epochs", type=int)
    model.add_argument("--seed", type=int)
    model.add_argument("--device", choices=("auto", "cpu", "cuda"))
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default ./data)")
    data.add_argument("--no-verify", action="store_true", help="skip only torchvision's md5 check")
    data.add_argument("--num-train", type=int, help="keep the first N training images (default 49000)")
    data.add_argument("--num-val", type=int, default=1000, help="validation images (the last of the training set)")
    data.add_argument("--num-test", type=int, default=1000, help="test images (the first of the test set)")
    out = p.add_argument_group("output")
    out.add_argument("--logdir", default="runs")
    out.add_argument("--run-name", help="default: timestamp and config; an existing run is never overwritten")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no report")
    return p.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> dict:
    """The launch plan (mode, config, data options) from the command line."""
    if args.batchnorm and args.norm not in (None, "torch_bn"):
        raise ValueError(f"--batchnorm means --norm torch_bn, but --norm {args.norm} was given; pass one of them")
    if args.compare and args.experiment:
        raise ValueError("--compare and --experiment are separate modes (each experiment compares already); pick one")
    mode = args.experiment or ("compare" if args.compare else "single")
    if args.vectorized and mode != "weight-scale":
        raise ValueError("--vectorized trains the runs of --experiment weight-scale together; add that, or drop --vectorized")
    settings = dict(experiments.PRESETS.get(args.experiment, {}))
    num_train = settings.pop("num_train", None)
    if args.num_train is not None:
        num_train = args.num_train
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    settings["norm"] = "torch_bn" if args.batchnorm else (args.norm or "none")
    config = TrainConfig(**settings)
    if args.vectorized:  # before anything is written: a refused launch leaves nothing
        check_configs([replace(config, norm=norm) for norm in ("torch_bn", "none")])
    return {"mode": mode, "config": asdict(config), "num_scales": args.num_scales, "vectorized": args.vectorized,
            "data": {"data_dir": args.data_dir or "./data", "verify": not args.no_verify, "num_train": num_train,
                     "num_val": args.num_val, "num_test": args.num_test}}


def default_run_name(plan: dict) -> str:
    c = plan["config"]
    what = plan["mode"] if plan["mode"] != "single" else c["norm"]
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{what}_{c['optimizer']}_lr{c['lr']:g}_seed{c['seed']}"


def load_data(plan: dict) -> CIFAR10Data:
    d = plan["data"]
    return load_cifar10(d["data_dir"], d["num_train"], d["num_val"], d["num_test"], verify=d["verify"])


def launch(plan: dict, data: CIFAR10Data, root: str, progress: bool, resume: bool) -> dict:
    config = TrainConfig(**plan["config"])
    mode = plan["mode"]
    if mode == "single":
        return {config.norm: run(config, data, root, progress=progress, resume=resume)}
    if mode == "compare":
        return experiments.compare(config, data, root, progress=progress, resume=resume)
    if mode == "deep":
        return experiments.deep(config, data, root, progress=progress, resume=resume)
    if mode != "weight-scale":
        raise ValueError(f"unknown mode {mode!r} in the launch plan; expected single, compare, "
                         f"{' or '.join(sorted(experiments.PRESETS))}")
    results = experiments.weight_scale(config, data, root, progress=progress, resume=resume,
                                       num_scales=plan["num_scales"], vectorized=plan.get("vectorized", False))
    return {f"{norm} @ scale {s['config']['weight_scale']:.2e}": s for norm, runs in results.items() for s in runs}


def report(summaries: dict, root: str) -> None:
    print(f"{'run':<34} {'final train acc':>15} {'best val acc':>12} {'test acc':>8} {'wall s':>7}")
    for name, s in summaries.items():
        print(f"{name:<34} {s['final_train_acc']:>15.3f} {s['best_val_acc']:>12.3f} {s['test_acc']:>8.3f} "
              f"{s['wall_time_s']:>7.1f}")
    print(f"runs in {root}; dashboards: tensorboard --logdir {os.path.dirname(root.rstrip('/')) or '.'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.resume:
            run_file = os.path.join(args.resume, RUN_FILE)
            if not os.path.isfile(run_file):
                raise RunExistsError(f"--resume {args.resume}: no {RUN_FILE} there; pass a run folder written by train.py")
            with open(run_file) as f:
                plan = json.load(f)
            if args.data_dir:  # the data may have moved; everything else comes from the run
                plan["data"]["data_dir"] = args.data_dir
            if args.no_verify:
                plan["data"]["verify"] = False
            if args.device:
                plan["config"]["device"] = args.device
            root = args.resume
            data = load_data(plan)
        else:
            plan = plan_from_args(args)
            root = os.path.join(args.logdir, args.run_name or default_run_name(plan))
            if os.path.exists(root):
                raise RunExistsError(f"run folder {root} already exists and runs are never overwritten; "
                                     f"choose another --run-name, or continue it with --resume {root}")
            data = load_data(plan)  # before creating the folder, so a data error leaves nothing behind
            os.makedirs(root)
            with open(os.path.join(root, RUN_FILE), "w") as f:
                json.dump(plan, f, indent=1)
        summaries = launch(plan, data, root, progress=not args.quiet, resume=bool(args.resume))
    except (DataError, RunExistsError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        report(summaries, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
