"""Data, model, training loop, dashboards and the train.py CLI, on a tiny generated CIFAR-10."""
import json
import math
import os
import pickle

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import functional_call

import train
from helpers import Interrupt, crash_after_first_save
import cifar_bn.data
import torch_bn
from cifar_bn.data import DataError, load_cifar10
from cifar_bn.models import MLP, l2_penalty
from cifar_bn.config import TrainConfig
from cifar_bn.runs import RunExistsError
from cifar_bn.training import Trainer, build_model, run

TINY = ["--no-verify", "--num-val", "20", "--num-test", "20", "--quiet"]


def tiny_data(root):
    return load_cifar10(root, num_val=20, num_test=20, verify=False)


def events(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


# ---- data -------------------------------------------------------------------------------------

def test_tiny_folder_loads_through_torchvision(tiny_cifar):
    data = tiny_data(tiny_cifar)
    assert data.X_train.shape == (130, 3, 32, 32) and data.X_train.dtype == torch.float32
    assert data.X_val.shape == (20, 3, 32, 32) and data.X_test.shape == (20, 3, 32, 32)
    with open(os.path.join(tiny_cifar, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        raw = pickle.load(f)
    assert data.y_train[:30].tolist() == raw["labels"]  # order kept
    first = torch.from_numpy(raw["data"][0]).float().view(3, 32, 32)
    torch.testing.assert_close(data.X_train[0] + data.mean_image, first)  # CHW planes, mean subtracted
    torch.testing.assert_close(data.X_train.mean(0), torch.zeros(3, 32, 32), atol=1e-3, rtol=0)
    small = load_cifar10(tiny_cifar, num_train=10, num_val=20, num_test=20, verify=False)
    assert len(small.X_train) == 10
    torch.testing.assert_close(small.mean_image, data.mean_image)  # the whole split's mean, as the notebook


def test_md5_failure_names_no_verify(tiny_cifar):
    with pytest.raises(DataError, match="md5 integrity check.*--no-verify"):
        load_cifar10(tiny_cifar, num_val=20, num_test=20)


def test_no_verify_still_needs_the_files(tmp_path):
    os.makedirs(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError, match="incomplete.*must still exist"):
        load_cifar10(str(tmp_path), verify=False)


def test_no_verify_still_needs_files_that_unpickle(tiny_cifar, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_cifar, broken)
    (broken / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="does not unpickle"):
        load_cifar10(str(broken), num_val=20, num_test=20, verify=False)


def test_missing_data_exits_2_with_clear_error(tmp_path, monkeypatch, capsys):
    def offline(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar_bn.data.torchvision.datasets.CIFAR10, "download", offline)
    code = train.main(["--data-dir", str(tmp_path / "nowhere"), "--logdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--data-dir" in err and "cifar-10-batches-py" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "nowhere")  # nothing left


# ---- model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reg", [0.0, 3.14])
def test_mlp_gradcheck_float64(reg):
    """The notebook's check 1.4: N=2, D=15, hidden (20, 30), C=10, weight_scale 5e-2, with batch norm."""
    torch.manual_seed(231)
    model = MLP(15, (20, 30), 10, norm="torch_bn", weight_scale=5e-2).double()
    x = torch.randn(2, 15, dtype=torch.float64)
    y = torch.randint(0, 10, (2,))
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_fn(*params):
        state = {**dict(zip(names, params)), **{n: b.clone() for n, b in buffers.items()}}
        out = functional_call(model, state, (x,))
        return torch.nn.functional.cross_entropy(out, y) + 0.5 * reg * sum(
            (p ** 2).sum() for n, p in zip(names, params) if n.endswith("weight") and p.dim() == 2)

    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert torch.autograd.gradcheck(loss_fn, params)
    # l2_penalty is the same regularizer.
    penalty = l2_penalty(model, reg)
    expected = 0.5 * reg * sum((m.weight ** 2).sum() for m in model.linears())
    torch.testing.assert_close(penalty, expected)


@pytest.mark.parametrize("norm", ["torch_bn", "none"])
def test_initial_loss_is_ln10_for_small_weight_scale(norm):
    torch.manual_seed(0)
    model = MLP(3072, (100,) * 5, 10, norm=norm, weight_scale=1e-3)
    x = torch.randn(50, 3, 32, 32) * 60
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (50,)))
    assert abs(loss.item() - math.log(10)) < 0.01


def test_mlp_layout_and_bad_arguments():
    model = MLP(12, (7, 5), 3, norm="torch", dropout=0.5)  # "torch": the accepted alias of "nn"
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert isinstance(MLP(12, (7,), 3).net[1], torch_bn.BatchNorm1d)
    with pytest.raises(ValueError, match="norm must be one of"):
        MLP(norm="layer")
    with pytest.raises(ValueError, match="weight_scale must be positive"):
        MLP(weight_scale=0.0)


# ---- training ---------------------------------------------------------------------------------

def small_config(**kw):
    base = dict(norm="torch_bn", hidden_dims=(16, 16), weight_scale=2e-2, batch_size=10, epochs=3, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("norm, loads", [("torch_bn", True), ("ghost", True), ("nn", False), ("none", False)])
def test_the_compiled_op_is_loaded_before_training_time_counts(tiny_cifar, tmp_path, monkeypatch, norm, loads):
    """A model with torch_bn layers on CPU gets the compiled op (its one-time build, on a machine
    that has none) when the Trainer is made, not in its first step, which the wall time counts."""
    calls = []
    real = torch_bn.cpp.op
    monkeypatch.setattr(torch_bn.cpp, "op", lambda: calls.append(1) or real())
    config = small_config(norm=norm, epochs=1, virtual_batch_size=5 if norm == "ghost" else None)
    trainer = Trainer(config, build_model(config, 3072), tiny_data(tiny_cifar), str(tmp_path / norm), progress=False)
    assert bool(calls) == loads and trainer.wall_time == 0.0


def test_trainer_trains_the_model_it_is_given(tiny_cifar, tmp_path):
    """Any classifier of the images: here a small conv net with torch_bn.BatchNorm2d."""
    data = tiny_data(tiny_cifar)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch_bn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    summary = Trainer(small_config(epochs=2), model, data, str(tmp_path / "conv"), progress=False).fit()
    assert len(summary["history"]["loss"]) == 2 * (130 // 10)
    assert summary["history"]["loss"][-1] < summary["history"]["loss"][0]


def test_same_seed_same_numbers(tiny_cifar, tmp_path):
    data = tiny_data(tiny_cifar)
    a = run(small_config(dropout=0.2), data, str(tmp_path / "a"), progress=False)
    b = run(small_config(dropout=0.2), data, str(tmp_path / "b"), progress=False)
    assert a["history"] == b["history"] and a["test_acc"] == b["test_acc"]



def test_resume_equals_uninterrupted(tiny_cifar, tmp_path):
    data = tiny_data(tiny_cifar)
    config = small_config(dropout=0.2, optimizer="sgd_momentum", lr=1e-2, lr_decay=0.9)
    full = run(config, data, str(tmp_path / "full"), progress=False)

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config, build_model(config, 3072), data, str(tmp_path / "cut"), progress=False).fit(on_epoch_end=stop_after_first_epoch)
    assert not os.path.exists(tmp_path / "cut" / "summary.json")
    resumed = run(config, data, str(tmp_path / "cut"), progress=False, resume=True)
    assert resumed["history"] == full["history"]
    assert resumed["test_acc"] == full["test_acc"] and resumed["best_val_acc"] == full["best_val_acc"]
    # The dashboard of the resumed run holds each iteration once.
    steps = [e.step for e in events(str(tmp_path / "cut")).Scalars("loss/train")]
    assert steps == list(range(1, len(full["history"]["loss"]) + 1))


def test_runs_are_never_overwritten(tiny_cifar, tmp_path):
    data = tiny_data(tiny_cifar)
    run(small_config(epochs=1), data, str(tmp_path / "r"), progress=False)
    before = os.listdir(tmp_path / "r")
    with pytest.raises(RunExistsError, match="never overwritten"):
        Trainer(small_config(epochs=1), build_model(small_config(), 3072), data, str(tmp_path / "r"), progress=False)
    assert os.listdir(tmp_path / "r") == before


def test_compare_cli_dashboards_and_summaries(tiny_cifar, tmp_path):
    logdir = str(tmp_path / "runs")
    # SGD: Adam would turn the rounding noise in the zero-gradient Linear biases before BN into
    # +-lr steps, so its curves drift apart (docs/notebook.md).
    args = ["--compare", "--data-dir", tiny_cifar, "--logdir", logdir, "--run-name", "cmp", "--epochs", "2",
            "--batch-size", "10", "--hidden-dims", "16,16", "--weight-scale", "0.02", "--optimizer", "sgd",
            "--lr", "0.01", *TINY]
    assert train.main(args) == 0
    root = os.path.join(logdir, "cmp")
    summaries = {}
    for norm in ("torch_bn", "nn", "none"):
        with open(os.path.join(root, norm, "summary.json")) as f:
            summaries[norm] = json.load(f)
        s = summaries[norm]
        assert set(s) >= {"config", "best_val_acc", "final_train_acc", "test_acc", "wall_time_s", "device", "versions"}
        acc = events(os.path.join(root, norm))
        tags = acc.Tags()
        assert {"loss/train", "accuracy/train", "accuracy/val", "lr"} <= set(tags["scalars"])
        assert len(acc.Scalars("loss/train")) == 2 * 13 and len(acc.Scalars("accuracy/best_val")) == 3
        # 13 iterations an epoch on 130 images: one check per epoch (more would cost over 15% of training).
        assert [e.step for e in acc.Scalars("accuracy/val")] == [0, 13, 26] == s["history"]["check_step"]
        histograms = {"layer1/pre_norm", "layer2/pre_norm"}
        if norm != "none":
            histograms |= {"layer1/post_norm", "layer1/bn_weight", "layer1/bn_bias", "layer1/bn_running_mean",
                           "layer2/bn_running_std"}
        assert histograms <= set(tags["histograms"])
        assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))
        assert not [t for t in tags["scalars"] if t.startswith("hparam")]
    # Same initial weights and batch order: torch_bn and nn.BatchNorm1d give the same curves.
    first = [summaries[n]["history"]["loss"][0] for n in ("torch_bn", "nn")]
    assert first[0] == pytest.approx(first[1], rel=1e-6, abs=1e-6)
    assert summaries["none"]["history"]["loss"][0] != pytest.approx(first[0], rel=1e-3)  # BN changes the net
    for a, b in zip(summaries["torch_bn"]["history"]["loss"], summaries["nn"]["history"]["loss"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    for key in ("train_acc", "val_acc"):
        assert summaries["torch_bn"]["history"][key] == summaries["nn"]["history"][key]
    # The curves figure: a PNG, and one TensorBoard image per panel in the comparison's first run.
    assert os.path.getsize(os.path.join(root, "compare.png")) > 10_000
    first = events(os.path.join(root, "torch_bn")).Tags()
    assert {"compare/loss", "compare/train_accuracy", "compare/val_accuracy"} <= set(first["images"])
    assert "experiment/text_summary" in first["tensors"]
    # The same run name again is refused, and nothing is overwritten.
    assert train.main(args) == 2


def test_experiments_write_figures_and_hparams(tiny_cifar, tmp_path):
    logdir = str(tmp_path / "runs")
    common = ["--data-dir", tiny_cifar, "--logdir", logdir, "--epochs", "1", "--num-train", "100", *TINY]
    assert train.main(["--experiment", "deep", "--run-name", "deep", *common]) == 0
    assert os.path.getsize(os.path.join(logdir, "deep", "deep.png")) > 10_000
    images = set(events(os.path.join(logdir, "deep", "torch_bn")).Tags()["images"])
    assert {"deep/loss", "deep/train_accuracy", "deep/val_accuracy"} <= images
    assert train.main(["--experiment", "weight-scale", "--num-scales", "2", "--run-name", "ws", *common]) == 0
    root = os.path.join(logdir, "ws")
    assert os.path.getsize(os.path.join(root, "weight_scale.png")) > 10_000
    assert os.path.getsize(os.path.join(root, "activation_std.png")) > 10_000
    images = set(events(os.path.join(root, "ws1e-04", "torch_bn")).Tags()["images"])
    assert {"weight_scale/best_val_acc", "activation_std/tiny", "activation_std/good", "activation_std/large"} <= images
    runs = sorted(os.path.join(s, n) for s in os.listdir(root) if os.path.isdir(os.path.join(root, s))
                  for n in os.listdir(os.path.join(root, s)))
    assert runs == [os.path.join(s, n) for s in ("ws1e+00", "ws1e-04") for n in ("none", "torch_bn")]
    for d in runs:
        with open(os.path.join(root, d, "summary.json")) as f:
            s = json.load(f)
        assert s["config"]["hidden_dims"] == [50] * 7 and s["num_train"] == 100
        assert "_hparams_/session_start_info" in events(os.path.join(root, d)).PluginTagToContent("hparams")


def test_resume_cli_finishes_an_interrupted_run(tiny_cifar, tmp_path, monkeypatch):
    logdir = str(tmp_path / "runs")
    args = ["--batchnorm", "--data-dir", tiny_cifar, "--logdir", logdir, "--run-name", "r", "--epochs", "2",
            "--hidden-dims", "8", *TINY]
    crash_after_first_save(monkeypatch, Trainer, lambda: train.main(args))
    assert train.main(["--resume", os.path.join(logdir, "r"), "--quiet"]) == 0
    with open(os.path.join(logdir, "r", "summary.json")) as f:
        assert len(json.load(f)["history"]["val_acc"]) == 3
    assert train.main(["--resume", str(tmp_path), "--quiet"]) == 2


def test_cli_rejects_contradictions(capsys):
    assert train.main(["--batchnorm", "--norm", "none"]) == 2
    assert "--batchnorm means --norm torch_bn" in capsys.readouterr().err
    assert train.main(["--compare", "--experiment", "deep"]) == 2
