"""Per-layer statistics, accuracy checks, hparams, text cards and figure colours of the dashboards,
and the dashboards as TensorBoard reads them: runs per logdir, HParams rows, the per-layer charts."""
import copy
import dataclasses
import os
import re

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups
from tensorboard.plugins.hparams import metadata as hp_metadata

import cifar_bn.lifecycle
import train
from cifar_bn import config, experiments
from cifar_bn.dashboard import (HPARAM_DOMAINS, MAX_RUNS_PER_LOGDIR, METRICS, NORM_DOMAIN, OPTIMIZER_DOMAIN,
                                LayerProbe, hparam_values)
from cifar_bn.data import load_cifar10
from cifar_bn.figures import (CARD, COLORS, LABELS, TENSORBOARD_PALETTE, activation_std_draws, curve_draws, panels,
                              weight_scale_draws)
from cifar_bn.models import MLP, activation_stds
from cifar_bn.config import OPTIMIZERS, TrainConfig
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
    # hparams: the device used, metrics that are the curves themselves, no trial id of our own.
    content = acc.PluginTagToContent("hparams")
    experiment = hp_metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
    assert [m.name.tag for m in experiment.metric_infos] == [tag for tag, _ in METRICS]
    assert {tag for tag, _ in METRICS} <= set(tags["scalars"])
    session = hp_metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    assert session.hparams["device"].string_value == "cpu" and session.hparams["num_train"].number_value == 100
    assert session.hparams["weight_scale"].number_value == 0.05 and session.group_name == ""
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
        assert tuple(fig.get_size_inches()) == CARD and fig.dpi == 100  # card-sized, one panel each
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


# ---- the dashboards as TensorBoard reads them -------------------------------------------------

