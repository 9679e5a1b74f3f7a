"""The vectorized trainer against the sequential one, its dashboards, resume, and the CLI's --vectorized."""
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

import cifar_bn.lifecycle
import train
from helpers import Interrupt, crash_after_first_save
from cifar_bn.data import load_cifar10
from cifar_bn.config import TrainConfig
from cifar_bn.runs import RunExistsError
from cifar_bn.training import run
from cifar_bn.models import MLP
from cifar_bn.vectorized import VectorizedTrainer, load_state_dicts, run_many

TINY = ["--no-verify", "--num-val", "20", "--num-test", "20", "--quiet"]
# float32 rounding differs between one matrix product for all models and one per model.
LOSS_TOL = dict(rel=1e-5, abs=1e-5)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-5)
ACT_TOL = dict(rel=1e-4)  # activation stds, per layer (the smallest here are ~1e-9: relative)


def tiny_data(root):
    return load_cifar10(root, num_val=20, num_test=20, verify=False)


def events(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def sweep(**kw):
    base = dict(hidden_dims=(8, 8, 8), epochs=3, batch_size=25, lr=1e-3)
    base.update(kw)
    return [TrainConfig(norm=n, weight_scale=s, **base) for s in (1e-3, 3e-2, 0.3) for n in ("torch_bn", "none")]


@pytest.mark.slow
def test_vectorized_equals_sequential(tiny_cifar, tmp_path):
    data = tiny_data(tiny_cifar)
    configs = sweep()
    seq = [run(c, data, str(tmp_path / "seq" / str(i)), progress=False) for i, c in enumerate(configs)]
    vec = run_many(configs, data, [str(tmp_path / "vec" / str(i)) for i in range(len(configs))],
                   str(tmp_path / "vec"), progress=False)
    final = load_state_dicts(str(tmp_path / "vec"))
    n_train = len(data.X_train)
    for i, (c, a, b) in enumerate(zip(configs, seq, vec)):
        assert b["config"] == a["config"]
        assert b["history"]["loss"] == pytest.approx(a["history"]["loss"], **LOSS_TOL)  # every iteration
        assert b["history"]["lr"] == a["history"]["lr"]
        for key, n in (("train_acc", n_train), ("val_acc", len(data.y_val))):
            # at most one image classified differently (float32 rounding at a near-tie of two logits)
            assert all(abs(x - y) <= 1 / n + 1e-12 for x, y in zip(a["history"][key], b["history"][key])), (key, i)
        assert abs(b["test_acc"] - a["test_acc"]) <= 1 / len(data.y_test) + 1e-12
        assert set(b) == set(a) | {"vectorized_models"} and b["epochs_done"] == a["epochs_done"] == c.epochs
        assert b["history"].keys() == a["history"].keys()
        assert b["history"]["check_step"] == a["history"]["check_step"]
        for key, n in (("check_train_acc", n_train), ("check_val_acc", len(data.y_val))):
            assert all(abs(x - y) <= 1 / n + 1e-12 for x, y in zip(a["history"][key], b["history"][key])), (key, i)
        # What experiments.weight_scale's activation_std figure draws: at init and after training.
        assert b["history"]["activation_std_init"] == b["activation_std"]["init"]
        for when in ("init", "final"):
            assert len(b["activation_std"][when]) == len(c.hidden_dims)
            assert b["activation_std"][when] == pytest.approx(a["activation_std"][when], **ACT_TOL), (when, i)
        ref = torch.load(tmp_path / "seq" / str(i) / "checkpoint.pt", weights_only=True)["models"]["model"]
        assert final[i].keys() == ref.keys()
        MLP(3072, c.hidden_dims, 10, c.norm).load_state_dict(final[i])  # loads into the model it came from
        for name, v in ref.items():
            ours = final[i][name]
            if name.endswith(".bias") and f"net.{int(name.split('.')[1]) + 1}.running_mean" in ref:
                # A Linear bias that feeds a BN has zero true gradient: its computed gradient is rounding
                # noise, which Adam turns into +-lr steps, so it differs by at most 2 lr per step.
                assert (ours - v).abs().max() <= 2 * c.lr * len(a["history"]["loss"])
            elif c.norm == "torch_bn" and name.endswith("running_mean"):
                # The running mean follows that bias (batch mean of W h + b): bounded by the same steps.
                assert (ours - v).abs().max() <= 2 * c.lr * len(a["history"]["loss"]) + 1e-4 * v.abs().max()
            else:
                torch.testing.assert_close(ours, v, **WEIGHT_TOL, msg=lambda m: f"run {i} {name}: {m}")


@pytest.mark.slow
def test_vectorized_sgd_biases_equal_too(tiny_cifar, tmp_path):
    # With SGD the rounding noise in those biases stays noise-sized: every tensor agrees (with the L2 penalty).
    data = tiny_data(tiny_cifar)
    configs = sweep(optimizer="sgd", lr=1e-2, epochs=2, reg=0.05)[2:4]
    seq = [run(c, data, str(tmp_path / "seq" / str(i)), progress=False) for i, c in enumerate(configs)]
    vec = run_many(configs, data, [str(tmp_path / "vec" / str(i)) for i in range(2)], str(tmp_path / "vec"),
                   progress=False)
    final = load_state_dicts(str(tmp_path / "vec"))
    for i in range(2):
        assert vec[i]["history"]["loss"] == pytest.approx(seq[i]["history"]["loss"], **LOSS_TOL)  # penalty included
        ref = torch.load(tmp_path / "seq" / str(i) / "checkpoint.pt", weights_only=True)["models"]["model"]
        for name, v in ref.items():
            torch.testing.assert_close(final[i][name], v, **WEIGHT_TOL, msg=lambda m: f"run {i} {name}: {m}")
    assert seq[0]["history"]["loss"] != pytest.approx(seq[1]["history"]["loss"], rel=1e-3)  # BN changes the net


def scalar_values(acc, tag):
    return [e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_vectorized_dashboards_equal_sequential(tiny_cifar, tmp_path, monkeypatch):
    # SGD, so that every tensor of the two trainings agrees to float32 rounding (with Adam the Linear biases
    # before a BN, which have zero true gradient, move by +-lr on rounding noise: pre_norm_mean would follow).
    # Statistics every 2 iterations; a budget for 10 accuracy checks per epoch of 5 iterations: a check
    # after every iteration.
    monkeypatch.setattr(cifar_bn.lifecycle, "EVAL_COST_SHARE", 10.0)
    data = tiny_data(tiny_cifar)
    # Scales 1e-3 and 3e-2: at 0.3 the run without BN explodes (pre-activation std ~1e3), which amplifies
    # float32 rounding past 1e-4 (test_vectorized_equals_sequential covers that scale).
    configs = sweep(optimizer="sgd", lr=1e-2, epochs=3, batch_size=25, reg=0.05)[:4]
    seq_dirs = [str(tmp_path / "seq" / str(i)) for i in range(len(configs))]
    vec_dirs = [str(tmp_path / "vec" / str(i)) for i in range(len(configs))]
    seq = [run(c, data, d, progress=False, log_every=2) for c, d in zip(configs, seq_dirs)]
    vec = run_many(configs, data, vec_dirs, str(tmp_path / "vec"), progress=False, log_every=2)
    iterations = len(seq[0]["history"]["loss"])
    assert seq[0]["history"]["check_step"] == list(range(iterations + 1))  # the checks the test asks for
    for i, (c, a_dir, b_dir) in enumerate(zip(configs, seq_dirs, vec_dirs)):
        a, b = events(a_dir), events(b_dir)
        tags = a.Tags()["scalars"]
        assert sorted(tags) == sorted(b.Tags()["scalars"])
        layer_tags = [t for t in tags if t.startswith("layer")]
        hidden = len(c.hidden_dims)
        assert len(layer_tags) == (4 if c.norm == "torch_bn" else 2) * hidden + hidden + 1, layer_tags
        assert {"loss/train", "loss/train_epoch", "accuracy/train", "accuracy/val", "accuracy/best_val", "lr"} <= set(tags)
        for tag in tags:
            steps, x = scalar_values(a, tag)
            steps_b, y = scalar_values(b, tag)
            assert steps == steps_b, tag
            if tag.startswith("accuracy/"):
                continue  # compared in the histories, to one image
            if tag.endswith("_mean"):
                # Means near zero (a BN output's is its beta): compared on the scale of the layer's std.
                scale = [abs(v) for v in scalar_values(a, tag[:-len("mean")] + "std")[1]]
                assert all(abs(p - q) <= 1e-4 * abs(p) + 1e-5 * s for p, q, s in zip(x, y, scale)), (i, tag)
            else:
                assert y == pytest.approx(x, rel=1e-4, abs=1e-12), (i, tag)
        assert scalar_values(b, "layer1/pre_norm_std")[0] == list(range(2, iterations + 1, 2))  # every 2
        # Per-epoch histograms: the same tags and steps, the same number of values, the same range and sum.
        assert sorted(a.Tags()["histograms"]) == sorted(b.Tags()["histograms"])
        assert any(t.endswith("/pre_norm") for t in a.Tags()["histograms"])
        assert any(t.endswith("/bn_running_std") for t in a.Tags()["histograms"]) == (c.norm == "torch_bn")
        for tag in a.Tags()["histograms"]:
            ha, hb = a.Histograms(tag), b.Histograms(tag)
            assert [e.step for e in ha] == [e.step for e in hb], tag
            for ea, eb in zip(ha, hb):
                pa, pb = ea.histogram_value, eb.histogram_value
                width = max(abs(pa.min), abs(pa.max), 1e-30)
                assert pb.num == pa.num and len(pb.bucket) == len(pa.bucket), tag
                for field in ("min", "max"):
                    assert abs(getattr(pb, field) - getattr(pa, field)) <= 1e-4 * width, (i, tag, field)
                assert abs(pb.sum - pa.sum) <= 1e-4 * width * pa.num, (i, tag)
        # The hparams declaration and session, and the text cards.
        ca, cb = a.PluginTagToContent("hparams"), b.PluginTagToContent("hparams")
        assert ca.keys() == cb.keys()
        assert hp_metadata.parse_experiment_plugin_data(cb["_hparams_/experiment"]) == \
            hp_metadata.parse_experiment_plugin_data(ca["_hparams_/experiment"])
        sa = hp_metadata.parse_session_start_info_plugin_data(ca["_hparams_/session_start_info"])
        sb = hp_metadata.parse_session_start_info_plugin_data(cb["_hparams_/session_start_info"])
        assert sb.hparams == sa.hparams and sb.group_name == sa.group_name
        assert sorted(a.Tags()["tensors"]) == sorted(b.Tags()["tensors"])
        assert b.Tensors("about/text_summary")[0].tensor_proto == a.Tensors("about/text_summary")[0].tensor_proto
        assert [e.step for e in b.Tensors("results/text_summary")] == [e.step for e in a.Tensors("results/text_summary")]
        assert vec[i]["logging_time_s"] > 0



@pytest.mark.slow
def test_vectorized_resume_equals_uninterrupted(tiny_cifar, tmp_path):
    data = tiny_data(tiny_cifar)
    configs = sweep(epochs=3, lr_decay=0.9)[:4]
    dirs = lambda name: [str(tmp_path / name / str(i)) for i in range(4)]  # noqa: E731
    full = run_many(configs, data, dirs("full"), str(tmp_path / "full"), progress=False)

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        VectorizedTrainer(configs, data, dirs("cut"), str(tmp_path / "cut"), progress=False).fit(
            on_epoch_end=stop_after_first_epoch)
    assert not os.path.exists(tmp_path / "cut" / "0" / "summary.json")
    with pytest.raises(RunExistsError, match="never overwritten"):  # a new launch may not reuse the folders
        VectorizedTrainer(configs, data, dirs("cut"), str(tmp_path / "cut"), progress=False)
    resumed = run_many(configs, data, dirs("cut"), str(tmp_path / "cut"), progress=False, resume=True)
    for a, b in zip(full, resumed):
        assert b["history"] == a["history"] and b["test_acc"] == a["test_acc"]
    steps = [e.step for e in events(dirs("cut")[0]).Scalars("loss/train")]
    assert steps == list(range(1, len(full[0]["history"]["loss"]) + 1))  # each iteration logged once
    # A finished batch is read back, not trained again.
    again = run_many(configs, data, dirs("cut"), str(tmp_path / "cut"), progress=False, resume=True)
    assert [s["history"] for s in again] == [s["history"] for s in resumed]


@pytest.mark.slow
def test_cli_vectorized_sweep_writes_what_the_sequential_one_writes(tiny_cifar, tmp_path):
    logdir = str(tmp_path / "runs")
    common = ["--experiment", "weight-scale", "--num-scales", "2", "--data-dir", tiny_cifar, "--logdir", logdir,
              "--epochs", "2", "--num-train", "100", "--hidden-dims", "8,8", *TINY]
    assert train.main([*common, "--run-name", "seq"]) == 0
    assert train.main([*common, "--run-name", "vec", "--vectorized"]) == 0
    seq_root, vec_root = os.path.join(logdir, "seq"), os.path.join(logdir, "vec")
    for png in ("weight_scale.png", "activation_std.png"):
        assert os.path.getsize(os.path.join(vec_root, png)) > 10_000
    first_tags = events(os.path.join(vec_root, "ws1e-04", "torch_bn")).Tags()
    assert sorted(first_tags["images"]) == sorted(events(os.path.join(seq_root, "ws1e-04", "torch_bn")).Tags()["images"])
    assert {"weight_scale/best_val_acc", "activation_std/tiny"} <= set(first_tags["images"])

    def run_folders(root):
        return sorted(os.path.relpath(d, root) for d, _, files in os.walk(root) if "summary.json" in files)

    runs = run_folders(seq_root)
    assert runs == run_folders(vec_root) and len(runs) == 4
    for d in runs:
        a, b = events(os.path.join(seq_root, d)), events(os.path.join(vec_root, d))
        assert a.Tags()["scalars"] == b.Tags()["scalars"] and a.Tags()["histograms"] == b.Tags()["histograms"]
        for tag in a.Tags()["scalars"]:
            assert [e.step for e in a.Scalars(tag)] == [e.step for e in b.Scalars(tag)]
        assert a.PluginTagToContent("hparams").keys() == b.PluginTagToContent("hparams").keys()
        with open(os.path.join(seq_root, d, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(vec_root, d, "summary.json")) as f:
            v = json.load(f)
        assert set(v) >= set(s) and v["config"] == s["config"]
        assert v["history"]["loss"] == pytest.approx(s["history"]["loss"], **LOSS_TOL)
    with open(os.path.join(vec_root, "run.json")) as f:
        assert json.load(f)["vectorized"] is True
    # --resume of the finished sweep reads it back.
    assert train.main(["--resume", vec_root, "--quiet"]) == 0


@pytest.mark.slow
def test_cli_vectorized_resume_after_a_crash(tiny_cifar, tmp_path, monkeypatch):
    logdir = str(tmp_path / "runs")
    args = ["--experiment", "weight-scale", "--vectorized", "--num-scales", "2", "--data-dir", tiny_cifar,
            "--logdir", logdir, "--run-name", "v", "--epochs", "2", "--num-train", "100", "--hidden-dims", "8", *TINY]
    crash_after_first_save(monkeypatch, VectorizedTrainer, lambda: train.main(args))
    assert train.main(["--resume", os.path.join(logdir, "v"), "--quiet"]) == 0
    with open(os.path.join(logdir, "v", "ws1e+00", "torch_bn", "summary.json")) as f:
        assert len(json.load(f)["history"]["val_acc"]) == 3


def test_cli_vectorized_refusals_leave_nothing(tiny_cifar, tmp_path, capsys):
    logdir = tmp_path / "runs"
    base = ["--data-dir", tiny_cifar, "--logdir", str(logdir), *TINY]
    assert train.main(["--vectorized", "--batchnorm", *base]) == 2
    assert "--vectorized trains the runs of --experiment weight-scale" in capsys.readouterr().err
    assert train.main(["--experiment", "weight-scale", "--vectorized", "--dropout", "0.5", *base]) == 2
    assert "does not train with dropout" in capsys.readouterr().err
    assert not logdir.exists()


def test_configs_that_cannot_train_together(tiny_cifar, tmp_path):
    data = tiny_data(tiny_cifar)
    with pytest.raises(ValueError, match="must share lr"):
        VectorizedTrainer([TrainConfig(lr=1e-3), TrainConfig(lr=1e-2)], data, ["a", "b"], str(tmp_path))
    with pytest.raises(ValueError, match="runs norm torch_bn or none.*'nn'"):
        VectorizedTrainer([TrainConfig(norm="torch")], data, ["a"], str(tmp_path))
    with pytest.raises(ValueError, match="fewer than one batch of 500"):
        VectorizedTrainer([TrainConfig(batch_size=500)], data, ["a"], str(tmp_path))
    with pytest.raises(ValueError, match="one run folder per config"):
        VectorizedTrainer([TrainConfig()], data, ["a", "b"], str(tmp_path))
    assert not os.path.exists("a") and not os.listdir(tmp_path)
