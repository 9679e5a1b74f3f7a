"""Train the CIFAR-10 MLP with or without batch norm and log it to TensorBoard.

    python train.py --batchnorm                                   # one run with torch_bn.BatchNorm1d
    python train.py --compare                                     # torch_bn vs nn.BatchNorm1d vs none
    python train.py --experiment deep                             # the notebook's section 2 (+ figure)
    python train.py --experiment weight-scale                     # the notebook's section 3 (+ figure)
    python train.py --experiment weight-scale --vectorized        # the same, all 40 runs at once (vmap)
    python train.py --experiment batch-size                       # batch norm at batch 5, 10, 50 (+ renorm,
                                                                  #   ghost batch norm, layer norm; + figures)
    python train.py --norm ghost --virtual-batch-size 10          # ghost batch norm: statistics over 10 samples
    python train.py --compare --norms torch_bn,renorm,layernorm   # any normalizations side by side
    python train.py --resume runs/NAME [--epochs N]               # continue an interrupted run, or extend one
    torchrun --nproc_per_node=2 train.py --batchnorm --sync-bn    # data-parallel, BN over the global batch
    tensorboard --logdir runs/NAME                                # a launch's dashboards (the folder it printed)

CIFAR-10 is downloaded into --data-dir (default ./data) on the first run; offline, put the folder
cifar-10-batches-py (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted) there.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields, replace

# Only what checks a launch is imported here: nothing that imports torch, so that --help and a
# refused launch answer at once. The training modules are imported once the launch is accepted.
from cifar_bn.config import (COMPARE_NORMS, DEVICES, NORM_ALIASES, NORMS, OPTIMIZERS, PRESETS, TrainConfig,
                             canonical_norm, with_norm,
                             check_launch, check_vectorized, is_main_process)
from cifar_bn.runs import (RUN_FILE, DamagedRunError, RunExistsError, check_readable, keep_aside, read_json,
                           write_json)

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # as argparse and shells: 2 bad usage, 128 + SIGINT
# What --resume may be given besides the folder: more epochs, and where and how to find the data
# and the device; every other flag would change the run.
RESUME_MAY_SET = ("epochs", "data_dir", "no_verify", "device", "quiet")
DATA_DEFAULTS = {"data_dir": "./data", "num_val": 1000, "num_test": 1000}
NUM_SCALES = 20
# What each mode trains whatever these flags say: given there, they are refused, not ignored.
MODE_SETS = {
    "compare": ({"batchnorm", "norm"}, "trains every normalization (torch_bn, nn and none)"),
    "deep": ({"batchnorm", "norm"}, "trains batch norm (torch_bn) and no normalization"),
    "weight-scale": ({"batchnorm", "norm", "weight_scale"},
                     "trains batch norm (torch_bn) and no normalization at weight scales 1e-4 to 1"),
    "batch-size": ({"batchnorm", "norm", "batch_size", "virtual_batch_size", "renorm_warmup"},
                   "trains every normalization at batch sizes 5, 10 and 50 with its own options"),
}


class UsageError(ValueError):
    """A flag is malformed, out of range or contradicts another; the message names it."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors raised as UsageError (main prints them as one line, exit code 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (python train.py --help lists the flags)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def layer_widths(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer widths separated by commas, such as "
                                         f"100,100,100; got {text!r}")
    return dims


def norm_list(text: str) -> tuple[str, ...]:
    try:
        norms = tuple(canonical_norm(n.strip()) for n in text.split(","))
    except ValueError:
        norms = ()
    if not norms or len(set(norms)) != len(norms):
        raise argparse.ArgumentTypeError(f"expected distinct normalizations from {', '.join(NORMS)} separated by "
                                         f"commas, such as torch_bn,renorm,none; got {text!r}")
    return norms


