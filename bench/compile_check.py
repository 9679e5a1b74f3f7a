"""Compile the Triton kernels for a GPU architecture without a GPU, and report their resources.

    python -m bench.compile_check            # sm_90a (H100/H200), float32 and bfloat16
    python -m bench.compile_check --json out.json

Each kernel is compiled by Triton's own toolchain (ptxas ships with Triton) for the block sizes
``_launch_config`` picks for the benchmark shapes; cuobjdump then reads registers, spills
(LOCAL memory) and shared memory per thread block. No GPU needed: this catches compile errors
that Triton's CPU interpreter cannot (types, layouts, constexpr use) and register spills.
Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.bn import CUDA_ONLY, SHAPES
from torch_bn import triton_kernels as tk

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def kernels(dt: str, config: tuple) -> list[tuple]:
    """(kernel, signature, constexprs, num_warps) for every launch of one forward and backward of a
    2D input, specialized as a launch would be: L == 1 is a constant (Triton specializes integer
    arguments equal to 1), and tensors and sizes divisible by 16 are marked so (see attrs)."""
    i32, f32 = "i32", "*fp32"
    rc = {"R": i32, "C": i32, "L": "constexpr"}
    const = lambda d: {k: "constexpr" for k in d if k != "L"}  # noqa: E731
    if config[0] == "small":
        _, block_r, block_c = config
        tile = {"L": 1, "BLOCK_R": block_r, "BLOCK_C": block_c}
        w = tk.SMALL_WARPS
        return [
            (tk._small_forward, {"X": dt, "Y": dt, "MEAN": f32, "VAR": f32, "W": f32, "B": f32, **rc, "eps": "fp32",
                                 "HAS_W": "constexpr", "HAS_B": "constexpr", **const(tile)},
             {"HAS_W": True, "HAS_B": True, **tile}, w),
            (tk._small_backward, {"DY": dt, "X": dt, "DX": dt, "MEAN": f32, "RSTD": f32, "W": f32, "DB": f32,
                                  "DW": f32, **rc, "HAS_W": "constexpr", **const(tile)}, {"HAS_W": True, **tile}, w),
        ]
    _, block_r, block_c, block_p = config
    rc["ROWS_PER_PROG"] = i32
    tile = {"L": 1, "BLOCK_R": block_r, "BLOCK_C": block_c}
    return [
        (tk._stats_partial, {"X": dt, "PMEAN": f32, "PM2": f32, **rc, **const(tile)}, tile, 4),
        (tk._stats_combine, {"PMEAN": f32, "PM2": f32, "MEAN": f32, "VAR": f32, "RSTD": f32, "P": i32, "R": i32,
                             "C": i32, "ROWS_PER_PROG": i32, "eps": "fp32", "BLOCK_P": "constexpr",
                             "BLOCK_C": "constexpr"}, {"BLOCK_P": block_p, "BLOCK_C": block_c}, 4),
        (tk._normalize, {"X": dt, "Y": dt, "MEAN": f32, "RSTD": f32, "W": f32, "B": f32, **rc,
                         "HAS_W": "constexpr", "HAS_B": "constexpr", **const(tile)},
         {"HAS_W": True, "HAS_B": True, **tile}, 4),
        (tk._backward_partial, {"DY": dt, "X": dt, "MEAN": f32, "RSTD": f32, "PDB": f32, "PDW": f32, **rc,
                                **const(tile)}, tile, 4),
        (tk._backward_combine, {"PDB": f32, "PDW": f32, "DB": f32, "DW": f32, "P": i32, "C": i32,
                                "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
         {"BLOCK_P": block_p, "BLOCK_C": block_c}, 4),
        (tk._backward_dx, {"DY": dt, "X": dt, "DX": dt, "MEAN": f32, "RSTD": f32, "W": f32, "DB": f32, "DW": f32,
                           **rc, "HAS_W": "constexpr", **const(tile)}, {"HAS_W": True, **tile}, 4),
    ]


def divisible_by_16(sig: dict[str, str]) -> dict[tuple[int], list]:
    """Triton's launch-time specialization for the benchmark shapes: every tensor is 16-byte
    aligned and every size (R, C, rows per program, P) a multiple of 16."""
    names = [k for k in sig if sig[k].startswith("*") or sig[k] == "i32"]
    return {(list(sig).index(k),): [["tt.divisibility", 16]] for k in names if k not in ("P",)}


def resources(cubin: bytes) -> dict[str, float]:
    """Registers, spills (local), shared memory, and the share of global loads and stores of x-sized
    data that are 128-bit (coalesced vector accesses, what a bandwidth-bound kernel needs)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = lambda flag: subprocess.run([os.path.join(TOOLS, "cuobjdump"), flag, f.name],  # noqa: E731
                                           capture_output=True, text=True, check=True).stdout
        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    row: dict[str, float] = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage)}
    loads = re.findall(r"\bLDG\.E(\.\w+)*", sass)
    row["vector_loads"] = sum(1 for m in re.finditer(r"\bLDG\.E\.128\b", sass)) / max(len(loads), 1)
    return row


def configs(sms: int = 132) -> set[tuple]:
    """The kernel configurations the benchmark shapes launch on a GPU with `sms` SMs (H100: 132):
    ("small", BLOCK_R, BLOCK_C) or ("chunked", BLOCK_R, BLOCK_C, BLOCK_P)."""
    seen = set()
    for shape in SHAPES + CUDA_ONLY:
        x = torch.empty(shape, device="meta")
        small = tk._small_config(x)
        if small is not None:
            seen.add(("small", small[3], small[4]))
            continue
        r, _, _, block_r, block_c, rows = tk._launch_config(x, sm_count=sms)
        seen.add(("chunked", block_r, block_c, tk._block_p(triton.cdiv(r, rows), block_c)))
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    target = GPUTarget("cuda", args.arch, 32)
    rows = []
    for dt in ("*fp32", "*bf16"):
        for config in sorted(configs(), key=str):
            for fn, sig, const, warps in kernels(dt, config):
                src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=divisible_by_16(sig))
                compiled = triton.compile(src, target=target, options={"num_warps": warps})
                row = {"kernel": fn.__name__, "dtype": dt[1:], "config": list(config), "num_warps": warps,
                       **resources(compiled.asm["cubin"])}
                rows.append(row)
                print(f"{row['kernel']:<18} {row['dtype']:<5} {str(config):<28} w{warps} "
                      f"regs {row.get('reg')} local(spill) {row.get('local')} shared {row.get('shared')} "
                      f"128-bit loads {100 * row['vector_loads']:.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
