"""bench/bn.py's per-call mode at the MLP's sizes: what it times, and the switch left as found."""
import torch

import torch_bn
from bench import bn


def test_mlp_rows_time_native_torch_bn_and_the_python_path(monkeypatch):
    """Three implementations per shape, the third with the compiled op switched off while it runs."""
    seen = []

    def runner(m, x, dy=None):
        return lambda: seen.append((type(m).__module__.split(".")[0], torch_bn.cpp.ENABLED))

    monkeypatch.setattr(bn, "forward_only", runner)
    monkeypatch.setattr(bn, "forward_backward", runner)
    monkeypatch.setattr(torch_bn.cpp, "ENABLED", True)
    row = bn.bench_mlp_shape((50, 100), lambda fns: {k: fn() or 1e-6 for k, fn in fns.items()})
    assert seen == [("torch", True), ("torch_bn", True), ("torch_bn", False)] * 2
    assert torch_bn.cpp.ENABLED is True
    assert row["path"] == torch_bn.dispatch.choose_path(torch.empty(50, 100))
    assert {f"{k}_{kind}_s" for k in ("native", "torch_bn", "python") for kind in ("fwd", "fwdbwd")} <= set(row)
    assert {(50, 100), (50, 50)} <= set(bn.MLP_SHAPES)


def test_mlp_repeats_take_the_median_time_and_the_median_ratio():
    """--repeats: per shape the median of each time over the repeats, and of each ratio to native
    taken within a repeat (not the ratio of the medians)."""
    def row(native, ours):
        return {"shape": [50, 100], "native_fwd_s": native, "torch_bn_fwd_s": ours}
    repeats = [[row(1.0, 2.0)], [row(2.0, 2.0)], [row(4.0, 2.0)]]
    (r,) = bn.median_rows(repeats)
    assert r["native_fwd_s"] == 2.0 and r["torch_bn_fwd_s"] == 2.0 and r["repeats"] == 3
    assert r["torch_bn_fwd_ratio"] == 1.0 and r["native_fwd_ratio"] == 1.0
    (r,) = bn.median_rows([[row(1.0, 1.5)], [row(10.0, 11.0)], [row(2.0, 4.0)]])
    assert r["torch_bn_fwd_ratio"] == 1.5  # ratios 1.5, 1.1, 2.0; the ratio of medians would be 2.0


def test_table_cases_layouts_threads_and_columns():
    """4D shapes in both layouts, 2D contiguous only; --threads takes a list; each row names its
    layout and thread count, and the markdown table shows them with the % of bound."""
    assert bn.cases([(50, 100), (2, 3, 4, 4)], ["contiguous", "channels_last"]) == [
        ((50, 100), False), ((2, 3, 4, 4), False), ((2, 3, 4, 4), True)]
    assert bn.parse_threads("1,2") == [1, 2] and bn.parse_threads(None) == [None]
    assert {(32, 64, 32, 32), (128, 256, 8, 8)} <= set(bn.SHAPES_4D)
    fake = lambda fns: {k: (fn(), 1e-3)[1] for k, fn in fns.items()}  # noqa: E731  (runs each once)
    row = bn.bench_shape((4, 3, 2, 2), torch.float16, "cpu", fake, 1e9, channels_last=True, staged=False)
    assert row["channels_last"] and row["threads"] == torch.get_num_threads() and row["dtype"] == "float16"
    table = bn.markdown_table([row])
    assert "| 4x3x2x2 | float16 | channels_last |" in table and "% of bound" in table


def test_train_time_runs_both_orders_and_reports_the_median(tmp_path, capsys):
    """bench.train_time on a tiny CIFAR-10 folder: one compare per order for seed 0, each ratio
    from the wall times the runs wrote, and their median; nothing left behind in the logs."""
    from bench import train_time
    from helpers import write_tiny_cifar10

    data = write_tiny_cifar10(str(tmp_path / "cifar"))
    train_time.main(["--data-dir", data, "--no-verify", "--seeds", "1", "--num-train", "100", "--epochs", "1",
                     "--", "--num-val", "20", "--num-test", "20", "--hidden-dims", "8,8"])
    out = capsys.readouterr().out.splitlines()
    runs = [line for line in out if line.startswith("seed 0, --norms ")]
    assert [r.split(":")[0] for r in runs] == ["seed 0, --norms torch_bn,nn", "seed 0, --norms nn,torch_bn"]
    ratios = [float(r.rsplit("ratio ", 1)[1]) for r in runs]
    assert all(r > 0 for r in ratios)
    assert out[-1].startswith("torch_bn / nn.BatchNorm1d training time over 2 runs: median ")
    median = float(out[-1].split("median ", 1)[1].split(" ", 1)[0])
    assert abs(median - (ratios[0] + ratios[1]) / 2) <= 1e-3  # the printed ratios are rounded


def test_train_time_steps_times_both_models_in_one_process(capsys):
    from bench import train_time

    train_time.main(["--steps", "--samples", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("torch_bn: ") and out[1].startswith("nn: ")
    assert out[-1].startswith("torch_bn / nn.BatchNorm1d per training step (1 thread(s), 3 samples of 5 steps): CPU ")


def test_accuracy_prints_every_shape_and_path(monkeypatch, capsys):
    """bench.accuracy: one line per shape and thread count, torch_bn (the compiled op or not), its
    tensor-op path and nn, each against float64 of the same input; torch_bn's own path stays at
    float32 rounding of y (the figure the issue asks for, measured on a small shape here)."""
    from bench import accuracy

    monkeypatch.setattr(accuracy, "SHAPES", [(64, 4), (8, 3)])
    accuracy.main(["--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("torch_bn reference" in line and " nn " in line for line in lines[1:])
    row = accuracy.errors((64, 4))
    assert set(row) == {"torch_bn", "torch_bn reference", "nn"}
    if torch_bn.cpp.op() is not None:  # the compiled op's centred statistics; the tensor-op paths lose more
        assert row["torch_bn"] <= 1e-5
