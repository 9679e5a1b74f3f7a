"""The Triton kernels against float64 F.batch_norm on CUDA, needing nothing but torch and Triton.

    python -m bench.cuda_correctness                                   # on CUDA
    TRITON_INTERPRET=1 python -m bench.cuda_correctness --device cpu --quick

Each case runs torch.ops.torch_bn.triton_forward and triton_backward on one input and compares
y, the batch mean and variance, dx, dweight and dbias with F.batch_norm and autograd in float64
on the same values. Cases cover float32, float16 and bfloat16, 2D, 3D and 4D shapes, memory
layouts (contiguous, channels-last, transposed, sliced), contiguous, strided and expanded
weights, biases and upstream gradients, with and without them, and both kernel paths (one
launch, chunked). float64 must be refused (supports() False, the op raises TypeError). Prints a
table and exits 1 if any case fails. No numpy, pytest or hypothesis: this is the first step of
bench/device_check.sh, meant to run on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")
PARAMS = ("none", "contiguous", "strided", "expanded")
GRADS = ("like_x", "contiguous", "strided", "expanded")
PATHS = ("small", "chunked")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Half an ulp of the output dtype, relative, doubled: y and dx are computed in float32 and rounded once.
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "contiguous"  # of x; see make_input
    weight: str = "contiguous"  # of the affine weight; see make_param
    bias: str = "contiguous"
    grad: str = "like_x"  # of the upstream gradient dy; see make_grad
    path: str = "small"  # "small" (one-launch kernels where the shape allows) or "chunked" (forced)
    seed: int = 0

    def label(self) -> str:
        return (f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout} w:{self.weight} b:{self.bias} "
                f"dy:{self.grad} {self.path}")


def make_input(shape: tuple[int, ...], layout: str, g: torch.Generator, device: str, dtype: torch.dtype) -> Tensor:
    """Random values with per-channel offsets (so that the mean matters) in the requested layout:
    channels_last: the channel dimension innermost (channels-last 4D, or an (N, *, C) tensor moved);
    transposed: every dimension reversed (a transposed matrix for 2D); sliced: every other sample
    of a batch twice the size (not dense: the kernels copy it)."""
    views = {
        "contiguous": (shape, lambda t: t),
        "channels_last": (shape[:1] + shape[2:] + shape[1:2], lambda t: t.movedim(-1, 1)),
        "transposed": (shape[::-1], lambda t: t.permute(*reversed(range(len(shape))))),
        "sliced": ((2 * shape[0],) + shape[1:], lambda t: t[::2]),
    }
    base_shape, view = views[layout]
    x = view(torch.randn(base_shape, generator=g).to(device, dtype))
    offset = torch.linspace(-4, 6, shape[1], device=device, dtype=dtype).reshape(1, -1, *[1] * (len(shape) - 2))
    return x.mul_(3).add_(offset)  # in place: x keeps its strides


def make_param(c: int, kind: str, g: torch.Generator, center: float, device: str) -> Tensor | None:
    """A (C,) float32 weight or bias: none, contiguous, strided (every other entry of 2C), or
    expanded from one value (stride 0)."""
    if kind == "none":
        return None
    if kind == "expanded":
        return torch.full((1,), center + 0.25, device=device).expand(c)
    base = (torch.randn(2 * c, generator=g) * 0.5 + center).to(device)
    return base[:c] if kind == "contiguous" else base[::2]


def make_grad(x: Tensor, kind: str, g: torch.Generator) -> Tensor:
    """dy: like_x (x's strides), contiguous, strided (every other element of the last dimension
    of a tensor twice as long), expanded (one value per channel, stride 0 elsewhere)."""
    shape = tuple(x.shape)
    if kind == "like_x":
        return torch.empty_like(x).copy_(torch.randn(shape, generator=g))
    if kind == "contiguous":
        return torch.randn(shape, generator=g).to(x.device, x.dtype)
    if kind == "strided":
        return torch.randn(shape[:-1] + (2 * shape[-1],), generator=g).to(x.device, x.dtype)[..., ::2]
    if kind == "expanded":
        per_channel = torch.randn(shape[1], generator=g).to(x.device, x.dtype)
        return per_channel.reshape(1, -1, *[1] * (len(shape) - 2)).expand(shape)
    raise ValueError(kind)


def reference(x: Tensor, w: Tensor | None, b: Tensor | None, dy: Tensor) -> dict[str, Tensor]:
    """F.batch_norm and autograd in float64 on the same values (weight 1 and bias 0 when absent:
    the same y and dx, and dweight, dbias are still the sums the kernels return)."""
    c = x.shape[1]
    x64 = x.detach().double().requires_grad_()
    w64 = (torch.ones(c, dtype=torch.float64) if w is None else w.double()).to(x.device).requires_grad_()
    b64 = (torch.zeros(c, dtype=torch.float64) if b is None else b.double()).to(x.device).requires_grad_()
    y = F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
    dx, dw, db = torch.autograd.grad(y, (x64, w64, b64), dy.double())
    dims = [0] + list(range(2, x.dim()))
    return {"y": y.detach(), "mean": x64.detach().mean(dims), "var": x64.detach().var(dims, unbiased=False),
            "dx": dx, "dweight": dw, "dbias": db}


def run_case(case: Case, device: str, kernels=None) -> dict:
    """Runs one case; returns {"errors": {quantity: max |got - want| / max(max |want|, its natural
    size)}, "ok": bool,
    "problems": [...]}. Tolerances: float32 arithmetic scaled by the conditioning of x - mean and by
    sqrt(rows); for half dtypes, plus one rounding of y and dx to the output dtype."""
    if kernels is None:
        from torch_bn import triton_kernels as kernels
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(case.seed)
    x = make_input(case.shape, case.layout, g, device, dtype)
    w = make_param(case.shape[1], case.weight, g, 1.0, device)
    b = make_param(case.shape[1], case.bias, g, 0.0, device)
    dy = make_grad(x, case.grad, g)
    old = kernels.SMALL_ELEMENTS
    kernels.SMALL_ELEMENTS = old if case.path == "small" else 0
    try:
        y, mean, var = kernels.triton_forward(x, w, b, EPS)
        dx, dw, db = kernels.triton_backward(dy, x, mean, torch.rsqrt(var + EPS), w)
    finally:
        kernels.SMALL_ELEMENTS = old
    want = reference(x, w, b, dy)
    got = {"y": y, "mean": mean, "var": var, "dx": dx, "dweight": dw, "dbias": db}
    rows = x.numel() // x.shape[1]
    std = want["var"].sqrt().clamp_min(1e-3)
    cond = 1 + (x.double().abs().amax() / std.min()).item()
    f32 = max(1e-5, 2e-6 * cond * math.sqrt(rows))
    # Each quantity's natural size, a floor under max |want| where the true value is near 0
    # (e.g. dx and dweight for a gradient constant per channel).
    dy_max = dy.double().abs().amax().item()
    w_max = 1.0 if w is None else w.abs().amax().item()
    natural = {"y": 1.0, "mean": x.double().abs().amax().item(), "var": 0.0, "dweight": rows * dy_max,
               "dbias": rows * dy_max, "dx": w_max * dy_max / std.min().item()}
    problems, errors = [], {}
    for k, v in got.items():
        ref = want[k]
        scale = max(ref.abs().amax().item(), natural[k])
        err = (v.double() - ref).abs()
        errors[k] = err.amax().item() / max(scale, 1e-30)
        tol = f32 + (OUTPUT_ROUNDING[dtype] if k in ("y", "dx") else 0.0)
        bad = err > tol * (ref.abs() + scale)
        if bool(bad.any()) or not bool(torch.isfinite(v).all()):
            problems.append(f"{k}: max error {err.amax().item():.3g} (tolerance {tol:.2g} x (|want| + {scale:.3g}))")
    expect_dtype = {"y": dtype, "dx": dtype, "mean": torch.float32, "var": torch.float32,
                    "dweight": torch.float32, "dbias": torch.float32}
    problems += [f"{k} dtype {got[k].dtype}" for k in got if got[k].dtype != expect_dtype[k]]
    # y and dx come back in x's layout where the kernels read x in place (contiguous,
    # channels-last, a transposed matrix), else contiguous, as x's copy is (or in x's layout
    # when size-1 dimensions make it one the kernels read in place).
    in_place = case.layout in ("contiguous", "channels_last") or (case.layout == "transposed" and x.dim() == 2)
    allowed = [x.stride()] if in_place else [x.stride(), torch.empty(x.shape).stride()]
    problems += [f"{k} strides {got[k].stride()}, expected one of {allowed}" for k in ("y", "dx")
                 if not any(same_strides(got[k], s) for s in allowed)]
    return {"errors": errors, "ok": not problems, "problems": problems}


def same_strides(t: Tensor, strides: tuple[int, ...]) -> bool:
    """t has these strides in every dimension of size > 1 (the others' strides do not matter)."""
    return all(a == b for n, a, b in zip(t.shape, t.stride(), strides) if n > 1)


def float64_refused(device: str, kernels=None) -> list[str]:
    """float64 must not reach the float32 kernels: supports() says False and the op raises."""
    if kernels is None:
        from torch_bn import triton_kernels as kernels
    x = torch.randn(8, 3, dtype=torch.float64, device=device)
    problems = []
    if kernels.supports(x):
        problems.append("supports(float64 input) is True")
    if not kernels.supports(x.float()):
        problems.append("supports(float32 input) is False")
    try:
        kernels.triton_forward(x, None, None, EPS)
        problems.append("triton_forward accepted float64 input")
    except TypeError:
        pass
    return problems


def cases(quick: bool) -> list[Case]:
    """Every shape x dtype x layout, the kernel path and the weight, bias and gradient kinds varied
    along (each case with its own seed), then a few large chunked cases on CUDA. Every distinct
    specialization compiles once, so the list is kept short for a cold cache. quick: tiny shapes
    and a third of the cases, for the interpreter."""
    shapes = ([(6, 5), (4, 3, 5), (3, 6, 2, 3)] if quick else [(64, 33), (8, 7, 49), (4, 16, 14, 14), (1030, 129)])
    out = []
    for i, (shape, dtype, layout) in enumerate(itertools.product(shapes, DTYPES, LAYOUTS)):
        if quick and i % 3 == 2:
            continue
        out.append(Case(shape, dtype, layout, PARAMS[i % 4], PARAMS[(i // 4) % 4], GRADS[(i // 2) % 4],
                        PATHS[(i // 3) % 2], seed=i))
    if not quick:  # several row chunks per program and many programs
        out += [Case((16, 64, 56, 56), "float32", "channels_last", path="chunked"),
                Case((16, 64, 56, 56), "bfloat16", "contiguous", "strided", "expanded", "contiguous", "chunked"),
                Case((65536, 96), "float32", "contiguous", "contiguous", "none", path="chunked"),
                Case((257, 70000), "float16", "contiguous", path="chunked")]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a third of the cases (for the interpreter)")
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1 (Triton's interpreter)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    from torch_bn import triton_kernels as kernels

    start = time.perf_counter()
    failures = 0
    worst: dict[str, float] = {}
    all_cases = cases(args.quick)
    print(f"{'case':<72} {'max error / max |want|':>22}  result")
    for case in all_cases:
        try:
            result = run_case(case, args.device, kernels)
        except Exception as e:  # a crash is a failure of this case, not of the whole run
            result = {"errors": {}, "ok": False, "problems": [f"{type(e).__name__}: {e}"]}
        worst[case.dtype] = max([worst.get(case.dtype, 0.0), *result["errors"].values()])
        failures += not result["ok"]
        err = max(result["errors"].values(), default=float("nan"))
        print(f"{case.label():<72} {err:>22.2e}  {'ok' if result['ok'] else 'FAIL: ' + '; '.join(result['problems'])}",
              flush=True)
    problems = float64_refused(args.device, kernels)
    failures += bool(problems)
    print(f"float64 refused: {'ok' if not problems else 'FAIL: ' + '; '.join(problems)}")
    print(f"{len(all_cases)} cases in {time.perf_counter() - start:.1f} s on "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (interpreter)'}; largest error against "
          f"float64 (max |got - want| / max |want|, see run_case): " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    print("FAILED" if failures else "all passed", f"({failures} failing)" if failures else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
