"""Benchmark: torch_bn vs nn.BatchNorm1d/2d, training mode, forward and forward+backward.

    python -m bench.bn                      # every shape, float32 and bfloat16, on CUDA if present
    python -m bench.bn --device cpu --threads 1,2 --dtype float32 --dtype float16 --markdown
    python -m bench.bn --device cpu --shapes 32x64x32x32 --layout channels_last --json bench.json
    python -m bench.bn --mlp --threads 1    # per call at the CIFAR-10 MLP's sizes, in microseconds
    python -m bench.bn --mlp --threads 1 --shapes 50x100,100x500 --baseline ../old --repeats 5

One process, the same inputs for every implementation; warm-up, then the median of many
repeats (CUDA: triton.testing.do_bench, which uses CUDA events); on CPU native and torch_bn run
in turns. ``--threads 1,2`` runs the whole table once per thread count (torch.set_num_threads),
in the same process. Copy bandwidth is measured in the same run; "% bound" is the two-pass bound
over the measured time: 8 accesses per element for forward+backward (forward reads x twice and
writes y, backward reads dy and x twice each and writes dx), 3 for the forward alone. Each table
prints the load average (os.getloadavg) before and after it: the machine may be shared.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch import Tensor, nn

import torch_bn

SHAPES = [(50, 100), (50, 50), (100, 500), (256, 1024), (4096, 1024), (8192, 512), (4096, 4096), (256, 65536), (65536, 1024),
          (1048576, 64)]
CUDA_ONLY = [(16384, 16384)]  # (100, 500) is the notebook's shape for its backward speed-up (1.57x)
# The MLP's BN layers (cifar_bn): batch 50; hidden width 100 (--compare, --experiment deep) and 50
# (--experiment weight-scale). At these sizes a call costs overhead, not arithmetic.
MLP_SHAPES = [(50, 100), (50, 50)]
# BatchNorm2d sizes (N, C, H, W): CIFAR-like early and late ResNet layers; contiguous and channels-last.
SHAPES_4D = [(32, 64, 32, 32), (128, 256, 8, 8)]
LAYOUTS = ("contiguous", "channels_last")
CALLS_PER_TURN = 4  # CPU timing: consecutive calls of one implementation per turn (see timer)
ACCESSES_FWD_BWD = 8
ACCESSES_FWD = 3


def timer(device: str, budget_s: float):
    """A function that takes {name: fn} and returns {name: median seconds of fn()} on this device.

    CPU: the functions run in turns, a few calls at a time (a a a a, b b b b, a a a a, ...),
    rather than one after the other, so that the drift of a noisy shared machine falls on all of
    them alike; the median of the calls then belongs to each function's own steady state. (One
    call at a time let one implementation's frees decide where the other's next buffers land:
    interleaved with nn.BatchNorm1d at 256x1024, torch_bn's outputs came from memory glibc had
    just returned to the kernel, 256 page faults a call, which neither has when run alone.)
    """
    if device == "cuda":
        import triton.testing

        return lambda fns: {k: triton.testing.do_bench(fn, warmup=25, rep=int(budget_s * 1000),
                                                       return_mode="median") / 1e3 for k, fn in fns.items()}

    def median_cpu(fns: dict) -> dict:
        for fn in fns.values():
            fn()  # warm-up (allocator, caches)
        times: dict[str, list[float]] = {k: [] for k in fns}
        start = time.perf_counter()
        while (len(times[next(iter(fns))]) < 5
               or (time.perf_counter() - start < budget_s * len(fns) and len(times[next(iter(fns))]) < 200)):
            for k, fn in fns.items():
                for _ in range(CALLS_PER_TURN):
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    return median_cpu


def copy_bandwidth(device: str, measure) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (256 if device == "cuda" else 64) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / measure({"copy": lambda: dst.copy_(src)})["copy"]


def implementations(shape: tuple[int, ...], device: str) -> dict[str, nn.Module]:
    """BatchNorm1d for (N, C) and (N, C, L) shapes, BatchNorm2d for (N, C, H, W)."""
    ours, theirs = (torch_bn.BatchNorm2d, nn.BatchNorm2d) if len(shape) == 4 else (torch_bn.BatchNorm1d, nn.BatchNorm1d)
    c = shape[1]
    return {
        "native": theirs(c, device=device),
        "torch_bn": ours(c, device=device),
        "staged": ours(c, device=device, backward="staged"),
    }


def forward_only(m: nn.Module, x: Tensor):
    def run():
        with torch.no_grad():
            m(x)
    return run


def forward_backward(m: nn.Module, x: Tensor, dy: Tensor):
    def run():
        x.grad = None
        m.zero_grad(set_to_none=True)
        m(x).backward(dy)
    return run


def backward_only(m: nn.Module, x: Tensor, dy: Tensor):
    """The backward alone, as the notebook times it: through one graph, kept from one forward."""
    y = m(x)

    def run():
        x.grad = None
        m.zero_grad(set_to_none=True)
        y.backward(dy, retain_graph=True)
    return run


def bench_shape(shape, dtype, device, measure, bandwidth, channels_last: bool = False, staged: bool = True) -> dict:
    layout = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    row: dict = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "mib": x.numel() * x.element_size() / 2**20,
                 "channels_last": layout is torch.channels_last, "threads": torch.get_num_threads()}
    m = implementations(shape, device)
    m = {k: v.to(dtype) if dtype == torch.float64 else v for k, v in m.items()}  # float64 modules for float64 input
    # native and torch_bn are timed in turns on the same inputs. The two backwards are timed
    # one after the other instead: the staged one churns the heap (a dozen full-size
    # temporaries), which would make the next call page-fault its output back in.
    for kind, fns in (("fwd", {k: forward_only(m[k], x) for k in ("native", "torch_bn")}),
                      ("fwdbwd", {k: forward_backward(m[k], x, dy) for k in ("native", "torch_bn")})):
        times = measure(fns)
        row[f"native_{kind}_s"], row[f"torch_bn_{kind}_s"] = times["native"], times["torch_bn"]
    if staged:
        for k in ("torch_bn", "staged"):
            row[f"{k}_bwd_s"] = measure({k: backward_only(m[k], x, dy)})[k]
    nbytes = x.numel() * x.element_size()
    row["bound_fwdbwd_s"] = ACCESSES_FWD_BWD * nbytes / bandwidth
    row["bound_fwd_s"] = ACCESSES_FWD * nbytes / bandwidth
    return row


def load_baseline(path: str):
    """PATH/torch_bn (another checkout, e.g. an older commit's) imported as the package
    torch_bn_baseline (its imports are relative), to time it in the same process."""
    folder = tempfile.mkdtemp()
    shutil.copytree(os.path.join(path, "torch_bn"), os.path.join(folder, "torch_bn_baseline"))
    sys.path.insert(0, folder)
    return importlib.import_module("torch_bn_baseline")


def bench_mlp_shape(shape, measure, baseline=None) -> dict:
    """Per call, CPU float32: native, torch_bn as it runs (the compiled op where built) and torch_bn
    with the compiled op switched off (its Python path), and a baseline checkout's torch_bn where
    given, in turns on the same inputs."""
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    m = implementations(shape, "cpu")
    if baseline is not None:
        m["baseline"] = baseline.BatchNorm1d(shape[1])

    def python_path(fn):
        def run():
            torch_bn.cpp.ENABLED = False
            try:
                fn()
            finally:
                torch_bn.cpp.ENABLED = enabled
        return run

    enabled = torch_bn.cpp.ENABLED
    row: dict = {"shape": list(shape), "path": torch_bn.dispatch.choose_path(x)}
    for kind, make in (("fwd", lambda k: forward_only(m[k], x)), ("fwdbwd", lambda k: forward_backward(m[k], x, dy))):
        times = measure({"native": make("native"), "torch_bn": make("torch_bn"),
                         "python": python_path(make("torch_bn"))}
                        | ({"baseline": make("baseline")} if baseline is not None else {}))
        for k, t in times.items():
            row[f"{k}_{kind}_s"] = t
    return row


FALLBACK_SHAPES = [(256, 1024), (4096, 1024), (256, 65536), (32, 64, 32, 32)]


def bench_fallback_shape(shape, dtype, measure) -> dict:
    """Forward+backward of torch_bn's two tensor-op paths, what runs without the compiled op:
    pinned to the slab-fused ops and to the reference ops, in turns on the same inputs."""
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, dtype=dtype)
    m = implementations(shape, "cpu")["torch_bn"]

    def pinned(path):
        run = forward_backward(m, x, dy)

        def f():
            with torch_bn.use_path(path):
                run()
        return f

    times = measure({"fused": pinned("fused"), "reference": pinned("reference")})
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "fused_fwdbwd_s": times["fused"], "reference_fwdbwd_s": times["reference"]}


def print_fallback_table(rows: list[dict]) -> None:
    print("| shape | dtype | threads | f+b fused (ms) | f+b reference (ms) | reference / fused |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['threads']} | {1e3 * r['fused_fwdbwd_s']:.2f} | "
              f"{1e3 * r['reference_fwdbwd_s']:.2f} | {r['reference_fwdbwd_s'] / r['fused_fwdbwd_s']:.2f} |", flush=True)


def median_rows(repeats: list[list[dict]]) -> list[dict]:
    """Per shape, the median over repeats of the whole table of each time, and of each ratio to
    native (the ratio of medians and the median of ratios differ on a drifting machine; the
    ratios, taken within one repeat, are what the targets are about)."""
    rows = []
    for same_shape in zip(*repeats):
        row = dict(same_shape[0])
        for key in [k for k in row if k.endswith("_s")]:
            row[key] = statistics.median(r[key] for r in same_shape)
            native = "native_" + key.rsplit("_", 2)[1] + "_s"  # torch_bn_fwd_s -> native_fwd_s
            row[key.removesuffix("_s") + "_ratio"] = statistics.median(r[key] / r[native] for r in same_shape)
        row["repeats"] = len(same_shape)
        rows.append(row)
    return rows


def print_mlp_table(rows: list[dict]) -> None:
    names = [k for k in ("torch_bn", "python", "baseline") if f"{k}_fwd_s" in rows[0]]
    head = "".join(f" {k:>9} {'ratio':>6}" for k in names)
    print(f"{'shape':>8} {'path':>9} | {'fwd native':>10}{head} | {'f+b native':>10}{head}   "
          f"(microseconds per call; ratio to native, median over {rows[0].get('repeats', 1)} repeat(s))")
    for r in rows:
        cells = []
        for kind in ("fwd", "fwdbwd"):
            nat = r[f"native_{kind}_s"]
            cells.append(f"{1e6 * nat:>10.1f}" + "".join(
                f" {1e6 * r[f'{k}_{kind}_s']:>9.1f} {r.get(f'{k}_{kind}_ratio', r[f'{k}_{kind}_s'] / nat):>6.2f}"
                for k in names))
        print(f"{label(r):>8} {r['path']:>9} | {cells[0]} | {cells[1]}")


def label(row: dict) -> str:
    return "x".join(map(str, row["shape"])) + (" (channels-last)" if row.get("channels_last") else "")


def layout_name(row: dict) -> str:
    return "channels_last" if row.get("channels_last") else "contiguous"


def print_header(staged: bool) -> None:
    head = (f"{'shape':>14} {'dtype':>8} {'layout':>13} {'thr':>3} {'MiB':>6} | {'fwd native':>10} {'torch_bn':>9} "
            f"{'ratio':>6} {'%bnd':>5} | {'f+b native':>10} {'torch_bn':>9} {'ratio':>6} {'%bound':>6} {'nat %bnd':>8}"
            + (f" | {'bwd cf':>9} {'staged':>9} {'staged/cf':>9}" if staged else ""))
    print(head)
    print("-" * len(head), flush=True)


def print_row(r: dict) -> None:
    ms = lambda k: f"{1e3 * r[k]:>8.3f}ms"  # noqa: E731
    print(f"{'x'.join(map(str, r['shape'])):>14} {r['dtype']:>8} {layout_name(r):>13} {r['threads']:>3} {r['mib']:>6.1f} | "
          f"{ms('native_fwd_s'):>10} {ms('torch_bn_fwd_s'):>9} {r['torch_bn_fwd_s'] / r['native_fwd_s']:>6.2f} "
          f"{100 * r['bound_fwd_s'] / r['torch_bn_fwd_s']:>4.0f}% | "
          f"{ms('native_fwdbwd_s'):>10} {ms('torch_bn_fwdbwd_s'):>9} "
          f"{r['torch_bn_fwdbwd_s'] / r['native_fwdbwd_s']:>6.2f} "
          f"{100 * r['bound_fwdbwd_s'] / r['torch_bn_fwdbwd_s']:>5.0f}% "
          f"{100 * r['bound_fwdbwd_s'] / r['native_fwdbwd_s']:>7.0f}%"
          + (f" | {ms('torch_bn_bwd_s'):>9} {ms('staged_bwd_s'):>9} {r['staged_bwd_s'] / r['torch_bn_bwd_s']:>9.2f}"
             if "staged_bwd_s" in r else ""), flush=True)


def print_table(rows: list[dict]) -> None:
    print_header(all("staged_bwd_s" in r for r in rows))
    for r in rows:
        print_row(r)


def markdown_table(rows: list[dict]) -> str:
    """The results table (bench/RESULTS.md): times in ms, ratios torch_bn / native (lower is better),
    and the share of the two-pass bound reached (higher is better)."""
    staged = all("staged_bwd_s" in r for r in rows)
    lines = ["| shape | dtype | layout | threads | MiB | fwd native | fwd torch_bn | ratio | fwd % of bound | "
             "f+b native | f+b torch_bn | ratio | f+b % of bound (ours / native) |"
             + (" backward closed-form | backward staged | staged / closed-form |" if staged else ""),
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: | ---: | ---: |" if staged else "")]
    for r in rows:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {layout_name(r)} | {r['threads']} | {r['mib']:.1f} | "
            f"{1e3 * r['native_fwd_s']:.3f} | {1e3 * r['torch_bn_fwd_s']:.3f} | {r['torch_bn_fwd_s'] / r['native_fwd_s']:.2f} | "
            f"{100 * r['bound_fwd_s'] / r['torch_bn_fwd_s']:.0f}% | "
            f"{1e3 * r['native_fwdbwd_s']:.3f} | {1e3 * r['torch_bn_fwdbwd_s']:.3f} | "
            f"{r['torch_bn_fwdbwd_s'] / r['native_fwdbwd_s']:.2f} | "
            f"{100 * r['bound_fwdbwd_s'] / r['torch_bn_fwdbwd_s']:.0f}% / {100 * r['bound_fwdbwd_s'] / r['native_fwdbwd_s']:.0f}% |"
            + (f" {1e3 * r['torch_bn_bwd_s']:.3f} | {1e3 * r['staged_bwd_s']:.3f} | {r['staged_bwd_s'] / r['torch_bn_bwd_s']:.2f} |"
               if staged else ""))
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def parse_threads(text: str | None) -> list[int | None]:
    """--threads "1,2" -> [1, 2]; absent -> [None] (PyTorch's choice)."""
    if not text:
        return [None]
    threads = [int(t) for t in text.split(",")]
    if any(t < 1 for t in threads):
        raise SystemExit(f"--threads takes positive counts such as 1 or 1,2, got {text!r}")
    return threads


def cases(shapes: list[tuple[int, ...]], layouts: list[str]) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, channels_last) pairs: 4D shapes in each layout asked for, others contiguous."""
    return [(s, layout == "channels_last") for s in shapes
            for layout in (layouts if len(s) == 4 else ["contiguous"])]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """--shapes "4096x1024,32x64x32x32" as [(4096, 1024), (32, 64, 32, 32)]."""
    return [tuple(int(d) for d in shape.split("x")) for shape in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), action="append",
                   help="repeatable; default float32 and bfloat16")
    p.add_argument("--shapes", help="e.g. 4096x1024,32x64x32x32 (default: the standard 2D and 4D lists); "
                                    "NxCxHxW shapes use BatchNorm2d")
    p.add_argument("--layout", choices=LAYOUTS, action="append",
                   help="layout of NxCxHxW inputs, repeatable (default both)")
    p.add_argument("--channels-last", action="store_true", help="same as --layout channels_last")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    p.add_argument("--staged", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the closed-form against the staged backward (the backward alone)")
    p.add_argument("--mlp", action="store_true",
                   help="only the MLP's shapes (CPU float32), per call: native, torch_bn, torch_bn's Python path")
    p.add_argument("--baseline", help="with --mlp: a checkout whose torch_bn is timed too (e.g. an older commit's)")
    p.add_argument("--repeats", type=int, default=1, help="with --mlp: the table this many times, medians")
    p.add_argument("--fallback", action="store_true",
                   help="only the paths without the compiled op (CPU): slab-fused vs reference ops, forward+backward")
    p.add_argument("--threads", help="torch.set_num_threads, one count or several (1,2: the whole table for each, "
                                     "in this process); default: PyTorch's choice")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = p.parse_args()
    threads = parse_threads(args.threads)
    if args.mlp:
        measure = timer("cpu", args.budget)
        shapes = parse_shapes(args.shapes) if args.shapes else MLP_SHAPES
        baseline = load_baseline(args.baseline) if args.baseline else None
        rows = []
        for t in threads:
            if t:
                torch.set_num_threads(t)
            machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
            print(f"device: {machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; "
                  f"load average {load_average()}")
            rows_t = median_rows([[bench_mlp_shape(s, measure, baseline) | {"threads": torch.get_num_threads()}
                                   for s in shapes] for _ in range(args.repeats)])
            print_mlp_table(rows_t)
            print(f"load average after: {load_average()}")
            rows += rows_t
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
        return
    if args.fallback:
        measure = timer("cpu", args.budget)
        shapes = parse_shapes(args.shapes) if args.shapes else FALLBACK_SHAPES
        for t in threads:
            if t:
                torch.set_num_threads(t)
            print(f"torch {torch.__version__}; {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}; "
                  f"load average {load_average()}")
            print_fallback_table([bench_fallback_shape(s, getattr(torch, d), measure)
                                  for d in (args.dtype or ["float32", "bfloat16"]) for s in shapes])
            print(f"load average after: {load_average()}")
        return
    shapes = (parse_shapes(args.shapes) if args.shapes
              else SHAPES + (CUDA_ONLY if args.device == "cuda" else []) + SHAPES_4D)
    layouts = args.layout or (["channels_last"] if args.channels_last else list(LAYOUTS))
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    measure = timer(args.device, args.budget)
    rows = []
    for t in threads:
        if t:
            torch.set_num_threads(t)
        bandwidth = copy_bandwidth(args.device, measure)
        machine = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
        print(f"device: {machine}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; load average {load_average()}")
        print_header(args.staged)
        rows_t = []
        for dt in dtypes:
            for s, cl in cases(shapes, layouts):
                rows_t.append(bench_shape(s, dt, args.device, measure, bandwidth, cl, args.staged)
                              | {"copy_bandwidth_Bps": bandwidth, "load_average": os.getloadavg()})
                print_row(rows_t[-1])
        print(f"load average after: {load_average()}")
        if args.markdown:
            print(markdown_table(rows_t))
        rows += rows_t
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
