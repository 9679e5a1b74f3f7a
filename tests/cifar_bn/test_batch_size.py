"""The batch-size experiment and the normalizations beside batch norm (batch renormalization, ghost
batch norm, layer norm): models, launches, the experiment end to end, its figures, table and
reproduce section, on a tiny generated CIFAR-10."""
import json
import os

import matplotlib
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata
from torch import nn

import torch_bn
import train
from cifar_bn import batch_size as batch_sizes
from cifar_bn import reproduce
from cifar_bn.config import NORMS, RENORM_DMAX, RENORM_RMAX, TrainConfig
from cifar_bn.figures import COLORS, panels
from cifar_bn.models import MLP, hidden_layers
from cifar_bn.training import build_model

TINY = ["--no-verify", "--num-val", "20", "--num-test", "20", "--quiet"]
QUICK = [*TINY, "--hidden-dims", "8,8", "--batch-size", "10", "--weight-scale", "0.05"]


def events(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def session_hparams(run_dir):
    content = events(run_dir).PluginTagToContent("hparams")
    info = hp_metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    return {k: v.string_value or v.number_value for k, v in info.hparams.items()}


# ---- models and configs ------------------------------------------------------------------------

LAYER = {"torch_bn": torch_bn.BatchNorm1d, "nn": nn.BatchNorm1d, "renorm": torch_bn.BatchRenorm1d,
         "ghost": torch_bn.GhostBatchNorm1d, "layernorm": nn.LayerNorm}


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_puts_each_normalization_after_every_hidden_linear(norm):
    options = {"virtual_batch_size": 4} if norm == "ghost" else {"renorm_warmup": 7} if norm == "renorm" else {}
    torch.manual_seed(0)
    model = MLP(12, (9, 7), 4, norm=norm, weight_scale=0.3, **options)
    torch.manual_seed(0)
    plain = MLP(12, (9, 7), 4, norm="none", weight_scale=0.3)
    layers = hidden_layers(model)
    assert len(layers) == 2
    if norm == "none":
        assert all(layer.norm is None for layer in layers)
    for layer, width in zip(layers, (9, 7)):
        if norm != "none":
            assert type(layer.norm) is LAYER[norm]
            assert (layer.norm.normalized_shape == (width,)) if norm == "layernorm" else layer.norm.num_features == width
    if norm == "renorm":
        assert all((l.norm.rmax, l.norm.dmax, l.norm.warmup_steps) == (RENORM_RMAX, RENORM_DMAX, 7) for l in layers)
    if norm == "ghost":
        assert all(l.norm.virtual_batch_size == 4 for l in layers)
    # The normalization layers draw no random numbers: every norm starts from the same Linear weights.
    for a, b in zip(model.linears(), plain.linears()):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert model(torch.randn(8, 12)).shape == (8, 4)


def test_layernorm_mlp_normalizes_each_sample_over_its_features():
    """The layer-norm model's hidden pre-activations, recomputed in float64 from the definition: each
    sample's features have mean 0 and variance 1 (times gamma, plus beta), whatever the rest of the batch."""
    torch.manual_seed(0)
    model = MLP(12, (9,), 4, norm="layernorm", weight_scale=0.3).double()
    with torch.no_grad():
        model.net[1].weight.copy_(torch.linspace(0.5, 2, 9))
        model.net[1].bias.copy_(torch.linspace(-1, 1, 9))
    x = torch.randn(6, 12, dtype=torch.float64)
    z = x @ model.net[0].weight.T + model.net[0].bias
    expected = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + 1e-5)
    expected = torch.relu(expected * model.net[1].weight + model.net[1].bias) @ model.net[3].weight.T + model.net[3].bias
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model(x[:1]), expected[:1])  # one sample alone: the same output


def test_renorm_warmup_defaults_to_one_epoch():
    config = TrainConfig(norm="renorm", batch_size=10)
    assert config.renorm_warmup is None and config.resolved(130).renorm_warmup == 13
    assert TrainConfig(norm="renorm", batch_size=10, renorm_warmup=0).resolved(130).renorm_warmup == 0
    assert TrainConfig(norm="torch_bn").resolved(130) == TrainConfig(norm="torch_bn")
    model = build_model(config.resolved(130), 3072)
    assert {m.warmup_steps for m in model.modules() if isinstance(m, torch_bn.BatchRenorm1d)} == {13}


