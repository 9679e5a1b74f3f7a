"""The compiled CPU op ``torch.ops.torch_bn_cpp.batch_norm_train``: build on first use, or do without.

``csrc/batch_norm_cpu.cpp`` holds a whole training-mode layer (statistics, y, running-statistics
update, and the closed-form backward as a C++ autograd node) for small CPU inputs, where
torch_bn's Python path costs per-call overhead rather than arithmetic. :func:`op` compiles it
with ``torch.utils.cpp_extension`` (g++ and ninja, about a minute) the first time it is asked
for, and returns the op. The build is cached in torch's extensions folder (``TORCH_EXTENSIONS_DIR``,
default ~/.cache/torch_extensions) under a name that hashes the source and torch's version, so
later processes only load it. Where it cannot be built (no compiler, no ninja) :func:`op` warns
once and returns None, and torch_bn runs the same math through its Python paths;
``TORCH_BN_CPP=0`` switches the op off without trying.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "batch_norm_cpu.cpp"
# TORCH_BN_CPP=0 in the environment (or ENABLED = False) never builds or uses the compiled op.
ENABLED = os.environ.get("TORCH_BN_CPP", "1") != "0"

_op = None  # the op once loaded, False where it cannot be


def extension_name() -> str:
    """The extension's name: one build (and cache folder) per version of the source and of torch,
    so that worktrees with different sources never share a build."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return "torch_bn_cpp_" + digest


def _build():
    # Importing cpp_extension logs a warning about CUDA_HOME on CPU-only machines; it is not ours
    # to show, the build needs no CUDA.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    cpp_extension.load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=["-O3"],
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
