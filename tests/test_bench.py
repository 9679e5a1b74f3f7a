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
