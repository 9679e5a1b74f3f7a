"""train.py as users meet it: bad launches, Ctrl-C, resume that extends, on a tiny CIFAR-10."""
import json
import os
import shlex

import pytest
import torch

import train
from cifar_bn.dashboard import RunLogger
import cifar_bn.data
from cifar_bn.data import load_cifar10
from cifar_bn.config import TrainConfig
from cifar_bn.training import run

QUICK = ["--no-verify", "--num-val", "20", "--num-test", "20", "--quiet", "--hidden-dims", "8,8",
         "--batch-size", "10", "--weight-scale", "0.05"]


def launch_args(tiny_cifar, logdir, *extra):
    return ["--data-dir", tiny_cifar, "--logdir", str(logdir), "--run-name", "r", *QUICK, *extra]


@pytest.mark.parametrize("flags, says", [
    (["--num-train", "0"], "--num-train: expected a positive integer, got '0'"),
    (["--num-train", "-5"], "--num-train: expected a positive integer"),
    (["--num-train", "1000"], "--num-train 1000 is more than the 130 training images"),
    (["--num-train", "10", "--batch-size", "50"], "--num-train 10 is smaller than --batch-size 50"),
    (["--hidden-dims", "0"], "--hidden-dims: expected positive layer widths separated by commas"),
    (["--hidden-dims", "abc"], "--hidden-dims: expected positive layer widths separated by commas, such as "
                               "100,100,100; got 'abc'"),
    (["--hidden-dims", "100,,100"], "--hidden-dims: expected positive layer widths"),
    (["--num-val", "0"], "--num-val: expected a positive integer, got '0'"),
    (["--num-val", "200"], "asked for 200 validation of 150 training images"),
    (["--num-test", "0"], "--num-test: expected a positive integer"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--epochs", "0"], "--epochs: expected a positive integer"),
    (["--device", "cuda"], "--device cuda was asked for but no CUDA device is available"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--dropout", "1.5"], "dropout is the probability of zeroing an activation and must be in [0, 1), got 1.5"),
    (["--dropout", "-0.1"], "dropout is the probability"),
    (["--weight-scale", "-1"], "weight_scale is the std of the initial Linear weights and must be positive"),
    (["--weight-scale", "0"], "weight_scale is the std"),
    (["--weight-scale", "nan"], "weight_scale is the std"),
    (["--lr", "0"], "lr must be a positive number, got 0.0"),
    (["--lr", "inf"], "lr must be a positive number"),
    (["--lr-decay", "-1"], "lr_decay must be a positive number"),
    (["--reg", "-1"], "reg (the L2 penalty) must be zero or positive"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
    (["--seed", "x"], "--seed: invalid int value: 'x'"),
    (["--norm", "layer"], "--norm: invalid choice: 'layer'"),
    (["--optimizer", "lbfgs"], "--optimizer: invalid choice"),
    (["--batchnorm", "--norm", "nn"], "--batchnorm means --norm torch_bn, but --norm nn was given"),
    (["--compare", "--experiment", "deep"], "--compare and --experiment are separate modes"),
    (["--experiment", "weight-scale", "--num-scales", "0"], "--num-scales: expected a positive integer"),
    (["--lr"], "--lr: expected one argument"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    # A flag the mode would ignore is refused, not ignored.
    (["--compare", "--norm", "nn"], "--compare trains every normalization (torch_bn, nn and none), so --norm nn "
                                    "would be ignored; drop --norm"),
    (["--compare", "--batchnorm"], "so --batchnorm would be ignored; drop --batchnorm"),
    (["--experiment", "deep", "--norm", "none"], "--experiment deep trains batch norm (torch_bn) and no "
                                                 "normalization, so --norm none would be ignored"),
    (["--experiment", "weight-scale"], "so --weight-scale 0.05 would be ignored; drop --weight-scale"),
    (["--num-scales", "3"], "--num-scales sets the scales of --experiment weight-scale"),
    (["--data-dir", "nowhere"], "CIFAR-10 not found"),
])
def test_bad_launch_is_one_line_exit_2_and_leaves_nothing(flags, says, tiny_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logdir = tmp_path / "runs"
    code = train.main(launch_args(tiny_cifar, logdir, *flags))
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and out == ""
    assert says in err
    assert not os.path.exists(logdir)  # validated before the run folder exists


def test_fixing_the_flag_then_launching_works(tiny_cifar, tmp_path):
    """A failed launch leaves nothing, so the same command with the flag fixed runs."""
    logdir = tmp_path / "runs"
    assert train.main(launch_args(tiny_cifar, logdir, "--dropout", "1.5", "--epochs", "1")) == 2
    assert train.main(launch_args(tiny_cifar, logdir, "--dropout", "0.5", "--epochs", "1")) == 0
    assert os.path.isfile(logdir / "r" / "summary.json")


def tiny_config(**kw):
    return TrainConfig(**{**dict(norm="none", hidden_dims=(8, 8), batch_size=10, weight_scale=0.05, epochs=2), **kw})


def test_ctrl_c_keeps_the_checkpoint_prints_resume_and_exits_130(tiny_cifar, tmp_path, capsys, monkeypatch):
    logdir = tmp_path / "runs"
    original = RunLogger.iteration

    def interrupt_in_epoch_2(self, step, loss):
        if step == 13 + 5:  # 13 iterations an epoch: the middle of the second epoch
            raise KeyboardInterrupt
        original(self, step, loss)

    monkeypatch.setattr(RunLogger, "iteration", interrupt_in_epoch_2)
    assert train.main(launch_args(tiny_cifar, logdir, "--epochs", "2")) == 130
    err = capsys.readouterr().err
    root = str(logdir / "r")
    assert err.count("\n") == 1 and "Traceback" not in err and "interrupted" in err
    assert "last completed epoch" in err and "restarts from that epoch's end" in err
    command = err.strip().split("from its start): ")[1]
    assert command == f"python train.py --resume {shlex.quote(root)}"
    assert torch.load(os.path.join(root, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]
    assert not os.path.exists(os.path.join(root, "summary.json"))
    monkeypatch.setattr(RunLogger, "iteration", original)
    # The printed command finishes the run with the numbers of an uninterrupted one.
    assert train.main(shlex.split(command)[2:] + ["--quiet"]) == 0
    with open(os.path.join(root, "summary.json")) as f:
        resumed = json.load(f)
    data = load_cifar10(tiny_cifar, num_val=20, num_test=20, verify=False)
    full = run(tiny_config(), data, str(tmp_path / "full"), progress=False)
    assert resumed["history"] == full["history"] and resumed["test_acc"] == full["test_acc"]


def test_ctrl_c_while_loading_writes_nothing(tiny_cifar, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar_bn.data, "load_cifar10", interrupted)
    assert train.main(launch_args(tiny_cifar, tmp_path / "runs")) == 130
    assert capsys.readouterr().err == "train.py: interrupted before the run started; nothing was written\n"
    assert not os.path.exists(tmp_path / "runs")


def folder_state(root) -> dict[str, bytes]:
    """Every file under root with its bytes: what a refused launch must leave as it was."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


@pytest.mark.parametrize("mode, damaged", [([], "checkpoint.pt"), ([], "summary.json"), ([], "run.json"),
                                           (["--compare"], os.path.join("nn", "checkpoint.pt")),
                                           (["--experiment", "weight-scale", "--vectorized", "--num-scales", "2"],
                                            "vectorized_checkpoint.pt")])
def test_resume_of_a_damaged_run_is_one_line_and_changes_nothing(mode, damaged, tiny_cifar, tmp_path, capsys):
    """The issue's reproducer: the first 1,000 bytes of a checkpoint kept (or a summary or run.json
    cut short), the summaries removed, then --resume RUN --epochs 3."""
    logdir = tmp_path / "runs"
    root = logdir / "r"
    flags = launch_args(tiny_cifar, logdir, "--epochs", "2", *mode)
    if "--experiment" in mode:  # the experiment sweeps the weight scale, on 1,000 images unless told
        at = flags.index("--weight-scale")
        flags = flags[:at] + flags[at + 2:] + ["--num-train", "100"]
    assert train.main(flags) == 0
    path = root / damaged
    path.write_bytes(path.read_bytes()[:1000] if damaged.endswith(".pt") else b'{"config": {"epo')
    if damaged.endswith(".pt"):
        for summary in root.rglob("summary.json"):
            summary.unlink()
    capsys.readouterr()
    before = folder_state(root)
    assert train.main(["--resume", str(root), "--epochs", "3", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"train.py: error: {path} is damaged and cannot be read back")
    assert "nothing was changed" in err and "move it aside" in err
    assert folder_state(root) == before  # nothing renamed, written or removed


def test_resume_with_more_epochs_extends_the_run(tiny_cifar, tmp_path):
    logdir = tmp_path / "runs"
    root = str(logdir / "r")
    assert train.main(launch_args(tiny_cifar, logdir, "--epochs", "1")) == 0
    with open(os.path.join(root, "summary.json")) as f:
        first = json.load(f)
    assert train.main(["--resume", root, "--epochs", "2", "--quiet"]) == 0
    with open(os.path.join(root, "summary.json")) as f:
        extended = json.load(f)
    data = load_cifar10(tiny_cifar, num_val=20, num_test=20, verify=False)
    full = run(tiny_config(), data, str(tmp_path / "full"), progress=False)
    assert extended["history"] == full["history"] and extended["test_acc"] == full["test_acc"]
    assert extended["epochs_done"] == 2 and extended["config"]["epochs"] == 2
    # What the first launch wrote is kept beside the new files, and the run now says 2 epochs.
    with open(os.path.join(root, "summary.1epochs.json")) as f:
        assert json.load(f) == first
    with open(os.path.join(root, "run.1epochs.json")) as f:
        assert json.load(f)["config"]["epochs"] == 1
    with open(os.path.join(root, "run.json")) as f:
        assert json.load(f)["config"]["epochs"] == 2
    # Resuming the finished run again (same flags, or none) reads it back.
    assert train.main(["--resume", root, "--epochs", "2", "--hidden-dims", "8,8", "--quiet"]) == 0


@pytest.mark.parametrize("flags, says", [
    (["--lr", "0.1"], "--lr 0.1 would change the run"),
    (["--hidden-dims", "16"], "--hidden-dims 16 would change the run"),
    (["--norm", "nn"], "--norm nn would change the run"),
    (["--batchnorm"], "--batchnorm would change the run in"),
    (["--compare"], "--compare would change the run in"),
    (["--num-train", "100"], "--num-train 100 would change the run"),
    (["--logdir", "elsewhere"], "--logdir names a new run folder"),
    (["--epochs", "1"], "--epochs 1 is fewer than the 2 of the run"),
])
def test_resume_refuses_flags_that_change_the_run(flags, says, tiny_cifar, tmp_path, capsys):
    logdir = tmp_path / "runs"
    root = str(logdir / "r")
    assert train.main(launch_args(tiny_cifar, logdir, "--epochs", "2")) == 0
    before = sorted(os.listdir(root))
    capsys.readouterr()
    assert train.main(["--resume", root, *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
    assert sorted(os.listdir(root)) == before


def test_norm_torch_is_an_alias_of_nn(tiny_cifar, tmp_path):
    logdir = tmp_path / "runs"
    assert train.main(["--data-dir", tiny_cifar, "--logdir", str(logdir), *QUICK, "--norm", "torch",
                       "--epochs", "1"]) == 0
    (name,) = os.listdir(logdir)
    assert name.startswith("nn_")  # what the launch is first, its time last
    with open(logdir / name / "summary.json") as f:
        assert json.load(f)["config"]["norm"] == "nn"


def test_reproduce_refuses_bad_options_and_missing_data_before_writing(tmp_path, capsys):
    from cifar_bn import reproduce

    logdir = tmp_path / "runs"
    assert reproduce.main(["--seeds", "0", "--logdir", str(logdir)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert reproduce.main(["--data-dir", str(tmp_path / "nowhere"), "--no-verify", "--logdir", str(logdir)]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err
    assert not os.path.exists(logdir)


@pytest.mark.slow
def test_reproduce_writes_every_result_and_figure(tiny_cifar, tmp_path, monkeypatch):
    """The whole script on the tiny data set (its experiments on 100 images, 2 epochs): every section
    of the results file, with the spread over seeds, and the README's figures."""
    from cifar_bn import reproduce

    for name in ("deep", "weight-scale"):
        monkeypatch.setitem(reproduce.PRESETS, name, {**reproduce.PRESETS[name], "num_train": 100, "epochs": 2,
                                                         "hidden_dims": (8, 8)})
    monkeypatch.setattr(reproduce, "TrainConfig", lambda **kw: TrainConfig(**{"hidden_dims": (8,), "epochs": 2, **kw}))
    out, figures = tmp_path / "results.md", tmp_path / "figures"
    assert reproduce.main(["--data-dir", tiny_cifar, "--no-verify", "--num-val", "20", "--num-test", "20",
                           "--seeds", "2", "--compare-seeds", "2", "--thread-seeds", "1", "--num-scales", "2",
                           "--overhead-repeats", "1", "--batch-size-seeds", "1", "--batch-size-epochs", "1",
                           "--batch-size-num-train", "100", "--logdir", str(tmp_path / "runs"), "--out", str(out),
                           "--figures", str(figures), "--quiet"]) == 0
    text = out.read_text()
    for section in ("## Deep network", "### 1 vs 2 threads", "## Weight-initialization scale",
                    "## Compare on the full training set", "seeds 0-1, mean (min-max)", "Seed 0 again at",
                    "## Cost of the per-layer dashboard statistics", "## Batch size"):
        assert section in text, section
    assert sorted(os.listdir(figures)) == ["activation_std.png", "batch_size_summary.png", "batch_size_train.png",
                                           "batch_size_val.png", "compare.png", "deep.png", "weight_scale.png"]
    # --only regenerates one result: its section is replaced, the others are kept as they were.
    assert reproduce.main(["--data-dir", tiny_cifar, "--no-verify", "--num-val", "20", "--num-test", "20",
                           "--only", "compare", "--compare-seeds", "1", "--logdir", str(tmp_path / "runs"),
                           "--out", str(out), "--figures", str(figures), "--quiet"]) == 0
    again = out.read_text()
    compare = again.index("## Compare on the full training set")
    assert again[:compare] == text[:text.index("## Compare on the full training set")]
    assert "Regenerated alone by `python -m cifar_bn.reproduce --data-dir DIR" in again[compare:]
    assert "seeds 0-0, mean (min-max)" in again and "## Cost of the per-layer" in again
    assert reproduce.main(["--only", "deep", "--out", str(tmp_path / "none.md")]) == 2
