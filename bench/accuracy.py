"""Accuracy far from zero: x = 1e6 + randn in float32, torch_bn against nn.BatchNorm1d.

    python -m bench.accuracy --threads 1,2

For each shape, the largest absolute error of y (training mode, weight 1, bias 0) against
batch norm computed in float64 from the equations on the same float32 input (so the input's own
rounding is not counted), for torch_bn on the path choose_path picks (the compiled CPU op where it
is built), for torch_bn pinned to its tensor-op paths (what runs without a compiler: the
slab-fused ops from torch_bn.dispatch.FUSED_MIN_ELEMENTS values, the reference ops below), and
for nn. Shapes: the issue's (4096, 64), (50, 100) and (1000, 3). tests/test_kernels.py holds the
compiled op to these bounds; this script prints the figures.
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

import torch_bn
from torch_bn import dispatch

SHAPES = [(4096, 64), (50, 100), (1000, 3)]
OFFSET = 1e6


def float64_batch_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) per column, in float64, from the equations."""
    x = x.double()
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) / torch.sqrt(var + eps)


def errors(shape: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """Largest |y - y64| per implementation for x = OFFSET + randn(shape) (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = (OFFSET + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    y64 = float64_batch_norm(x)
    tensor_ops = "fused" if x.numel() >= dispatch.FUSED_MIN_ELEMENTS else "reference"
    out = {}
    out["torch_bn"] = torch_bn.BatchNorm1d(shape[1])(x)
    with torch_bn.use_path(tensor_ops):
        out[f"torch_bn {tensor_ops}"] = torch_bn.BatchNorm1d(shape[1])(x)
    out["nn"] = torch.nn.BatchNorm1d(shape[1])(x)
    return {k: (y.detach().double() - y64).abs().max().item() for k, y in out.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1", help="comma-separated thread counts (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"x = {OFFSET:g} + randn, float32; largest |y - float64 of the same input|, seed {args.seed}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in SHAPES:
            row = errors(shape, args.seed)
            print(f"{threads} thread(s) {str(shape):>11}: " + "  ".join(f"{k} {v:.2g}" for k, v in row.items()))


if __name__ == "__main__":
    main()
