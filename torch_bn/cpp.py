"""The compiled CPU op ``torch.ops.torch_bn_cpp.batch_norm_train``: build on first use, or do without.

``csrc/batch_norm_cpu.cpp`` holds a whole training-mode layer (statistics, y, running-statistics
update, and the closed-form backward as a C++ autograd node) for small CPU inputs, where
torch_bn's Python path costs per-call overhead rather than arithmetic. :func:`op` compiles it
with ``torch.utils.cpp_extension`` (g++ and ninja, about a minute) the first time it is asked
for, and returns the op. The build is kept in torch's extensions folder (``TORCH_EXTENSIONS_DIR``,
default ~/.cache/torch_extensions) under torch_bn/, named by a hash of the source, the flags and
the torch and Python versions, so later processes load it directly. Where it cannot be built (no
compiler, no ninja) :func:`op` warns once and returns None, and torch_bn runs the same math
through its Python paths; ``TORCH_BN_CPP=0`` switches the op off without trying.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "batch_norm_cpu.cpp"
# TORCH_BN_CPP=0 in the environment (or ENABLED = False) never builds or uses the compiled op.
ENABLED = os.environ.get("TORCH_BN_CPP", "1") != "0"

_op = None  # the op once loaded, False where it cannot be


def cpu_flags() -> list[str]:
    """The vector instructions the kernels are compiled for: AVX2 with FMA and F16C where
    ATen's own kernels run AVX2 or AVX-512 on this CPU (``torch.backends.cpu.get_cpu_capability()``,
    which honours ``ATEN_CPU_CAPABILITY``), else none (the compiler's portable baseline, and
    at::vec's portable vectors). These flags are part of :func:`extension_name`, so a build made
    for one CPU is never loaded on a CPU without those instructions: that one builds its own.
    ``CPU_CAPABILITY`` names at::vec's inline namespace; ours is our own, so no inline function of
    ours can stand in for one of libtorch's or the other way round."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=torch_bn_avx2"]
    return []


CFLAGS = ["-O3", *cpu_flags()]


def extension_name() -> str:
    """The extension's name: one build per version of the source, the flags, torch and Python, so
    that worktrees with different sources never share a build and a build found is this one."""
    key = [SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(),
           f"{sys.version_info.major}.{sys.version_info.minor} {platform.machine()}".encode()]
    return "torch_bn_cpp_" + hashlib.sha256(b"\0".join(key)).hexdigest()[:12]


def build_directory() -> Path:
    """Where the build lives: torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default
    ~/.cache/torch_extensions), torch_bn/<extension name>."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return Path(root) / "torch_bn" / extension_name()


def _build():
    name, folder = extension_name(), build_directory()
    library = folder / f"{name}.so"  # the name cpp_extension.load gives a first build in a process
    if library.is_file():
        # Built before: load it directly, without cpp_extension's checks (a ninja run and a
        # compiler probe, about 0.1 s, which would land in the first training step).
        try:
            torch.ops.load_library(str(library))
            return torch.ops.torch_bn_cpp.batch_norm_train.default
        except OSError:  # e.g. a build interrupted while linking: let cpp_extension redo it
            pass
    # Importing cpp_extension logs a warning about CUDA_HOME on CPU-only machines; it is not ours
    # to show, the build needs no CUDA.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(folder),
                       is_python_module=False, verbose=False)
    return torch.ops.torch_bn_cpp.batch_norm_train.default


def op():
    """``torch.ops.torch_bn_cpp.batch_norm_train.default``, built on first call; None where it
    is switched off (``ENABLED``) or cannot be built (then one RuntimeWarning says why and what
    to do)."""
    global _op
    if not ENABLED:
        return None
    if _op is None:
        try:
            _op = _build()
        except Exception as e:  # no compiler or ninja, a failed build, a load error
            warnings.warn(
                f"torch_bn: the compiled CPU op cannot be built ({type(e).__name__}: {str(e).strip()[:300]}); "
                f"small CPU inputs take the Python path, which is correct but slower per call. "
                f"Install g++ and ninja (pip install ninja) for the fast path, or set TORCH_BN_CPP=0 "
                f"to skip the build", RuntimeWarning, stacklevel=2)
            _op = False
    return _op or None
