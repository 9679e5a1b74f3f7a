"""Benchmark: batch renormalization, ghost batch norm and masked statistics against plain torch_bn.

    python -m bench.variants --threads 1
    python -m bench.variants --threads 1 --baseline ../main   # also another checkout's plain layer

Per call, training mode, forward+backward of one layer (bench.bn's forward_backward), all
implementations timed in turns on the same inputs in one process, medians of wall-clock time and
of the thread's CPU time (on a shared, overloaded machine the wall clock mostly measures waiting
for a core; CPU time measures the work).
Shapes: the issue's (256, 128) and (32, 64, 16, 16), and the MLP's (50, 100) where the mask=None
path must cost what plain torch_bn costs. --baseline PATH imports PATH/torch_bn under another name,
so that a plain layer of that checkout (e.g. main's) is timed in the same process too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import torch_bn
from bench.bn import forward_backward, load_baseline

SHAPES = [(256, 128), (32, 64, 16, 16), (50, 100)]
VIRTUAL_BATCH_SIZE = 32  # ghost batches of 32 samples (--virtual-batch-size)
CALLS = 10  # calls per timed sample


class Masked(torch.nn.Module):
    """A torch_bn layer called with a fixed mask (about 90% of the positions counted), or with
    mask=None spelled out."""

    def __init__(self, bn: torch.nn.Module, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.bn, self.mask = bn, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x, mask=self.mask)


class Python(torch.nn.Module):
    """A torch_bn layer with the compiled op switched off while it runs: BatchNormFunction on the
    reference ops, the floor of a Python autograd Function made of tensor ops."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled, torch_bn.cpp.ENABLED = torch_bn.cpp.ENABLED, False
        try:
            return self.bn(x)
        finally:
            torch_bn.cpp.ENABLED = enabled


def measure(fns: dict, budget_s: float) -> dict[str, tuple[float, float]]:
    """{name: (median wall seconds, median CPU seconds) per call}, the functions run in turns."""
    for fn in fns.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while len(wall[next(iter(fns))]) < 7 or time.perf_counter() - start < budget_s * len(fns):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.thread_time()
            for _ in range(CALLS):
                fn()
            cpu[k].append((time.thread_time() - c) / CALLS)
            wall[k].append((time.perf_counter() - w) / CALLS)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def implementations(shape, baseline, virtual_batch_size: int) -> dict[str, torch.nn.Module]:
    c, two_d = shape[1], len(shape) == 4
    plain = torch_bn.BatchNorm2d if two_d else torch_bn.BatchNorm1d
    ghost = torch_bn.GhostBatchNorm2d if two_d else torch_bn.GhostBatchNorm1d
    renorm = torch_bn.BatchRenorm2d if two_d else torch_bn.BatchRenorm1d
    mask = torch.rand((shape[0], *shape[2:]), generator=torch.Generator().manual_seed(0)) < 0.9
    out = {"torch_bn": plain(c), "mask=None": Masked(plain(c), None), "python": Python(plain(c)), "ghost": ghost(c, virtual_batch_size),
           "renorm": renorm(c), "masked": Masked(plain(c), mask)}
    if baseline is not None:
        out["baseline"] = (baseline.BatchNorm2d if two_d else baseline.BatchNorm1d)(c)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per implementation and shape")
    parser.add_argument("--baseline", default=None, help="a checkout whose plain torch_bn layer is timed too")
    parser.add_argument("--virtual-batch-size", type=int, default=VIRTUAL_BATCH_SIZE, help="the ghost layer's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline) if args.baseline else None
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, ghost batches of "
          f"{args.virtual_batch_size}; forward+backward per call, medians: wall us / CPU us (CPU ratio to torch_bn)")
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        layers = implementations(shape, baseline, args.virtual_batch_size)
        times = measure({k: forward_backward(m, x, dy) for k, m in layers.items()}, args.budget)
        ref = times["torch_bn"][1]
        print(f"{str(shape):18}" + "  ".join(f"{k} {w * 1e6:.0f}/{c * 1e6:.0f} ({c / ref:.2f}x)"
                                            for k, (w, c) in times.items()))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
