"""Check that the Triton kernels compile for a GPU architecture without a GPU, and what they compile to.

    python -m bench.compile_check            # sm_90a (H100/H200)
    python -m bench.compile_check --json out.json

Each kernel is compiled by Triton's own toolchain (ptxas ships with Triton), specialized as a
launch would specialize it, for the launch configurations (``LaunchConfig``) of the benchmark
shapes and of 4D, channels-last and odd-sized variants; cuobjdump then reads registers, spills
(LOCAL memory), shared memory, the width of global loads and stores, and whether integer
divisions remain. No GPU needed: this catches compile errors that Triton's CPU interpreter
cannot (types, layouts, constexpr use), register spills, and lost vector access.
tests/test_triton.py runs it and asserts on the rows. Must run without TRITON_INTERPRET.
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
SM_COUNT = 132  # H100 SXM
DTYPES = {"fp32": (torch.float32, 4), "bf16": (torch.bfloat16, 2)}
# (label, shape, layout, dtypes) beyond the benchmark's 2D shapes (float32 and bfloat16):
# ResNet-like 4D sizes with L = 56x56, 14x14 (L % 4 == 0) and 7x7 (odd), channels-last (L = 1),
# and channel counts not divisible by 16. Mostly float32 only, to keep the compile time short.
VARIANTS = [
    ("nchw L=56x56", (32, 64, 56, 56), "contiguous", ("fp32",)),
    ("nchw L=14x14", (32, 256, 14, 14), "contiguous", ("fp32", "bf16")),
    ("nchw L=7x7", (64, 512, 7, 7), "contiguous", ("fp32",)),
    ("nhwc C=64", (32, 64, 56, 56), "channels_last", ("fp32",)),
    ("nhwc C=3", (128, 3, 32, 32), "channels_last", ("fp32",)),
    ("2d C=1000", (256, 1000), "contiguous", ("fp32",)),
    ("2d C=999", (4096, 999), "contiguous", ("fp32",)),
]


DATA_TENSORS = ("X", "Y", "DY", "DX")  # pointers to x-sized data, in the input's dtype; the rest are float32


def launches(cfg: tk.LaunchConfig, dt: str) -> list[tuple]:
    """(kernel, argument values, constexpr names, num_warps) for every launch of one forward and
    backward with this configuration; pointers appear as their Triton type (dt for x-sized data)."""
    scalars = {"R": cfg.r, "C": cfg.c, "L": cfg.l, "ROWS_PER_PROG": cfg.rows_per_prog, "P": cfg.partials,
               "eps": 1e-5}
    tile = {**cfg.kernel_layout(), "BLOCK_R": cfg.block_r, "BLOCK_C": cfg.block_c}
    if cfg.small:
        plan = [(tk._small_forward, {"HAS_W": True, "HAS_B": True, **tile}, cfg.num_warps),
                (tk._small_backward, {"HAS_W": True, **tile}, cfg.num_warps)]
    else:
        combine = {"BLOCK_P": cfg.block_p, "BLOCK_C": cfg.block_c}
        plan = [(tk._stats_partial, tile, cfg.num_warps), (tk._stats_combine, combine, 4),
                (tk._normalize, {"HAS_W": True, "HAS_B": True, **tile}, cfg.num_warps),
                (tk._backward_partial, tile, cfg.num_warps), (tk._backward_combine, combine, 4),
                (tk._backward_dx, {"HAS_W": True, **tile}, cfg.num_warps)]
    out = []
    for fn, constexprs, warps in plan:
        args = {name: constexprs.get(name, scalars.get(name, dt if name in DATA_TENSORS else "*fp32"))
                for name in fn.arg_names}
        out.append((fn, args, set(constexprs), warps))
    return out


def specialize(args: dict, constexprs: set[str]) -> tuple[dict, dict, dict]:
    """signature, constexprs, attrs as a launch with these values gets them: Triton makes an
    integer equal to 1 a constant, marks integers divisible by 16 and (16-byte aligned) pointers,
    and passes integers of 2^31 or more as i64."""
    sig, const, attrs = {}, {}, {}
    for i, (name, v) in enumerate(args.items()):
        if name in constexprs or (isinstance(v, int) and v == 1):
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, str):  # a pointer type
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if v > tk.INT32_LIMIT else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def resources(cubin: bytes) -> dict[str, float]:
    """Registers, spills (local), shared memory; the share of global loads and of stores that are
    128-bit, the narrowest global load in bits; and how many integer divisions by a runtime value
    remain (each compiles to a sequence starting with I2F...RP, the reciprocal estimate)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = lambda flag: subprocess.run([os.path.join(TOOLS, "cuobjdump"), flag, f.name],  # noqa: E731
                                           capture_output=True, text=True, check=True).stdout
        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    row: dict[str, float] = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage)}
    for kind, op in (("loads", "LDG"), ("stores", "STG")):
        sizes = re.findall(rf"\b{op}\.E[\w.]*", sass)
        bits = [128 if ".128" in m else 64 if ".64" in m else 16 if ".U16" in m or ".S16" in m else 32 for m in sizes]
        row[f"vector_{kind}"] = sum(b == 128 for b in bits) / max(len(bits), 1)
        row[f"min_{kind[:-1]}_bits"] = min(bits, default=0)
    row["int_div"] = len(re.findall(r"\bI2F(?:\.\w+)*\.RP\b", sass))
    return row