# ---- launches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--norm", "ghost"], "pass --virtual-batch-size V; none was given"),
    (["--norm", "ghost", "--virtual-batch-size", "1"], "at least 2 (one sample has no variance)"),
    (["--norm", "ghost", "--virtual-batch-size", "20"], "--virtual-batch-size 20 is larger than the batch of 10"),
    (["--norm", "ghost", "--virtual-batch-size", "3"], "batch 10 in chunks of 3 leaves a last chunk of one sample"),
    (["--norm", "torch_bn", "--virtual-batch-size", "5"], "a virtual batch size is ghost batch norm's"),
    (["--norm", "torch_bn", "--renorm-warmup", "5"], "a renormalization warm-up is batch renormalization's"),
    (["--norm", "renorm", "--renorm-warmup", "-1"], "renorm_warmup is a number of steps, zero or more, got -1"),
    (["--experiment", "batch-size"], "--experiment batch-size trains every normalization at batch sizes 5, 10 and "
                                     "50 with its own options, so --batch-size 10 would be ignored"),
    (["--norms", "torch_bn,none"], "--norms lists the normalizations of --compare"),
    (["--compare", "--norms", "torch_bn,torch_bn"], "--norms: expected distinct normalizations"),
    (["--compare", "--norms", "torch_bn,batch"], "--norms: expected distinct normalizations"),
    (["--compare", "--virtual-batch-size", "5"], "add ghost to --norms or drop --virtual-batch-size"),
    (["--compare", "--norms", "ghost,none"], "pass --virtual-batch-size V"),
    (["--norm", "layernorm", "--vectorized"], "--vectorized trains the runs of --experiment weight-scale"),
])
def test_bad_launch_of_the_new_norms_is_one_line_exit_2_and_leaves_nothing(flags, says, tiny_cifar, tmp_path,
                                                                           capsys):
    logdir = tmp_path / "runs"
    code = train.main(["--data-dir", tiny_cifar, "--logdir", str(logdir), "--run-name", "r", *QUICK, *flags])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and out == ""
    assert says in err
    assert not os.path.exists(logdir)


@pytest.mark.parametrize("flags, norm, options", [
    (["--norm", "renorm"], "renorm", {"renorm_warmup": 13, "virtual_batch_size": None}),
    (["--norm", "renorm", "--renorm-warmup", "4"], "renorm", {"renorm_warmup": 4}),
    (["--norm", "ghost", "--virtual-batch-size", "5"], "ghost", {"virtual_batch_size": 5, "renorm_warmup": None}),
    (["--norm", "layernorm"], "layernorm", {"virtual_batch_size": None, "renorm_warmup": None}),
])
def test_single_runs_of_the_new_norms(flags, norm, options, tiny_cifar, tmp_path):
    logdir = tmp_path / "runs"
    assert train.main(["--data-dir", tiny_cifar, "--logdir", str(logdir), "--run-name", "r", *QUICK, "--epochs", "1",
                       *flags]) == 0
    with open(logdir / "r" / "summary.json") as f:
        summary = json.load(f)
    assert summary["config"]["norm"] == norm
    assert {k: summary["config"][k] for k in options} == options
    assert len(summary["history"]["loss"]) == 13 and 0 <= summary["best_val_acc"] <= 1
    hparams = session_hparams(str(logdir / "r"))
    assert hparams["norm"] == norm and hparams["batch_size"] == 10
    assert hparams.get("virtual_batch_size") == options.get("virtual_batch_size")  # left out (blank) if unset
    card = events(str(logdir / "r")).Tensors("about/text_summary")[0].tensor_proto.string_val[0].decode()
    assert {"renorm": "first 13 steps" if "--renorm-warmup" not in flags else "first 4 steps",
            "ghost": "chunks of 5 samples", "layernorm": "nn.LayerNorm"}[norm] in card
    # The checkpoint holds the normalization's state (running statistics for the batch norms only).
    ckpt = torch.load(logdir / "r" / "checkpoint.pt", weights_only=True)
    assert any(k.endswith("running_mean") for k in ckpt["models"]["model"]) == (norm != "layernorm")


def test_compare_takes_any_normalizations(tiny_cifar, tmp_path):
    logdir = tmp_path / "runs"
    assert train.main(["--data-dir", tiny_cifar, "--logdir", str(logdir), "--run-name", "c", *QUICK, "--epochs", "1",
                       "--compare", "--norms", "layernorm,ghost,renorm", "--virtual-batch-size", "5",
                       "--renorm-warmup", "3"]) == 0
    configs = {}
    for norm in ("layernorm", "ghost", "renorm"):
        with open(logdir / "c" / norm / "summary.json") as f:
            configs[norm] = json.load(f)["config"]
    assert {n: (c["norm"], c["virtual_batch_size"], c["renorm_warmup"]) for n, c in configs.items()} == {
        "layernorm": ("layernorm", None, None), "ghost": ("ghost", 5, None), "renorm": ("renorm", None, 3)}
    assert os.path.isfile(logdir / "c" / "compare.png")
    # --resume of the comparison reads the runs back and accepts its own --norms again.
    assert train.main(["--resume", str(logdir / "c"), "--quiet", "--norms", "layernorm,ghost,renorm"]) == 0
    assert train.main(["--resume", str(logdir / "c"), "--quiet", "--norms", "layernorm"]) == 2


