"""The Triton kernels match the reference ops: on CUDA when present, else in Triton's interpreter."""
import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import torch_bn
from torch_bn import function, ops

triton_kernels = pytest.importorskip("torch_bn.triton_kernels", reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def kernel_path(path: str):
    """Force the one-launch kernels ("small") or the chunked ones ("chunked", the large-tensor path)."""
    old = triton_kernels.SMALL_ELEMENTS
    triton_kernels.SMALL_ELEMENTS = old if path == "small" else 0
    try:
        yield
    finally:
        triton_kernels.SMALL_ELEMENTS = old


@pytest.fixture
def triton_everywhere(monkeypatch):
    """Route BatchNormFunction through the Triton kernels for CPU tensors too (interpreter)."""
    monkeypatch.setattr(function, "TRITON_ON_CPU", True)


def reference(x, w, b, dy, eps=1e-5):
    x64, dy64 = x.double(), dy.double()
    w64 = None if w is None else w.double()
    b64 = None if b is None else b.double()
    mean, var = ops.batch_stats(x64)
    rstd = torch.rsqrt(var + eps)
    y = ops.normalize(x64, mean, rstd, w64, b64)
    xhat = (x64 - ops.as_channel(mean, x64)) * ops.as_channel(rstd, x64)
    dx, dw, db = ops.closed_form_backward(dy64, xhat, rstd, w64)
    return y, mean, var, rstd, dx, dw, db


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 70),
    c=st.integers(1, 80),
    trailing=st.sampled_from([(), (1,), (3,), (2, 5)]),
    affine=st.sampled_from(["both", "weight", "none"]),
    path=st.sampled_from(["small", "chunked"]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_float64_reference(n, c, trailing, affine, path, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *trailing)
    x = (torch.randn(shape, generator=g) * 3 + 4).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    w = (torch.randn(c, generator=g) if affine != "none" else None)
    b = (torch.randn(c, generator=g) if affine == "both" else None)
    w = None if w is None else w.to(DEVICE)
    b = None if b is None else b.to(DEVICE)
    with kernel_path(path):
        y, mean, var = triton_kernels.triton_forward(x, w, b, 1e-5)
        dx, dw, db = triton_kernels.triton_backward(dy, x, mean, torch.rsqrt(var + 1e-5), w)
    ry, rmean, rvar, _, rdx, rdw, rdb = reference(x, w, b, dy)
    # float32 loses about eps * |x| / std in x - mean: scale the tolerance by that condition
    # number (large when, say, two samples of a channel nearly coincide).
    cond = 1 + (x.abs().amax() / rvar.sqrt().clamp_min(1e-3).min()).item()
    tol = max(1e-5, 1e-6 * cond * (n * int(torch.tensor(trailing).prod())) ** 0.5)
    for got, want in [(y, ry), (mean, rmean), (var, rvar), (dx, rdx), (dw, rdw), (db, rdb)]:
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(900, 40), (50, 20, 9)])
def test_many_partials_merged_in_tiles(monkeypatch, shape):
    """Many row chunks, merged four at a time with a ragged last tile and a short last chunk."""
    monkeypatch.setattr(triton_kernels, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(triton_kernels, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(triton_kernels, "CPU_PROGRAMS", 23)
    monkeypatch.setattr(triton_kernels, "PROGRAMS_PER_SM", 1)
    r, c, _, block_r, block_c, rows = triton_kernels._launch_config(torch.empty(shape, device=DEVICE))
    monkeypatch.setattr(triton_kernels, "COMBINE_TILE", 4 * block_c)
    p = -(-r // rows)
    assert p > 4 and p % 4 and triton_kernels._block_p(p, block_c) == 4 and r % rows
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * 2 + 100).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    w = torch.rand(shape[1], generator=g).to(DEVICE) + 0.5
    y, mean, var = triton_kernels.triton_forward(x, w, None, 1e-5)
    dx, dw, db = triton_kernels.triton_backward(dy, x, mean, torch.rsqrt(var + 1e-5), w)
    ry, rmean, rvar, _, rdx, rdw, rdb = reference(x, w, None, dy)
    for got, want in [(y, ry), (mean, rmean), (var, rvar), (dx, rdx), (dw, rdw), (db, rdb)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["small", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_half_precision(dtype, path):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(33, 6, 4, generator=g) * 2 + 8).to(DEVICE, dtype)
    dy = torch.randn(33, 6, 4, generator=g).to(DEVICE, dtype)
    w, b = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    with kernel_path(path):
        y, mean, var = triton_kernels.triton_forward(x, w, b, 1e-5)
        dx, dw, db = triton_kernels.triton_backward(dy, x, mean, torch.rsqrt(var + 1e-5), w)
    assert y.dtype == dtype and dx.dtype == dtype and mean.dtype == torch.float32
    ry, rmean, rvar, _, rdx, rdw, rdb = reference(x, w, b, dy)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ry, rtol=1e-2, atol=3e-2)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-2, atol=3e-2)
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("path", ["small", "chunked"])
@pytest.mark.parametrize("kind, shape", [(1, (2, 1)), (1, (19, 7)), (1, (6, 5, 3)), (2, (3, 4, 5, 3))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_modules_through_triton_match_nn(triton_everywhere, kind, shape, momentum, path, monkeypatch):
    if path == "chunked":
        monkeypatch.setattr(triton_kernels, "SMALL_ELEMENTS", 0)
    ours_cls, theirs_cls = {1: (torch_bn.BatchNorm1d, nn.BatchNorm1d), 2: (torch_bn.BatchNorm2d, nn.BatchNorm2d)}[kind]
    ours = ours_cls(shape[1], momentum=momentum, device=DEVICE)
    theirs = theirs_cls(shape[1], momentum=momentum, device=DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 2, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        if step == 2:
            ours.eval(), theirs.eval()
        x = (torch.randn(shape, generator=g) * 2 + 1).to(DEVICE)
        dy = torch.randn(shape, generator=g).to(DEVICE)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
        ga = torch.autograd.grad(ya, (xa, ours.weight, ours.bias), dy)
        gb = torch.autograd.grad(yb, (xb, theirs.weight, theirs.bias), dy)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for a, b in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_path_is_taken(triton_everywhere, monkeypatch):
    calls = []
    original = triton_kernels.triton_forward

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(torch.ops.torch_bn, "triton_forward", spy)
    torch_bn.BatchNorm1d(3, device=DEVICE)(torch.randn(4, 3, device=DEVICE))
    assert calls == [torch.Size([4, 3])]


def test_triton_can_be_switched_off(triton_everywhere, monkeypatch):
    # USE_TRITON = False (TORCH_BN_TRITON=0) sends the same tensors to the tensor-op paths instead.
    calls = []
    monkeypatch.setattr(torch.ops.torch_bn, "triton_forward", lambda *a: calls.append(a) or None)
    monkeypatch.setattr(function, "USE_TRITON", False)
    x = torch.randn(4, 3, device=DEVICE)
    y = torch_bn.BatchNorm1d(3, device=DEVICE)(x)
    assert calls == []
    torch.testing.assert_close(y, nn.BatchNorm1d(3, device=DEVICE)(x))


def test_triton_switch_reads_the_environment():
    import os
    import subprocess
    import sys

    code = "import torch_bn.function as f; print(f.USE_TRITON)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = [subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_BN_TRITON": v}, cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip() for v in ("0", "1")]
    assert outputs == ["False", "True"]


def test_compile_fullgraph_with_triton_custom_ops(triton_everywhere):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), torch_bn.BatchNorm1d(5), nn.ReLU()).to(DEVICE)
    eager = nn.Sequential(nn.Linear(6, 5), torch_bn.BatchNorm1d(5), nn.ReLU()).to(DEVICE)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 6, device=DEVICE)
    ya, yb = compiled(x), eager(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.sum().backward(), yb.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad, rtol=1e-5, atol=1e-5)


