"""Per-layer statistics, accuracy checks, hparams, text cards and figure colours of the dashboards."""
import copy

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

import cifar_bn.lifecycle
from cifar_bn.dashboard import METRICS, LayerProbe
from cifar_bn.data import load_cifar10
from cifar_bn.figures import COLORS, LABELS, activation_std_draws, curve_draws, panels, weight_scale_draws
from cifar_bn.models import MLP, activation_stds
from cifar_bn.config import TrainConfig
from cifar_bn.lifecycle import checks_per_epoch
from cifar_bn.training import run


def reference_layers(model, x, norm):
    """Each hidden layer's Linear output, batch-norm output (PyTorch's F.batch_norm on batch
    statistics) and ReLU output, computed from the parameters in float64."""
    linears = model.linears()
    norms = [m for m in model.net if isinstance(m, torch.nn.BatchNorm1d) or type(m).__name__ == "BatchNorm1d"]
    h = x.double().flatten(1)
    out = []
    for i, lin in enumerate(linears[:-1]):
        z = F.linear(h, lin.weight.double(), lin.bias.double())
        post = None
        if norm != "none":
            bn = norms[i]
            post = F.batch_norm(z, None, None, bn.weight.double(), bn.bias.double(), training=True, eps=bn.eps)
        h = torch.relu(post if post is not None else z)
        out.append((z, post, h))
    return out


@pytest.mark.parametrize("norm", ["torch_bn", "nn", "none"])
def test_layer_probe_matches_a_float64_reference(norm):
    torch.manual_seed(0)
    model = MLP(12, (9, 7), 4, norm=norm, weight_scale=0.3)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    probe = LayerProbe(model)
    probe.armed = True
    F.cross_entropy(model(x), y).backward()
    stats = probe.stats()
    layers = reference_layers(model, x, norm)
    for i, (pre, post, _) in enumerate(layers, 1):
        assert stats[f"layer{i}/pre_norm_mean"] == pytest.approx(pre.mean().item(), abs=1e-5)
        assert stats[f"layer{i}/pre_norm_std"] == pytest.approx(pre.std().item(), rel=1e-5)
        if post is None:
            assert f"layer{i}/post_norm_std" not in stats
        else:
            assert stats[f"layer{i}/post_norm_mean"] == pytest.approx(post.mean().item(), abs=1e-5)
            assert stats[f"layer{i}/post_norm_std"] == pytest.approx(post.std().item(), rel=1e-4)
    # The gradients of the same loss through a float64 copy of the model.
    clone = copy.deepcopy(model).double()
    grads = torch.autograd.grad(F.cross_entropy(clone(x.double()), y), [lin.weight for lin in clone.linears()])
    for i, g in enumerate(grads, 1):
        assert stats[f"layer{i}/weight_grad_norm"] == pytest.approx(g.norm().item(), rel=1e-4)
    assert len([t for t in stats if t.endswith("weight_grad_norm")]) == 3  # the output layer's too
    # Disarmed, nothing is kept.
    probe.outputs.clear()
    probe.armed = False
    model(x)
    assert probe.outputs == {}
    probe.remove()


@pytest.mark.parametrize("norm", ["torch_bn", "none"])
def test_activation_stds_use_batch_statistics_and_leave_the_model_as_it_was(norm):
    torch.manual_seed(1)
    model = MLP(12, (9, 7, 5), 4, norm=norm, weight_scale=0.5, dropout=0.5).eval()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(32, 12)
    stds = activation_stds(model, x)
    layers = reference_layers(model, x, norm)
    assert stds == pytest.approx([h.std().item() for _, _, h in layers], rel=1e-4)
    assert not model.training
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])


def test_checks_per_epoch_budget():
    assert checks_per_epoch(49_000, 2_000) == 10  # full CIFAR-10: ten checks an epoch
    assert checks_per_epoch(1_000, 2_000) == 1  # the notebook's 1,000 images: the epoch end only
    assert checks_per_epoch(20_000, 2_000) == 4  # 0.15 * 3 * 20,000 / 2,000 = 4.5