def tensorboard_view(logdir):
    """What TensorBoard serves for logdir, through its own event multiplexer, data provider and
    hparams backend: (run names in the order its run list shows them, which sets their colours; the
    HParams experiment as the tab gets it; its session groups)."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, logdir)
    context = backend_context.Context(base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider))
    request_context = tb_context.RequestContext()
    experiment = get_experiment.Handler(request_context, context, "", api_pb2.GetExperimentRequest()).run()
    columns = [api_pb2.ColParams(hparam=i.name) for i in experiment.hparam_infos]
    columns += [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=10_000, col_params=columns,
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
                          api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(request_context, context, "", request).run()
    runs = sorted(provider.list_runs(request_context, experiment_id=""),  # as the /data/runs route orders them
                  key=lambda r: (r.start_time if r.start_time is not None else float("inf"), r.run_name))
    return [r.run_name for r in runs], experiment, groups.session_groups


def test_every_normalization_has_one_colour_and_compare_starts_the_palette():
    from cifar_bn.figures import COLOR_NAMES, COMPARE_ORDER
    assert set(COLORS) == set(config.NORMS) == set(LABELS) and len(set(COLORS.values())) == len(COLORS)
    assert all(c in TENSORBOARD_PALETTE and c in COLOR_NAMES for c in COLORS.values())
    # --compare's default runs start in COMPARE_ORDER, so TensorBoard gives them the figures' colours.
    assert tuple(config.COMPARE_NORMS) == COMPARE_ORDER[:len(config.COMPARE_NORMS)]


def test_every_hparam_has_one_domain_and_one_type():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(HPARAM_DOMAINS) == fields | {"num_train", "device"}  # a new config field needs a domain here
    assert tuple(NORM_DOMAIN) == config.NORMS and tuple(OPTIMIZER_DOMAIN) == OPTIMIZERS
    default = hparam_values(dataclasses.asdict(TrainConfig()), 100, "cpu")
    scaled = hparam_values(dataclasses.asdict(TrainConfig(weight_scale=1, lr=1, reg=0)), 100, "cpu")
    assert "weight_scale" not in default and scaled["weight_scale"] == 1.0  # PyTorch's init: left out, never "default"
    for name in default:
        assert type(default[name]) is type(scaled[name]), name
    ghost = hparam_values(dataclasses.asdict(TrainConfig(norm="ghost", batch_size=10, virtual_batch_size=5)), 100, "cpu")
    renorm = hparam_values(dataclasses.asdict(TrainConfig(norm="renorm", renorm_warmup=0)), 100, "cpu")
    assert ghost["virtual_batch_size"] == 5 and "renorm_warmup" not in ghost  # the other norm's option: blank
    assert renorm["renorm_warmup"] == 0 and "virtual_batch_size" not in renorm
    assert "virtual_batch_size" not in default and "renorm_warmup" not in default
    with pytest.raises(ValueError, match="no domain"):
        hparam_values({"ghost_batch": 5}, 100, "cpu")


def test_weight_scale_run_names_say_the_scale_first():
    names = experiments.scale_names(experiments.weight_scales(20))
    assert names[0] == "ws1e-04" and names[-1] == "ws1e+00" and len(set(names)) == 20
    assert len(set(experiments.scale_names(experiments.weight_scales(40)))) == 40  # more digits where needed
    runs = experiments.weight_scale_runs(TrainConfig(), "root")
    assert [d for _, _, d in runs[:2]] == [os.path.join("root", "ws1e-04", n) for n in ("torch_bn", "none")]
    assert len({d for _, _, d in runs}) == 40 <= MAX_RUNS_PER_LOGDIR  # the default sweep fits one logdir


@pytest.mark.slow
def test_dashboards_of_the_readme_commands(tiny_cifar, tmp_path):
    """The issue's scenario on tiny data: --compare, --experiment deep and the weight-scale sweep,
    sequential and vectorized, into one logdir. Each launch folder is a logdir of at most 40 runs
    with no parent run; opened one by one or all together, HParams has one row per run, each with
    its own values, the hparams TensorBoard shows by default include norm, weight_scale and
    batch_size, every hparam keeps one type and has its domain; each layer has one chart of its
    pre- and post-norm statistics."""
    logdir = str(tmp_path / "runs")
    common = ["--data-dir", tiny_cifar, "--logdir", logdir, "--epochs", "1", "--num-train", "100",
              "--batch-size", "10", "--hidden-dims", "8,8", "--no-verify", "--num-val", "20", "--num-test", "20",
              "--quiet"]
    launches = {"cmp": ["--compare"], "deep": ["--experiment", "deep"],
                "ws": ["--experiment", "weight-scale", "--num-scales", "2"],
                "wsv": ["--experiment", "weight-scale", "--num-scales", "2", "--vectorized"]}
    for name, args in launches.items():
        assert train.main([*args, "--run-name", name, *common]) == 0
    expected = {"cmp": ["torch_bn", "none", "nn"], "deep": ["torch_bn", "none"],  # in TensorBoard's order
                "ws": ["ws1e-04/torch_bn", "ws1e-04/none", "ws1e+00/torch_bn", "ws1e+00/none"],
                "wsv": ["ws1e-04/torch_bn", "ws1e+00/torch_bn", "ws1e-04/none", "ws1e+00/none"]}
    rows = {}
    for name, runs in expected.items():
        root = os.path.join(logdir, name)
        assert not [f for f in os.listdir(root) if f.startswith("events.")]  # no parent run
        seen, experiment, groups = tensorboard_view(root)
        assert seen == runs and len(seen) <= MAX_RUNS_PER_LOGDIR
        assert sorted(g.name for g in groups) == sorted(runs)  # one row per run, its path under the logdir
        if name in ("cmp", "deep"):  # the figures' colours are the charts' (TensorBoard's, by run order)
            assert [TENSORBOARD_PALETTE[i] for i in range(len(runs))] == [COLORS[n] for n in runs]
        rows.update({f"{name}/{g.name}": g for g in groups})
        # The experiment's card and figures are in its first run.
        first = events(os.path.join(root, "torch_bn" if name in ("cmp", "deep") else "ws1e-04/torch_bn"))
        assert "experiment/text_summary" in first.Tags()["tensors"] and first.Tags()["images"]
    # All launches in one logdir: still one row per run (no two runs merged into one number).
    seen, experiment, groups = tensorboard_view(logdir)
    assert len(seen) == 13 and sorted(g.name for g in groups) == sorted(rows) == sorted(seen)
    for g in groups:
        assert len(g.sessions) == 1 and g.sessions[0].name == g.name
        own = {m.name.tag: m.value for m in g.metric_values}
        assert own == {m.name.tag: m.value for m in rows[g.name].metric_values}  # its own metrics
        best = events(os.path.join(logdir, g.name)).Scalars("accuracy/best_val")[-1].value
        assert own["accuracy/best_val"] == pytest.approx(best)
    assert {g.hparams["norm"].string_value for g in groups} == {"torch_bn", "nn", "none"}
    # The hparams shown by default: TensorBoard sorts by `differs`, then name, and ticks five.
    infos = list(experiment.hparam_infos)
    names = [i.name for i in infos]
    assert names == [i.name for i in sorted(infos, key=lambda i: (not i.differs, i.name))]  # as served
    assert {"norm", "weight_scale", "batch_size"} <= set(names[:5])
    domains = {i.name: i for i in infos}
    for name in ("norm", "optimizer"):
        assert domains[name].HasField("domain_discrete")
    assert sorted(v.string_value for v in domains["norm"].domain_discrete.values) == sorted(config.NORMS)
    for name in ("weight_scale", "lr", "batch_size", "epochs", "num_train", "seed", "dropout", "reg", "lr_decay"):
        interval = domains[name].domain_interval
        assert domains[name].type == api_pb2.DATA_TYPE_FLOAT64 and interval.min_value < interval.max_value, name
    for g in groups:  # every value inside its domain, of its declared type
        for name, value in g.hparams.items():
            info = domains[name]
            if info.HasField("domain_interval"):
                assert value.HasField("number_value"), name
                assert info.domain_interval.min_value <= value.number_value <= info.domain_interval.max_value
            elif info.HasField("domain_discrete"):
                assert value in list(info.domain_discrete.values), name
            else:
                assert value.HasField("string_value"), name
    scales = {g.name: g.hparams["weight_scale"].number_value for g in groups if "weight_scale" in g.hparams}
    assert scales["ws/ws1e-04/none"] == pytest.approx(1e-4) and scales["wsv/ws1e+00/torch_bn"] == 1.0
    # Per layer, one custom-scalars chart holding the pre- and post-norm mean and std.
    for run_name in ("cmp/torch_bn", "cmp/none", "wsv/ws1e-04/torch_bn"):
        acc = events(os.path.join(logdir, run_name))
        layout = layout_pb2.Layout.FromString(
            acc.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
        charts = [c for category in layout.category for c in category.chart]
        scalars = acc.Tags()["scalars"]
        assert len(charts) == 2  # --hidden-dims 8,8
        for i, chart in enumerate(charts, 1):
            matched = sorted(t for t in scalars if any(re.search(r, t) for r in chart.multiline.tag))
            kinds = ("pre_norm", "post_norm") if not run_name.endswith("none") else ("pre_norm",)
            assert matched == sorted(f"layer{i}/{k}_{s}" for k in kinds for s in ("mean", "std")), run_name