# ---- the experiment --------------------------------------------------------------------------------

RUNS = [f"bs{b}/{n}" for b in (5, 10, 50) for n in ("none", "torch_bn", "renorm", "layernorm")] + [
    "bs50/ghost5", "bs50/ghost10"]


@pytest.mark.slow
def test_batch_size_experiment_end_to_end(tiny_cifar, tmp_path):
    logdir = tmp_path / "runs"
    args = ["--experiment", "batch-size", "--data-dir", tiny_cifar, "--logdir", str(logdir), "--run-name", "bs",
            *TINY, "--num-train", "100", "--epochs", "1"]
    assert train.main(args) == 0
    root = logdir / "bs"
    expected = {"none": (None, None), "torch_bn": (None, None), "layernorm": (None, None)}
    for name in RUNS:
        with open(root / name / "summary.json") as f:
            s = json.load(f)
        c = s["config"]
        batch, method = int(name.split("/")[0][2:]), name.split("/")[1]
        norm, vbs, warmup = (("ghost", int(method[5:]), None) if method.startswith("ghost") else
                             ("renorm", None, 100 // batch) if method == "renorm" else (method, *expected[method]))
        assert (c["norm"], c["batch_size"], c["virtual_batch_size"], c["renorm_warmup"]) == (norm, batch, vbs, warmup)
        # The notebook's settings, whatever the batch size.
        assert (c["hidden_dims"], c["weight_scale"], c["optimizer"], c["lr"], c["epochs"]) == (
            [100] * 5, 2e-2, "adam", 10 ** -3.5, 1)
        assert s["num_train"] == 100 and len(s["history"]["loss"]) == 100 // batch
        hparams = session_hparams(str(root / name))
        assert (hparams["norm"], hparams["batch_size"], hparams.get("virtual_batch_size")) == (norm, batch, vbs)
    assert sorted(os.path.relpath(os.path.dirname(os.path.join(d, f)), root) for d, _, files in os.walk(root)
                  for f in files if f == "summary.json") == sorted(RUNS)  # no other runs
    for name in ("batch_size_train", "batch_size_val", "batch_size_summary"):
        assert os.path.getsize(root / f"{name}.png") > 10_000
    assert not [f for f in os.listdir(root) if f.startswith("events.")]  # no parent run: figures in the first run
    acc = events(str(root / RUNS[0]))
    card = acc.Tensors("experiment/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**Batch size**" in card and "/(none|torch_bn|renorm|layernorm|ghost)\\d*$" in card
    assert {"batch_size_train/batch05", "batch_size_val/batch50", "batch_size_summary/best_val_acc"} <= set(
        acc.Tags()["images"])
    # Resumed, the finished runs are read back, not trained again; the figures get new files.
    before = {n: os.path.getmtime(root / n / "summary.json") for n in RUNS}
    assert train.main(["--resume", str(root), "--quiet"]) == 0
    assert {n: os.path.getmtime(root / n / "summary.json") for n in RUNS} == before
    assert os.path.isfile(root / "batch_size_summary.1.png")


# ---- figures, table, reproduce section ---------------------------------------------------------------

def fake_summary(best_val, final_train, epochs=2):
    return {"best_val_acc": best_val, "final_train_acc": final_train, "wall_time_s": 1.0,
            "history": {"train_acc": [0.1] + [final_train] * epochs, "val_acc": [0.1] + [best_val] * epochs}}


def fake_seeds():
    """Two seeds of the experiment's results with known values: seed k's accuracy at batch b is
    b / 100 + k / 10 (+ 0.01 for torch_bn), so the mean and range over seeds are known."""
    seeds = []
    for k in (0, 1):
        r = {m: {b: fake_summary(b / 100 + k / 10 + (0.01 if m == "torch_bn" else 0), b / 100 + k / 10)
                 for b in (5, 10, 50)} for m in batch_sizes.NORMS}
        r.update({f"ghost{v}": {50: fake_summary(v / 100 + k / 10, 0.5)} for v in (5, 10)})
        seeds.append(r)
    return seeds


def test_summary_figure_shows_mean_and_range_over_seeds_in_each_norms_colour():
    figs = panels(batch_sizes.figures(fake_seeds())["batch_size_summary"])
    ax = figs["best_val_acc"].axes[0]
    lines = {c.get_label(): c for c in ax.containers}
    bn = lines["batch norm (torch_bn)"]
    assert bn.lines[0].get_xdata().tolist() == [5, 10, 50]
    assert bn.lines[0].get_ydata() == pytest.approx([0.11, 0.16, 0.56])  # means of b/100 + 0.01 + {0, 0.1}
    segments = bn.lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [pytest.approx((lo, lo + 0.1)) for lo in (0.06, 0.11, 0.51)]
    ghost = lines["ghost batch norm in batches of 50"]
    # The ghost line: virtual batch 5 and 10, then batch norm at 50 (a virtual batch of the whole batch).
    assert ghost.lines[0].get_xdata().tolist() == [5, 10, 50]
    assert ghost.lines[0].get_ydata() == pytest.approx([0.1, 0.15, 0.56])
    for label, c in lines.items():
        norm = {"no normalization": "none", "batch norm (torch_bn)": "torch_bn", "batch renorm (torch_bn)": "renorm",
                "nn.LayerNorm": "layernorm", "ghost batch norm in batches of 50": "ghost"}[label]
        assert matplotlib.colors.to_hex(c.lines[0].get_color()) == COLORS[norm]
    for fig in figs.values():
        matplotlib.pyplot.close(fig)


def test_curve_figures_one_panel_per_batch_size_with_the_mean_over_seeds():
    figs = panels(batch_sizes.figures(fake_seeds())["batch_size_val"])
    assert list(figs) == ["batch05", "batch10", "batch50"]
    lines = {l.get_label(): l for l in figs["batch50"].axes[0].get_lines()}
    assert set(lines) == {"no normalization", "batch norm (torch_bn)", "batch renorm (torch_bn)", "nn.LayerNorm",
                          "ghost batch norm, 5 of 50", "ghost batch norm, 10 of 50"}
    assert lines["batch norm (torch_bn)"].get_ydata() == pytest.approx([0.1, 0.56, 0.56])
    g5, g10 = lines["ghost batch norm, 5 of 50"], lines["ghost batch norm, 10 of 50"]
    assert matplotlib.colors.to_hex(g5.get_color()) == matplotlib.colors.to_hex(g10.get_color()) == COLORS["ghost"]
    assert g5.get_linestyle() != g10.get_linestyle()
    assert {l.get_label() for l in figs["batch05"].axes[0].get_lines()} == {
        "no normalization", "batch norm (torch_bn)", "batch renorm (torch_bn)", "nn.LayerNorm"}
    for fig in figs.values():
        matplotlib.pyplot.close(fig)


def test_table_gives_mean_and_range_over_seeds():
    rows = batch_sizes.table(fake_seeds())
    assert len(rows) == 2 + 4 * 3 + 2
    assert "| batch norm (torch_bn) | 10 | 0.150 (0.100-0.200) | 0.160 (0.110-0.210) | 1.0 |" in rows
    assert "| ghost batch norm, 5 of 50 | 50 | 0.500 (0.500-0.500) | 0.100 (0.050-0.150) | 1.0 |" in rows


@pytest.mark.slow
def test_reproduce_batch_size_alone_replaces_its_section(tiny_cifar, tmp_path):
    out, figures = tmp_path / "results.md", tmp_path / "figures"
    out.write_text("# Results\n\n## Deep network\n\nthe deep table\n\n## Batch size, before\n\nold numbers\n")
    assert reproduce.main(["--only", "batch-size", "--data-dir", tiny_cifar, "--no-verify", "--num-val", "20",
                           "--num-test", "20", "--quiet", "--batch-size-seeds", "1", "--batch-size-epochs", "1",
                           "--batch-size-num-train", "100", "--logdir", str(tmp_path / "runs"), "--out", str(out),
                           "--figures", str(figures)]) == 0
    text = out.read_text()
    assert text.startswith("# Results\n\n## Deep network\n\nthe deep table\n\n## Batch size (the notebook's")
    assert "old numbers" not in text and text.count("## Batch size") == 1
    assert "| batch norm (torch_bn) | 5 |" in text and "| ghost batch norm, 10 of 50 | 50 |" in text
    assert "Wall time of the whole experiment (14 runs" in text and "CPU time of the process" in text
    assert "--only batch-size --data-dir DIR --no-verify" in text and tiny_cifar not in text
    assert sorted(os.listdir(figures)) == ["batch_size_summary.png", "batch_size_train.png", "batch_size_val.png"]
    (run_root,) = os.listdir(tmp_path / "runs")
    assert {"bs5", "bs10", "bs50", "batch_size_summary.png"} <= set(os.listdir(tmp_path / "runs" / run_root /
                                                                               "batch-size" / "seed0"))
    # The figures over the seeds are in a run of their own, beside the seeds' (whose own figures are in their first run).
    seeds_run = events(str(tmp_path / "runs" / run_root / "batch-size" / "all-seeds"))
    assert "Over seeds 0-0" in seeds_run.Tensors("experiment/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "batch_size_summary/best_val_acc" in seeds_run.Tags()["images"]