def test_kernels_compile_for_hopper_without_spills_and_with_vector_loads(tmp_path):
    """Compile every kernel for sm_90 with Triton's own ptxas (no GPU needed): catches what the
    interpreter cannot (compile errors, spills) and checks that x-sized data moves in 128-bit accesses."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"_stats_partial", "_stats_combine", "_normalize", "_backward_partial",
                                           "_backward_combine", "_backward_dx", "_small_forward", "_small_backward"}
    assert all(r["local"] == 0 for r in rows), [r for r in rows if r["local"]]
    data_kernels = [r for r in rows if r["kernel"] in ("_stats_partial", "_normalize", "_backward_partial",
                                                        "_backward_dx", "_small_forward", "_small_backward")]
    assert all(r["vector_loads"] == 1.0 for r in data_kernels), [r for r in data_kernels if r["vector_loads"] < 1]


def test_tuning_script_runs_every_setting(tmp_path):
    """bench/tune_triton.py is meant for the few minutes a GPU is lent: a smoke run on one tiny
    shape (in the interpreter without a GPU) proves it measures every knob setting and writes its JSON."""
    import json
    import os
    import subprocess
    import sys

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else os.environ
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, "-m", "bench.tune_triton", "--device", device, "--shapes", "64x8",
                           "--dtype", "float32", "--budget", "0.001", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["settings"]) == 11 and len(result["rows"]) == 1
    assert all(0 < r < float("inf") for r in result["rows"][0]["ratios"])
    assert "geometric mean" in proc.stdout