def events(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_run_dashboard_checks_hparams_and_card(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_bn.lifecycle, "EVAL_COST_SHARE", 100.0)  # ten checks an epoch on tiny data
    data = load_cifar10(tiny_cifar, num_train=100, num_val=20, num_test=20, verify=False)
    config = TrainConfig(norm="torch_bn", hidden_dims=(8, 8), batch_size=10, weight_scale=0.05, epochs=2)
    summary = run(config, data, str(tmp_path / "r"), progress=False, log_every=3)
    h = summary["history"]
    # 10 iterations an epoch, a check after each and at the epoch ends; best val only at epoch ends.
    assert h["check_step"] == list(range(21))
    assert h["val_acc"] == [h["check_val_acc"][0], h["check_val_acc"][10], h["check_val_acc"][20]]
    assert summary["best_val_acc"] == max(h["val_acc"])
    acc = events(str(tmp_path / "r"))
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("accuracy/val")] == list(range(21))
    assert [e.step for e in acc.Scalars("layer2/post_norm_std")] == [3, 6, 9, 12, 15, 18]
    assert {"layer1/pre_norm_mean", "layer1/post_norm_mean", "layer3/weight_grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("accuracy/best_val")] == [0, 10, 20]
    # hparams: what varies first, the device used, metrics that are the curves themselves.
    content = acc.PluginTagToContent("hparams")
    experiment = hp_metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
    assert [i.name for i in experiment.hparam_infos][:4] == ["norm", "weight_scale", "num_train", "lr"]
    assert [m.name.tag for m in experiment.metric_infos] == [tag for tag, _ in METRICS]
    assert {tag for tag, _ in METRICS} <= set(tags["scalars"])
    session = hp_metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    assert session.hparams["device"].string_value == "cpu" and session.hparams["num_train"].number_value == 100
    assert {"about/text_summary", "results/text_summary"} <= set(tags["tensors"])
    assert summary["activation_std"]["init"] and len(summary["activation_std"]["final"]) == 2


def line_colors(fig):
    return {line.get_label(): line.get_color() for ax in fig.axes for line in ax.get_lines()}


def test_every_figure_gives_each_normalization_its_colour():
    history = {"loss": [2.3, 2.0, 1.8, 1.7], "train_acc": [0.1, 0.3, 0.5], "val_acc": [0.1, 0.2, 0.3],
               "check_step": [0, 2, 4], "check_train_acc": [0.1, 0.3, 0.5], "check_val_acc": [0.1, 0.2, 0.3]}
    summary = {"best_val_acc": 0.3, "best_train_acc": 0.5, "final_loss": 1.7,
               "activation_std": {"init": [1.0, 0.1], "final": [1.0, 0.5]}}
    figures = [*panels(curve_draws({n: history for n in COLORS})).values(),
               *panels(weight_scale_draws([1e-3, 1e-2], {n: [summary, summary] for n in ("torch_bn", "none")})).values(),
               *panels(activation_std_draws({"tiny": (1e-3, {n: summary for n in ("torch_bn", "none")})})).values()]
    for fig in figures:
        colors = line_colors(fig)
        assert fig.get_size_inches() * fig.dpi == pytest.approx((640, 400))  # card-sized, one panel each
        assert len(fig.axes) == 1
        for norm, color in COLORS.items():
            for label, c in colors.items():
                if label.startswith(LABELS[norm]):
                    assert matplotlib.colors.to_hex(c) == color
        matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("values", [torch.randn(6, 2500), torch.ones(3, 50), torch.randn(5, 50).relu(),
                                    torch.randn(4, 7) * 1e-20, torch.randint(0, 5, (6, 100)).float(),
                                    torch.randn(2, 1)], ids=["normal", "constant", "relu", "tiny", "integers", "one"])
def test_histogram_protos_equal_add_histogram(values):
    # The batched histograms the vectorized sweep writes are those SummaryWriter.add_histogram writes per row.
    from torch.utils.tensorboard.summary import make_histogram

    from cifar_bn.dashboard import HISTOGRAM_BINS, histogram_protos

    for row, ours in zip(values, histogram_protos(values)):
        ref = make_histogram(row.double().numpy(), HISTOGRAM_BINS)
        assert list(ours.bucket) == list(ref.bucket) and list(ours.bucket_limit) == list(ref.bucket_limit)
        assert (ours.min, ours.max, ours.num) == (ref.min, ref.max, ref.num)
        assert ours.sum == pytest.approx(ref.sum, rel=1e-12, abs=1e-300)
        assert ours.sum_squares == pytest.approx(ref.sum_squares, rel=1e-12, abs=1e-300)


def test_histogram_protos_refuse_what_add_histogram_refuses():
    from cifar_bn.dashboard import histogram_protos

    with pytest.raises(ValueError, match="no element"):
        histogram_protos(torch.ones(2, 0))
    with pytest.raises(ValueError, match="not finite"):
        histogram_protos(torch.tensor([[1.0, float("inf")]]))