def default(name: str) -> str:
    """A one-run setting's default, as --help shows it."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    value = f.default if f.default is not MISSING else f.default_factory()
    return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--batchnorm", action="store_true", help="use torch_bn.BatchNorm1d (same as --norm torch_bn)")
    what.add_argument("--norm", choices=NORMS + tuple(NORM_ALIASES),
                      help="normalization after each hidden Linear: torch_bn.BatchNorm1d, nn.BatchNorm1d "
                           "(torch is an alias of nn), none (the default), renorm (torch_bn.BatchRenorm1d), "
                           "ghost (torch_bn.GhostBatchNorm1d; needs --virtual-batch-size) or layernorm (nn.LayerNorm)")
    what.add_argument("--virtual-batch-size", type=positive_int,
                      help="--norm ghost: batch statistics over chunks of this many samples (at least 2)")
    what.add_argument("--renorm-warmup", type=int, metavar="STEPS",
                      help="--norm renorm: steps of plain batch norm before the correction by the running "
                           "statistics starts (default: one epoch)")
    what.add_argument("--compare", action="store_true", help="train torch_bn, nn and none into one dashboard")
    what.add_argument("--norms", type=norm_list, help="--compare: the normalizations to compare, e.g. "
                      f"torch_bn,renorm,ghost,layernorm,none (default {','.join(COMPARE_NORMS)})")
    what.add_argument("--experiment", choices=sorted(PRESETS), help="an experiment of the notebook with its settings")
    what.add_argument("--num-scales", type=positive_int,
                      help=f"weight scales in --experiment weight-scale (default {NUM_SCALES})")
    what.add_argument("--vectorized", action="store_true",
                      help="--experiment weight-scale: train all its runs at once as one vmapped program")
    what.add_argument("--resume", metavar="RUN_DIR", help="continue the run (or experiment) in RUN_DIR from its "
                      "last epoch end; with a larger --epochs, extend it")
    model = p.add_argument_group("model and training (defaults below; --experiment sets its own)")
    model.add_argument("--hidden-dims", type=layer_widths, help=f"hidden layer widths (default {default('hidden_dims')})")
    model.add_argument("--weight-scale", type=float, help="init std of Linear weights (default: PyTorch's init)")
    model.add_argument("--dropout", type=float, help=f"probability in [0, 1) after each ReLU (default {default('dropout')})")
    model.add_argument("--reg", type=float, help=f"L2 penalty 0.5*reg*sum(W^2) on Linear weights (default {default('reg')})")
    model.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {default('optimizer')}")
    model.add_argument("--lr", type=float, help=f"learning rate (default {default('lr')})")
    model.add_argument("--lr-decay", type=float, help=f"multiply the lr by this after every epoch (default {default('lr_decay')})")
    model.add_argument("--batch-size", type=positive_int, help=f"default {default('batch_size')}")
    model.add_argument("--epochs", type=positive_int, help=f"default {default('epochs')}")
    model.add_argument("--seed", type=int, help=f"weights, batch order and the train-accuracy sample (default {default('seed')})")
    model.add_argument("--device", choices=DEVICES, help="default auto: CUDA when present")
    model.add_argument("--sync-bn", action="store_true", default=None,
                       help="under torchrun: batch norm over the global batch of all processes")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="folder holding cifar-10-batches-py, or receiving its download (default ./data)")
    data.add_argument("--no-verify", action="store_true", help="skip only torchvision's md5 check")
    data.add_argument("--num-train", type=positive_int, help="keep the first N training images (default 49000)")
    data.add_argument("--num-val", type=positive_int, help="validation images, the last of the training set (default 1000)")
    data.add_argument("--num-test", type=positive_int, help="test images, the first of the test set (default 1000)")
    out = p.add_argument_group("output")
    out.add_argument("--logdir", help="folder of the runs (default runs)")
    out.add_argument("--run-name", help="default: timestamp and config; an existing run is never overwritten")
    out.add_argument("--quiet", action="store_true", help="no progress bar, no report")
    return p.parse_args(argv)


def check_mode_flags(args: argparse.Namespace, mode: str) -> None:
    """UsageError for a flag the mode would ignore (it sets that itself)."""
    mode_flag = "--compare" if mode == "compare" else f"--experiment {mode}"
    if args.num_scales is not None and mode != "weight-scale":
        raise UsageError(f"--num-scales sets the scales of --experiment weight-scale; add that, or drop --num-scales")
    sets, what = MODE_SETS.get(mode, (set(), ""))
    for key in sorted(sets):
        value = getattr(args, key)
        if value is not None and value is not False:
            flag = "--" + key.replace("_", "-")
            given = flag if value is True else f"{flag} {value}"
            raise UsageError(f"{mode_flag} {what}, so {given} would be ignored; drop {flag}")


def plan_from_args(args: argparse.Namespace) -> dict:
    """The launch plan (mode, config, data options) from the command line; UsageError or
    ValueError (from TrainConfig) for a bad one."""
    if args.batchnorm and args.norm is not None and canonical_norm(args.norm) != "torch_bn":
        raise UsageError(f"--batchnorm means --norm torch_bn, but --norm {args.norm} was given; pass one of them")
    if args.compare and args.experiment:
        raise UsageError("--compare and --experiment are separate modes (each experiment compares already); pick one")
    mode = args.experiment or ("compare" if args.compare else "single")
    if args.vectorized and mode != "weight-scale":
        raise UsageError("--vectorized trains the runs of --experiment weight-scale together; add that, or drop --vectorized")
    check_mode_flags(args, mode)
    if args.norms is not None and mode != "compare":
        raise UsageError("--norms lists the normalizations of --compare; add --compare, or use --norm for one run")
    settings = dict(PRESETS.get(args.experiment, {}))
    num_train = settings.pop("num_train", None)
    if args.num_train is not None:
        num_train = args.num_train
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    settings["norm"] = "torch_bn" if args.batchnorm else (args.norm or "none")
    norms = None
    if mode == "compare":  # the base config has no norm; each compared norm gets its options (checked here)
        norms = args.norms or COMPARE_NORMS
        for flag, norm in (("virtual_batch_size", "ghost"), ("renorm_warmup", "renorm")):
            if getattr(args, flag) is not None and norm not in norms:
                raise UsageError(f"--{flag.replace('_', '-')} is an option of {norm}, which --compare does not "
                                 f"train here; add {norm} to --norms or drop --{flag.replace('_', '-')}")
        for name in ("virtual_batch_size", "renorm_warmup"):
            settings.pop(name, None)
        for norm in norms:
            with_norm(TrainConfig(**settings), norm, args.virtual_batch_size, args.renorm_warmup)
    config = TrainConfig(**settings)
    if args.vectorized:  # before anything is written: a refused launch leaves nothing
        check_vectorized([replace(config, norm=norm) for norm in ("torch_bn", "none")])
    plan = {"mode": mode, "config": asdict(config), "num_scales": args.num_scales or NUM_SCALES,
            "vectorized": args.vectorized,
            "data": {"data_dir": args.data_dir or DATA_DEFAULTS["data_dir"], "verify": not args.no_verify,
                     "num_train": num_train, "num_val": args.num_val or DATA_DEFAULTS["num_val"],
                     "num_test": args.num_test or DATA_DEFAULTS["num_test"]}}
    if norms is not None:
        plan["compare"] = {"norms": list(norms), "virtual_batch_size": args.virtual_batch_size,
                           "renorm_warmup": args.renorm_warmup}
    return plan


def check_resume_flags(args: argparse.Namespace, plan: dict, root: str) -> None:
    """UsageError naming the first flag given with --resume that would change the run (any but
    RESUME_MAY_SET, and --epochs below the run's); flags repeating the run's value pass."""
    c, d = plan["config"], plan["data"]
    for key, value in vars(args).items():
        if value is None or value is False or key in RESUME_MAY_SET or key == "resume":
            continue
        flag = "--" + key.replace("_", "-")
        if key in ("logdir", "run_name"):
            raise UsageError(f"{flag} names a new run folder, but --resume continues the one in {root}; drop {flag}")
        given = flag if value is True else f"{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
        if key == "batchnorm":
            key, value = "norm", "torch_bn"
        if key == "norm":
            same = plan["mode"] == "single" and canonical_norm(value) == canonical_norm(c["norm"])
            has = c["norm"] if plan["mode"] == "single" else f"the {plan['mode']} mode"
        elif key == "compare":
            same, has = plan["mode"] == "compare", f"the {plan['mode']} mode"
        elif key == "experiment":
            same, has = plan["mode"] == value, f"the {plan['mode']} mode"
        elif key in d:
            same, has = d[key] == value, d[key] if d[key] is not None else "the default"
        elif key == "norms":
            has = plan.get("compare", {}).get("norms", list(COMPARE_NORMS))
            same = plan["mode"] == "compare" and list(has) == list(value)
        elif key in ("virtual_batch_size", "renorm_warmup") and plan["mode"] == "compare":
            has = plan.get("compare", {}).get(key)
            same = has == value
        elif key == "num_scales":
            same, has = plan["num_scales"] == value, plan["num_scales"]
        elif key == "vectorized":
            same, has = plan.get("vectorized", False) == value, "sequential runs"
        else:
            has = c[key]
            same = (list(has) == list(value)) if key == "hidden_dims" else has == value
        if not same:
            raise UsageError(f"{given} would change the run in {root} (it has {has}); --resume keeps a "
                             f"run's settings and takes only a larger --epochs, --data-dir, --no-verify and "
                             f"--device: drop {flag}, or start a new run")
    if args.epochs is not None and args.epochs < c["epochs"]:
        raise UsageError(f"--epochs {args.epochs} is fewer than the {c['epochs']} of the run in {root}; a resumed "
                         f"run can be extended, not shortened")


def default_run_name(plan: dict) -> str:
    c = plan["config"]
    what = plan["mode"] if plan["mode"] != "single" else c["norm"]
    # What the launch is first (TensorBoard's run list is read from the left), its time last.
    return f"{what}_{c['optimizer']}_lr{c['lr']:g}_seed{c['seed']}_{time.strftime('%Y%m%d-%H%M%S')}"


def load_data(plan: dict):
    """The plan's data (a CIFAR10Data), checked against its config: DataError if it cannot be
    loaded, UsageError if it holds less than one batch."""
    from cifar_bn import data as cifar_data

    d = plan["data"]
    data = cifar_data.load_cifar10(d["data_dir"], d["num_train"], d["num_val"], d["num_test"], verify=d["verify"])
    batch_size = plan["config"]["batch_size"]
    if len(data.X_train) < batch_size:
        raise UsageError(f"--num-train {len(data.X_train)} is smaller than --batch-size {batch_size}: not one "
                         f"full batch per epoch; use more training images or a smaller batch")
    return data


def launch(plan: dict, data, root: str, progress: bool, resume: bool) -> dict:
    from cifar_bn import experiments
    from cifar_bn.training import run

    config = TrainConfig(**plan["config"])
    mode = plan["mode"]
    if mode == "single":
        return {config.norm: run(config, data, root, progress=progress, resume=resume)}
    if mode == "compare":
        options = plan.get("compare", {})
        return experiments.compare(config, data, root, progress=progress, resume=resume,
                                   norms=tuple(options.get("norms", COMPARE_NORMS)),
                                   virtual_batch_size=options.get("virtual_batch_size"),
                                   renorm_warmup=options.get("renorm_warmup"))
    if mode == "deep":
        return experiments.deep(config, data, root, progress=progress, resume=resume)
    if mode == "batch-size":
        results = experiments.batch_size(config, data, root, progress=progress, resume=resume)
        return {f"bs{b}/{method}": s for method, by_batch in results.items() for b, s in by_batch.items()}
    if mode != "weight-scale":
        raise ValueError(f"unknown mode {mode!r} in the launch plan; expected single, compare, "
                         f"{' or '.join(sorted(PRESETS))}")
    results = experiments.weight_scale(config, data, root, progress=progress, resume=resume,
                                       num_scales=plan["num_scales"], vectorized=plan.get("vectorized", False))
    return {f"{norm} @ scale {s['config']['weight_scale']:.2e}": s for norm, runs in results.items() for s in runs}


def report(summaries: dict, root: str) -> None:
    print(f"{'run':<34} {'final train acc':>15} {'best val acc':>12} {'test acc':>8} {'wall s':>7}")
    for name, s in summaries.items():
        print(f"{name:<34} {s['final_train_acc']:>15.3f} {s['best_val_acc']:>12.3f} {s['test_acc']:>8.3f} "
              f"{s['wall_time_s']:>7.1f}")
    print(f"runs in {root}; dashboards: tensorboard --logdir {shlex.quote(root)}")


def plan_for(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The launch plan, checked before anything is written; and for --resume its run folder (the
    run's own plan with the flags it may take applied). A new run's folder is named by
    :func:`new_run_folder` (by rank 0 alone under torchrun)."""
    if not args.resume:
        return plan_from_args(args), None
    root = args.resume
    run_file = os.path.join(root, RUN_FILE)
    if not os.path.isfile(run_file):
        raise RunExistsError(f"--resume {root}: no {RUN_FILE} there; pass a run folder written by train.py")
    plan = read_json(run_file)
    check_resume_flags(args, plan, root)
    if args.data_dir:  # the data may have moved
        plan["data"]["data_dir"] = args.data_dir
    if args.no_verify:
        plan["data"]["verify"] = False
    if args.device:
        plan["config"]["device"] = args.device
    if args.epochs:
        plan["config"]["epochs"] = args.epochs
    return plan, root


def new_run_folder(args: argparse.Namespace, plan: dict) -> str:
    """The new run's folder (not created yet), which must not exist."""
    root = os.path.join(args.logdir or "runs", args.run_name or default_run_name(plan))
    if os.path.exists(root):
        raise RunExistsError(f"run folder {root} already exists and runs are never overwritten; "
                             f"choose another --run-name, or continue it with --resume {root}")
    return root


def record_launch(root: str, plan: dict, resumed: bool) -> None:
    """Write what was launched (run.json) into a new run folder; for a run extended by --resume
    --epochs, keep the first run.json aside and record the new epoch count."""
    run_file = os.path.join(root, RUN_FILE)
    if not resumed:
        os.makedirs(root)
        write_json(run_file, plan)
        return
    before = read_json(run_file)
    if before["config"]["epochs"] != plan["config"]["epochs"]:
        keep_aside(run_file, f"{before['config']['epochs']}epochs")
        write_json(run_file, {**before, "config": {**before["config"], "epochs": plan["config"]["epochs"]}})


def train(args: argparse.Namespace, plan: dict, root: str | None, started: Callable[[str], None]) -> tuple[dict, str]:
    """Run the accepted launch: the device, the run folder (named and created by rank 0 alone under
    torchrun), the data, then the runs; returns their summaries and the folder. Nothing is
    written before the data has loaded and, on --resume, every file the resume reads has been
    read back; started(root) is called just before the first write."""
    from cifar_bn import distributed
    from cifar_bn.lifecycle import resolve_device

    config = plan["config"]
    device = resolve_device(config["device"])
    check_launch(plan["mode"], config["norm"], config.get("sync_bn", False), device)
    ctx = distributed.start(device)
    try:
        if root is None:
            root = ctx.on_rank0(new_run_folder, args, plan)
        else:
            ctx.on_rank0(check_readable, root)  # a damaged checkpoint: refused, the folder unchanged
        data = ctx.on_every_rank(load_data, plan)  # before creating the folder: a data error leaves nothing
        started(root)
        ctx.on_rank0(record_launch, root, plan, bool(args.resume))
        return launch(plan, data, root, progress=not args.quiet, resume=bool(args.resume)), root
    finally:
        distributed.stop()


def main(argv: list[str] | None = None) -> int:
    started = False  # whether this launch has written anything
    root = None

    def mark_started(run_root: str) -> None:
        nonlocal started, root
        started, root = True, run_root

    try:
        args = parse_args(argv)
        plan, root = plan_for(args)
        config = plan["config"]
        # Under torchrun every rank runs this; the device-dependent rule is checked again in train().
        check_launch(plan["mode"], config["norm"], config.get("sync_bn", False), config["device"])
        summaries, root = train(args, plan, root, mark_started)
    except (DamagedRunError, RunExistsError, ValueError) as e:  # ValueError includes UsageError and DataError
        if is_main_process():  # every rank fails alike; one message is enough
            print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if not is_main_process():
            return EXIT_INTERRUPTED
        if not started:
            print("train.py: interrupted before the run started; nothing was written", file=sys.stderr)
        else:
            print(f"train.py: interrupted; {root} keeps the checkpoint of the last completed epoch, and --resume "
                  f"restarts from that epoch's end (the interrupted epoch is trained again, from its start): "
                  f"python train.py --resume {shlex.quote(root)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet and is_main_process():
        report(summaries, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
