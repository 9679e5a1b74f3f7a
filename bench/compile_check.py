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


def kernels(dt: str, block_r: int, block_c: int, block_p: int) -> list[tuple]:
    """(kernel, signature, constexprs) for every launch of one forward and backward of a 2D
    input, specialized as a launch would be: L == 1 is a constant (Triton specializes integer
    arguments equal to 1), and tensors and sizes divisible by 16 are marked so (see attrs)."""
    i32, f32 = "i32", "*fp32"
    rc = {"R": i32, "C": i32, "L": "constexpr", "ROWS_PER_PROG": i32}
    tile = {"L": 1, "BLOCK_R": block_r, "BLOCK_C": block_c}
    const = lambda d: {k: "constexpr" for k in d if k != "L"}  # noqa: E731
    return [
        (tk._stats_partial, {"X": dt, "PMEAN": f32, "PM2": f32, **rc, **const(tile)}, tile),
        (tk._stats_combine, {"PMEAN": f32, "PM2": f32, "MEAN": f32, "VAR": f32, "RSTD": f32, "P": i32, "R": i32,
                             "C": i32, "ROWS_PER_PROG": i32, "eps": "fp32", "BLOCK_P": "constexpr",
                             "BLOCK_C": "constexpr"}, {"BLOCK_P": block_p, "BLOCK_C": block_c}),
        (tk._normalize, {"X": dt, "Y": dt, "MEAN": f32, "RSTD": f32, "W": f32, "B": f32, **rc,
                         "HAS_W": "constexpr", "HAS_B": "constexpr", **const(tile)},
         {"HAS_W": True, "HAS_B": True, **tile}),
        (tk._backward_partial, {"DY": dt, "X": dt, "MEAN": f32, "RSTD": f32, "PDB": f32, "PDW": f32, **rc,
                                **const(tile)}, tile),
        (tk._backward_combine, {"PDB": f32, "PDW": f32, "DB": f32, "DW": f32, "P": i32, "C": i32,
                                "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
         {"BLOCK_P": block_p, "BLOCK_C": block_c}),
        (tk._backward_dx, {"DY": dt, "X": dt, "DX": dt, "MEAN": f32, "RSTD": f32, "W": f32, "DB": f32, "DW": f32,
                           **rc, "HAS_W": "constexpr", **const(tile)}, {"HAS_W": True, **tile}),
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


def configs(sms: int = 132) -> set[tuple[int, int, int]]:
    """(BLOCK_R, BLOCK_C, BLOCK_P) that _launch_config picks for the benchmark shapes on `sms` SMs."""
    seen = set()
    for shape in SHAPES + CUDA_ONLY:
        n, c = shape
        # _launch_config's arithmetic, with the device's SM count instead of a live device.
        block_c = min(triton.next_power_of_2(c), 64)
        block_r = max(16, min(tk.TILE_ELEMENTS // block_c, triton.next_power_of_2(n)))
        chunks = max(1, min(triton.cdiv(n, block_r), triton.cdiv(tk.PROGRAMS_PER_SM * sms, triton.cdiv(c, block_c))))
        rows = triton.cdiv(triton.cdiv(n, chunks), block_r) * block_r
        seen.add((block_r, block_c, tk._block_p(triton.cdiv(n, rows), block_c)))
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
        for block_r, block_c, block_p in sorted(configs()):
            for fn, sig, const in kernels(dt, block_r, block_c, block_p):
                src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=divisible_by_16(sig))
                compiled = triton.compile(src, target=target)
                row = {"kernel": fn.__name__, "dtype": dt[1:], "block_r": block_r, "block_c": block_c,
                       "block_p": block_p, **resources(compiled.asm["cubin"])}
                rows.append(row)
                print(f"{row['kernel']:<18} {row['dtype']:<5} R{block_r:<5} C{block_c:<3} P{block_p:<4} "
                      f"regs {row.get('reg')} local(spill) {row.get('local')} shared {row.get('shared')} "
                      f"128-bit loads {100 * row['vector_loads']:.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
