"""Tune the Triton kernels' launch knobs on this GPU (a benchmark, not a test).

For each shape, times forward+backward (training mode) of torch_bn.BatchNorm1d under each
setting of the knobs in torch_bn.triton_kernels, next to nn.BatchNorm1d on the same inputs, and
prints the ratios torch_bn / native (lower is better), the best setting per shape, and each
setting's geometric mean over all shapes. Settings: PROGRAMS_PER_SM x TILE_ELEMENTS (the chunked
kernels of large inputs), then SMALL_ELEMENTS (which inputs take the one-launch kernels) with
the others at their defaults. Stops early, reporting what it has, after --max-seconds.

    python -m bench.tune_triton --json tune.json          # on CUDA
    TRITON_INTERPRET=1 python -m bench.tune_triton --device cpu --shapes 64x8,512x32 --budget 0.05
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch

from bench.bn import forward_backward, implementations, timer
from torch_bn import dispatch

CHUNKED = {"PROGRAMS_PER_SM": [2, 4, 8], "TILE_ELEMENTS": [2048, 4096, 8192]}
SMALL = {"SMALL_ELEMENTS": [4096, 16384]}
# The shapes the CUDA targets are about (>= 64 MiB float32, >= 32 MiB bfloat16), two that take
# the one-launch kernels, and one in between.
SHAPES = [(100, 500), (256, 1024), (8192, 512), (4096, 4096), (256, 65536), (65536, 1024), (1048576, 64)]


def settings() -> list[dict]:
    """Every knob setting to try: the chunked grid, then each SMALL value on its own."""
    grid = [dict(zip(CHUNKED, values)) for values in itertools.product(*CHUNKED.values())]
    return grid + [{k: v} for k, values in SMALL.items() for v in values]


def apply(setting: dict, kernels, defaults: dict) -> None:
    for name, value in {**defaults, **setting}.items():
        setattr(kernels, name, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), action="append", help="repeatable; default both")
    p.add_argument("--shapes", help="e.g. 4096x4096,256x65536 (default: the target shapes)")
    p.add_argument("--budget", type=float, default=0.1, help="seconds of repeats per measurement")
    p.add_argument("--max-seconds", type=float, default=180.0, help="stop and report after this long")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    if args.device != "cuda":  # the kernels in Triton's interpreter (TRITON_INTERPRET=1): a smoke run
        dispatch.TRITON_ON_CPU = True
    try:
        from torch_bn import triton_kernels as kernels
    except ImportError as e:
        raise SystemExit(f"the Triton kernels cannot be imported ({e}): nothing to tune") from None
    shapes = ([tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    tries = settings()
    defaults = {k: getattr(kernels, k) for k in {**CHUNKED, **SMALL}}
    default_index = tries.index({k: defaults[k] for k in CHUNKED})
    measure = timer(args.device, args.budget)
    start, rows = time.perf_counter(), []
    for dtype, shape in itertools.product(dtypes, shapes):
        if time.perf_counter() - start > args.max_seconds:
            print(f"stopped after {args.max_seconds:.0f} s (--max-seconds): later shapes not measured")
            break
        x = torch.randn(shape, device=args.device, dtype=dtype).requires_grad_()
        dy = torch.randn(shape, device=args.device, dtype=dtype)
        m = implementations(shape, args.device)
        row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "ratios": []}
        for setting in tries:
            apply(setting, kernels, defaults)
            times = measure({k: forward_backward(m[k], x, dy) for k in ("native", "torch_bn")})
            row["ratios"].append(times["torch_bn"] / times["native"])
        apply({}, kernels, defaults)
        rows.append(row)
        best = min(range(len(tries)), key=row["ratios"].__getitem__)
        print(f"{'x'.join(map(str, shape)):>12} {row['dtype']:>8}  default {row['ratios'][default_index]:.2f}"
              f"  best {row['ratios'][best]:.2f} with {tries[best]}", flush=True)
    if not rows:
        return
    geomeans = [math.exp(sum(math.log(r["ratios"][i]) for r in rows) / len(rows)) for i in range(len(tries))]
    print("\ngeometric mean of torch_bn / native over the shapes above, per setting:")
    for setting, g in sorted(zip(tries, geomeans), key=lambda t: t[1]):
        print(f"  {g:.3f}  {setting}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)",
                       "defaults": defaults, "settings": tries, "rows": rows, "geomeans": geomeans}, f, indent=1)


if __name__ == "__main__":
    main()
