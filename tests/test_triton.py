"""The Triton kernels match the reference ops: on CUDA when present, else in Triton's interpreter."""
import contextlib
import math

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st
from torch import nn

import torch_bn
from torch_bn import dispatch, ops

# Before anything that imports Triton: without it, the whole file skips with this reason.
triton = pytest.importorskip("triton", reason="Triton is not installed")
triton_kernels = pytest.importorskip("torch_bn.triton_kernels", reason="torch_bn's Triton kernels cannot be imported")
import triton.language as tl  # noqa: E402
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
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)


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
    cfg = triton_kernels._launch_config(torch.empty(shape, device=DEVICE))
    monkeypatch.setattr(triton_kernels, "COMBINE_TILE", 4 * cfg.block_c)
    p = -(-cfg.r // cfg.rows_per_prog)
    assert p > 4 and p % 4 and triton_kernels._block_p(p, cfg.block_c) == 4 and cfg.r % cfg.rows_per_prog
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
    monkeypatch.setattr(dispatch, "USE_TRITON", False)
    x = torch.randn(4, 3, device=DEVICE)
    y = torch_bn.BatchNorm1d(3, device=DEVICE)(x)
    assert calls == []
    torch.testing.assert_close(y, nn.BatchNorm1d(3, device=DEVICE)(x))


@pytest.mark.slow
def test_triton_switch_reads_the_environment():
    import os
    import subprocess
    import sys

    code = "import torch_bn.dispatch as d; print(d.USE_TRITON)"
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


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills_and_with_vector_loads(tmp_path):
    """Compile every kernel for sm_90 with Triton's own ptxas (no GPU needed), for the benchmark
    shapes and 4D, channels-last and odd-sized variants: catches what the interpreter cannot
    (compile errors, spills), checks that x-sized data moves in 128-bit accesses where the layout
    allows it, and that 2D and channels-last input index without integer division."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=400,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"_stats_partial", "_stats_combine", "_normalize", "_backward_partial",
                                           "_backward_combine", "_backward_dx", "_small_forward", "_small_backward"}
    assert {r["variant"] for r in rows} >= {"nchw L=56x56", "nchw L=14x14", "nchw L=7x7", "nhwc C=64", "nhwc C=3"}
    assert all(r["local"] == 0 for r in rows), [r for r in rows if r["local"]]
    data_kernels = ("_stats_partial", "_normalize", "_backward_partial", "_backward_dx", "_small_forward",
                    "_small_backward")
    # Channels innermost (2D, channels-last) with C % 16 == 0: every load is 128-bit, x's and the
    # per-channel vectors' alike.
    wide = [r for r in rows if r["kernel"] in data_kernels and r["l"] == 1 and r["c"] % 16 == 0]
    assert wide and all(r["vector_loads"] == 1.0 for r in wide), [r for r in wide if r["vector_loads"] < 1]
    # NCHW with L % 16 == 0: x is read in 128-bit loads (the statistics kernel loads nothing else).
    nchw = [r for r in rows if r["kernel"] == "_stats_partial" and r["variant"] == "nchw L=56x56"]
    assert nchw and all(r["vector_loads"] == 1.0 for r in nchw), nchw
    # NCHW with L = 14x14 (L % 4 == 0, not 16): the ROW_VEC hints give float32 x 128-bit loads and
    # stores (without them, none; the remaining scalar loads are the per-channel vectors).
    l196 = [r for r in rows if r["variant"] == "nchw L=14x14" and r["dtype"] == "fp32" and r["kernel"] in data_kernels]
    assert l196 and all(r["vector_loads"] >= 0.75 and r["vector_stores"] >= 0.75 for r in l196), l196
    # L == 1 is a compile-time constant: no division or remainder by L.
    flat = [r for r in rows if r["l"] == 1]
    assert all(r["int_div"] == 0 for r in flat), [r for r in flat if r["int_div"]]


@pytest.mark.slow
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


# --- issue 9: inputs the kernels must get right ---------------------------------------------------

from bench import cuda_correctness as cc  # noqa: E402

RANDOM_ERRORS: dict[str, float] = {}  # largest error against float64 per dtype, over the randomized cases
RANDOM_CASES = [0]


@pytest.fixture(scope="module")
def random_report():
    yield
    if RANDOM_CASES[0]:
        print(f"\nrandomized kernel cases: {RANDOM_CASES[0]}; largest error against float64 F.batch_norm "
              f"(max |got - want| / max |want|): " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(RANDOM_ERRORS.items())))


# No shrinking: each example is slow (interpreter, or a compile on CUDA); a failing case is printed as drawn.
@settings(max_examples=50 if DEVICE == "cpu" else 15,  # on CUDA each new shape compiles
          deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(
    n=st.integers(1, 9),
    c=st.integers(1, 40),
    trailing=st.sampled_from([(), (1,), (3,), (2, 3), (4, 4)]),
    dtype=st.sampled_from(list(cc.DTYPES)),
    layout=st.sampled_from(cc.LAYOUTS),
    weight=st.sampled_from(cc.PARAMS),
    bias=st.sampled_from(cc.PARAMS),
    grad=st.sampled_from(cc.GRADS),
    path=st.sampled_from(cc.PATHS),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_float64_batch_norm_on_any_input(random_report, n, c, trailing, dtype, layout, weight, bias,
                                                       grad, path, seed):
    """y, batch mean and variance, dx, dweight, dbias against float64 F.batch_norm + autograd, over
    shapes, dtypes, memory layouts, strided and expanded weights, biases and gradients, and both
    kernel paths (bench/cuda_correctness.py's cases, drawn at random)."""
    if n * math.prod(trailing) < 2:
        n = 2  # one value per channel is not a batch (F.batch_norm refuses it)
    case = cc.Case((n, c, *trailing), dtype, layout, weight, bias, grad, path, seed)
    result = cc.run_case(case, DEVICE, triton_kernels)
    RANDOM_CASES[0] += 1
    RANDOM_ERRORS[dtype] = max([RANDOM_ERRORS.get(dtype, 0.0), *result["errors"].values()])
    assert result["ok"], (case.label(), result["problems"])


def test_float64_is_refused():
    """The kernels compute in float32: float64 must not reach them (supports says no, the ops raise)."""
    assert cc.float64_refused(DEVICE, triton_kernels) == []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert triton_kernels.supports(torch.ones(2, 3, dtype=dtype, device=DEVICE))
    assert not triton_kernels.supports(torch.ones(2, 3, dtype=torch.int64, device=DEVICE))
    assert not triton_kernels.supports(torch.ones(0, 3, device=DEVICE))
    assert not triton_kernels.supports(torch.ones(3, device=DEVICE))
    x64 = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        triton_kernels.triton_backward(x64, x64, torch.zeros(3), torch.ones(3), None)


@pytest.mark.parametrize("path", ["small", "chunked"])
def test_strided_and_expanded_weight_and_bias(path):
    """w[::2] and an expanded scalar are read with their strides (they are made contiguous)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(20, 6, 3, generator=g) + 2).to(DEVICE)
    dy = torch.randn(20, 6, 3, generator=g).to(DEVICE)
    w = torch.randn(12, generator=g).to(DEVICE)[::2]
    b = torch.full((1,), 2.0, device=DEVICE).expand(6)
    with kernel_path(path):
        y, mean, var = triton_kernels.triton_forward(x, w, b, 1e-5)
        dx, dw, db = triton_kernels.triton_backward(dy, x, mean, torch.rsqrt(var + 1e-5), w)
    ry, rmean, rvar, _, rdx, rdw, rdb = reference(x, w, b, dy)
    for got, want in [(y, ry), (dx, rdx), (dw, rdw), (db, rdb)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@triton.jit
def _offsets_probe(ROWS, COLS, OUT, C, L, INT64: tl.constexpr):
    # The kernels' element offsets for 4 rows x 4 channels, as int64.
    rows = tl.load(ROWS + tl.arange(0, 4))
    cols = tl.load(COLS + tl.arange(0, 4))
    off, _ = triton_kernels._tile(rows, rows >= 0, cols, cols >= 0, C, L, INT64, 1)
    tl.store(OUT + tl.arange(0, 4)[:, None] * 4 + tl.arange(0, 4)[None, :], off.to(tl.int64))


@pytest.mark.skipif(DEVICE != "cpu", reason="the probe runs in the interpreter")
@pytest.mark.parametrize("shape", [(65536, 32769), (256, 64, 512, 512), (2, 2**30 + 3)])
def test_offsets_past_int32_are_int64(shape):
    """Tensors of more than 2^31 elements get int64 offsets: the offsets of the last rows and
    channels, computed by the kernels' own code in the interpreter, match exact integers (no
    tensor of that size is allocated)."""
    cfg = triton_kernels._launch_config(torch.empty(shape, device="meta"))
    assert cfg.int64
    r, c, l_ = cfg.r, cfg.c, cfg.l
    rows = torch.tensor([0, r // 2, r - 2, r - 1], dtype=torch.int32)
    cols = torch.tensor([0, 1, c - 2, c - 1], dtype=torch.int32)
    want = torch.tensor([[(ri // l_ * c + ci) * l_ + ri % l_ for ci in cols.tolist()] for ri in rows.tolist()])
    assert want.max() == torch.Size(shape).numel() - 1
    out = torch.empty(4, 4, dtype=torch.int64)
    _offsets_probe[(1,)](rows, cols, out, c, l_, INT64=True)
    assert torch.equal(out, want)
    _offsets_probe[(1,)](rows, cols, out, c, l_, INT64=False)  # the probe does see the int32 wrap
    assert not torch.equal(out, want)
    assert not triton_kernels._launch_config(torch.empty(4096, 4096, device="meta")).int64


@pytest.mark.parametrize("path", ["small", "chunked"])
def test_launches_run_on_the_tensors_device(path, monkeypatch):
    """Every launch happens inside the device guard for x's device (Triton launches on the
    current CUDA device); on CUDA the guard is torch.cuda.device(x.device)."""
    guard = triton_kernels._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    current, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        current.append(device)
        yield
        current.pop()

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else "?", list(current)))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_kernels, "_device_guard", recording_guard)
    for name in ("_small_forward", "_small_backward", "_stats_partial", "_stats_combine", "_normalize",
                 "_backward_partial", "_backward_combine", "_backward_dx"):
        monkeypatch.setattr(triton_kernels, name, Spy(getattr(triton_kernels, name)))
    x = torch.randn(8, 3, device=DEVICE)
    with kernel_path(path):
        y, mean, var = triton_kernels.triton_forward(x, None, None, 1e-5)
        triton_kernels.triton_backward(torch.ones_like(x), x, mean, torch.rsqrt(var + 1e-5), None)
    assert len(launches) == (2 if path == "small" else 6)
    assert all(devices == [x.device] for _, devices in launches), launches


LAYOUT_INPUTS = {
    "channels_last": lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    "transposed_3d": lambda: torch.randn(4, 5, 3).transpose(1, 2),
    "transposed_2d": lambda: torch.randn(3, 6).t(),
    "sliced": lambda: torch.randn(6, 3, 4)[::2],
}


@pytest.mark.parametrize("path", ["small", "chunked"])
@pytest.mark.parametrize("layout", list(LAYOUT_INPUTS))
def test_fake_impls_match_the_real_ops(layout, path):
    """torch.library.opcheck (schema, fake tensor strides, AOT dispatch) on in-place and copied layouts."""
    x = LAYOUT_INPUTS[layout]().to(DEVICE) * 2 + 1
    w, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    with kernel_path(path):
        y, mean, var = triton_kernels.triton_forward(x, w, b, 1e-5)
        torch.library.opcheck(torch.ops.torch_bn.triton_forward.default, (x, w, b, 1e-5))
        torch.library.opcheck(torch.ops.torch_bn.triton_backward.default,
                              (torch.randn_like(x), x, mean, torch.rsqrt(var + 1e-5), w))


@pytest.mark.parametrize("path", ["small", "chunked"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed_3d", "transposed_2d"])
def test_channel_inner_and_transposed_inputs_are_read_in_place(layout, path, monkeypatch):
    """channels-last and transposed inputs go to the kernels as they are (no copy of x or dy), and
    y and dx come back in x's memory layout, as nn.BatchNorm2d's do."""
    x = LAYOUT_INPUTS[layout]().to(DEVICE) * 2 + 1
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    assert triton_kernels._kernel_input(x) is x
    copies = []
    original = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **k: copies.append(self.shape) or original(self, *a, **k))
    with kernel_path(path):
        y, mean, var = triton_kernels.triton_forward(x, None, None, 1e-5)
        dx, dw, db = triton_kernels.triton_backward(dy, x, mean, torch.rsqrt(var + 1e-5), None)
    assert [s for s in copies if s == x.shape] == []
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    ry, _, _, _, rdx, _, _ = reference(x, None, None, dy)
    torch.testing.assert_close(y.double(), ry, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-4, atol=1e-4)


def test_channels_last_module_output_stays_channels_last(triton_everywhere):
    x = torch.randn(4, 3, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch_bn.BatchNorm2d(3, device=DEVICE)(x)
    y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_grid_axes_within_cuda_limits():
    """Channel blocks go on grid axis 0 (2^31 - 1 programs); axes 1 and 2 stay within 65535."""
    for shape in [(257, 4194305), (4, 2**31 // 64), (2**26, 8), (16384, 16384)]:
        cfg = triton_kernels._launch_config(torch.empty(shape, device="meta"), sm_count=132)
        assert cfg.grid[0] <= 2**31 - 1 and all(g <= 65535 for g in cfg.grid[1:]), (shape, cfg)
        assert cfg.grid[0] * cfg.block_c >= shape[1]
        if not cfg.small:
            assert cfg.grid[1] * cfg.rows_per_prog >= cfg.r


@pytest.mark.parametrize("failure", ["missing", "raises"])
def test_import_fails_with_importerror_when_custom_ops_cannot_register(failure, monkeypatch):
    """A torch without torch.library.custom_op, or one whose registration raises, makes the
    import raise ImportError (which callers catch to fall back), not AttributeError/ValueError."""
    import importlib.util

    if failure == "missing":
        monkeypatch.delattr(torch.library, "custom_op")
    else:
        def broken(*args, **kwargs):
            raise ValueError("schema inference rejected the annotations")
        monkeypatch.setattr(torch.library, "custom_op", broken)
    import sys

    spec = importlib.util.spec_from_file_location("torch_bn._triton_kernels_probe", triton_kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import would (dataclasses look it up)
    with pytest.raises(ImportError, match="custom_op" if failure == "missing" else "schema inference"):
        spec.loader.exec_module(module)


@pytest.mark.slow
def test_correctness_script_runs_in_the_interpreter():
    """bench/cuda_correctness.py (device_check.sh's first step, torch and Triton only) on its tiny
    CPU case list, so that it cannot rot between GPU runs."""
    if DEVICE == "cuda":
        pytest.skip("device_check.sh runs the full script on CUDA")
    assert cc.main(["--device", "cpu", "--quick"]) == 0