def variants(sms: int = SM_COUNT) -> list[tuple[str, tk.LaunchConfig, tuple[str, ...]]]:
    """(label, configuration, dtypes) for the benchmark shapes and VARIANTS, one per distinct configuration."""
    seen, out = set(), []
    cases = [("bench " + "x".join(map(str, s)), s, "contiguous", tuple(DTYPES)) for s in SHAPES + CUDA_ONLY]
    for label, shape, layout, dtypes in cases + VARIANTS:
        x = torch.empty(shape, device="meta")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        cfg = tk._launch_config(x, sm_count=sms)
        if cfg not in seen:
            seen.add(cfg)
            out.append((label, cfg, dtypes))
    return out


def allowed_bits(cfg: tk.LaunchConfig, elem_bytes: int) -> int:
    """The widest access the layout allows for x-sized data, at most 128 bits: runs of L's
    power-of-two factor (L > 1) or of C's (L == 1) aligned elements."""
    run = (cfg.l if cfg.l > 1 else cfg.c) & -(cfg.l if cfg.l > 1 else cfg.c)
    return min(128, 8 * elem_bytes * run)


def check(arch: int = 90, only: str | None = None) -> list[dict]:
    """Compiles every launch of every configuration in its dtypes; one row per kernel and configuration."""
    target = GPUTarget("cuda", arch, 32)
    rows, compiled_keys = [], {}
    for label, cfg, dtypes in variants():
        if only and only not in label:
            continue
        for dt in dtypes:
            elem_bytes = DTYPES[dt][1]
            for fn, args, constexprs, warps in launches(cfg, "*" + dt):
                sig, const, attrs = specialize(args, constexprs)
                key = (fn.__name__, tuple(sig.items()), tuple(const.items()), tuple(sorted(attrs)), warps)
                if key not in compiled_keys:
                    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
                    compiled = triton.compile(src, target=target, options={"num_warps": warps})
                    compiled_keys[key] = resources(compiled.asm["cubin"])
                row = {"kernel": fn.__name__, "dtype": dt, "variant": label, "l": cfg.l, "c": cfg.c,
                       "small": cfg.small, "block_r": cfg.block_r, "block_c": cfg.block_c, "row_vec": cfg.row_vec,
                       "num_warps": warps, "allowed_bits": allowed_bits(cfg, elem_bytes),
                       **compiled_keys[key]}
                rows.append(row)
                print(f"{label:<22} {row['kernel']:<18} {dt:<5} L={cfg.l:<5} C={cfg.c:<6} "
                      f"{'small' if cfg.small else 'chunked'} {cfg.block_r}x{cfg.block_c} w{warps} "
                      f"regs {row.get('reg')} spill {row.get('local')} 128-bit ld {100 * row['vector_loads']:.0f}% "
                      f"st {100 * row['vector_stores']:.0f}% min ld {row['min_load_bits']} (layout allows "
                      f"{row['allowed_bits']}) int div {row['int_div']}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    p.add_argument("--only", help="only the variants whose label contains this")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    rows = check(args.arch, args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
