"""The compiled CPU ops ``torch.ops.torch_bn_cpp.batch_norm_forward`` / ``batch_norm_backward`` (and
ghost batch norm's ``ghost_batch_norm_forward`` / ``ghost_batch_norm_backward``): built on first
use (or ahead of time by ``python -m torch_bn.build``), or done without.

``csrc/`` holds the C++ bodies of :class:`torch_bn.function.BatchNormFunction` (and of
:class:`torch_bn.ghost.GhostBatchNormFunction`) on CPU: ``ops.cpp`` (the torch.library schemas,
input checks and CPU implementations; the fake ones are registered here), ``kernels.cpp`` (the
loops, behind ``kernels.h``), ``outputs.cpp`` (the memory of large outputs: a cache of freed
buffers, see :func:`output_cache_info`) and ``bindings.cpp`` (typed Python bindings that call the
ops through the dispatcher without torch.ops' argument boxing, see :func:`op`). There is no C++
autograd node: the Python Function calls the forward op in its forward and the backward op in its
backward. :func:`op` compiles the library with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja; about a minute on two cores) the first time it is asked for, saying so on stderr, and
returns the ops. The build is kept in torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions) under torch_bn/, named by a hash of the sources, the flags and the
torch and Python versions, so later processes load it directly. Processes that start at once with
an empty cache (torchrun ranks, parallel test workers) take an OS file lock in that folder: one
builds, the others wait and load its result.
Where the library cannot be built (no compiler, no ninja) :func:`op` warns once and returns None,
and torch_bn runs the same math through its Python paths; ``TORCH_BN_CPP=0`` switches the ops off
without trying.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "ops.cpp", CSRC / "kernels.cpp", CSRC / "outputs.cpp", CSRC / "bindings.cpp"]
HEADERS = [CSRC / "kernels.h", CSRC / "outputs.h"]
# TORCH_BN_CPP=0 in the environment (or ENABLED = False) never builds or uses the compiled ops.
ENABLED = os.environ.get("TORCH_BN_CPP", "1") != "0"
BUILD_SECONDS = "about a minute"  # what the start-of-build line promises (2 cores, every source)

_ops = None  # the ops once loaded, False where they cannot be


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


def parallel_flags() -> list[str]:
    """OpenMP, where PyTorch's own CPU threads are OpenMP's (``torch.backends.openmp``, the Linux
    wheels): ``at::parallel_for`` is an inline template whose threads exist only when the code that
    includes it is compiled with ``-fopenmp`` (otherwise it runs the whole range on the calling
    thread). The OpenMP runtime is the one PyTorch has loaded (libgomp, a dependency of
    libtorch_cpu), so ``torch.set_num_threads`` sets our thread count too."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []


CFLAGS = ["-O3", *cpu_flags(), *parallel_flags()]


def extension_name() -> str:
    """The extension's name: one build per version of the sources, the flags, torch and Python, so
    that worktrees with different sources never share a build and a build found is this one."""
    key = [*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(CFLAGS).encode(), torch.__version__.encode(),
           f"{sys.version_info.major}.{sys.version_info.minor} {platform.machine()}".encode()]
    return "torch_bn_cpp_" + hashlib.sha256(b"\0".join(key)).hexdigest()[:12]


def build_directory() -> Path:
    """Where the build lives: torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default
    ~/.cache/torch_extensions), torch_bn/<extension name>."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return Path(root) / "torch_bn" / extension_name()


def library_path() -> Path:
    """The built library: the name cpp_extension.load gives a first build in a process."""
    return build_directory() / f"{extension_name()}.so"


def _say(message: str) -> None:
    print(f"torch_bn: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive OS lock on folder/torch_bn.lock, held while a process builds or loads the
    library: the kernel drops it if the holder dies, so a killed build blocks no one. (No lock
    where fcntl is missing, as on Windows.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / "torch_bn.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is building the compiled CPU op in {folder}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the kernels lay out y and dx (csrc/kernels.h): channels-last
    (3d) when x is channels-last (3d)-contiguous, else contiguous."""
    if x.dim() in (4, 5) and x.shape[1] > 0:
        fmt = torch._prims_common.suggest_memory_format(x)
        if fmt != torch.contiguous_format and x.is_contiguous(memory_format=fmt):
            return torch.empty_like(x, memory_format=fmt)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_fake(x: torch.Tensor) -> None:
    torch._check(x.dim() >= 2 and x.is_floating_point(),
                 lambda: f"torch_bn_cpp: batch_norm expects floating-point (N, C, *) input, got {x.dtype} {tuple(x.shape)}")


def _forward_fake(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    _check_fake(x)
    stats = x.new_empty(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
    return _output_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


def _backward_fake(dy, x, weight, mean, rstd, need_dx):
    _check_fake(x)
    stats = x.new_empty(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
    return _output_like(x) if need_dx else x.new_empty(0), stats, torch.empty_like(stats)


def _ghost_forward_fake(x, weight, bias, virtual_batch_size, eps):
    _check_fake(x)
    chunks = -(-x.shape[0] // min(virtual_batch_size, x.shape[0]))
    stats = x.new_empty((chunks, x.shape[1]), dtype=torch.promote_types(x.dtype, torch.float32))
    return _output_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


def _ghost_backward_fake(dy, x, weight, mean, rstd, virtual_batch_size, need_dx):
    return _backward_fake(dy, x, weight, mean, rstd, need_dx)  # dweight, dbias (C,) summed over ghost batches


_fakes_registered = False


def _loaded(library: Path) -> SimpleNamespace:
    """The loaded ops, with their fake implementations registered (once per process): ``forward``,
    ``backward``, ``ghost_forward``, ``ghost_backward`` are the typed bindings (csrc/bindings.cpp)
    torch_bn calls, and ``forward_op`` ... ``ghost_backward_op`` the same ops as torch.ops
    overloads, for torch.library's tools (opcheck, fake tensors)."""
    global _fakes_registered
    if not _fakes_registered:
        torch.library.register_fake("torch_bn_cpp::batch_norm_forward")(_forward_fake)
        torch.library.register_fake("torch_bn_cpp::batch_norm_backward")(_backward_fake)
        torch.library.register_fake("torch_bn_cpp::ghost_batch_norm_forward")(_ghost_forward_fake)
        torch.library.register_fake("torch_bn_cpp::ghost_batch_norm_backward")(_ghost_backward_fake)
        _fakes_registered = True
    # The same library is a Python module too (PYBIND11_MODULE, named as the extension).
    spec = importlib.util.spec_from_file_location(library.stem, library)
    bindings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bindings)
    ns = torch.ops.torch_bn_cpp
    return SimpleNamespace(forward=bindings.batch_norm_forward, backward=bindings.batch_norm_backward,
                           ghost_forward=bindings.ghost_batch_norm_forward,
                           ghost_backward=bindings.ghost_batch_norm_backward,
                           forward_op=ns.batch_norm_forward.default, backward_op=ns.batch_norm_backward.default,
                           ghost_forward_op=ns.ghost_batch_norm_forward.default,
                           ghost_backward_op=ns.ghost_batch_norm_backward.default)


def build() -> tuple[SimpleNamespace, Path, float | None]:
    """Load the library, building it first where no build is found; raise where that fails.

    Returns the ops, the library's path and the build's duration in seconds (None when an
    existing build was loaded). A build prints one line on stderr when it starts (what, about how
    long, where, how to skip) and one when it ends.
    """
    name, folder, library = extension_name(), build_directory(), library_path()
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        if library.is_file():
            # Built before: load it directly, without cpp_extension's checks (a ninja run and a
            # compiler probe, about 0.1 s, which would land in the first training step).
            try:
                torch.ops.load_library(str(library))
                return _loaded(library), library, None
            except OSError:  # e.g. a build killed while linking: build it again
                library.unlink()
        _say(f"building the compiled CPU op (torch_bn/csrc, once per version, {BUILD_SECONDS}) in {folder}; "
             f"set TORCH_BN_CPP=0 to skip it, or run python -m torch_bn.build beforehand")
        start = time.perf_counter()
        # Importing cpp_extension logs a warning about CUDA_HOME on CPU-only machines; it is not
        # ours to show, the build needs no CUDA.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            log.setLevel(level)
        try:
            cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                               extra_include_paths=[str(CSRC)], build_directory=str(folder),
                               is_python_module=False, verbose=False)
        except BaseException as e:
            _say(f"the compiled CPU op's build failed after {time.perf_counter() - start:.0f} s "
                 f"({type(e).__name__})")
            raise
        seconds = time.perf_counter() - start
        _say(f"built the compiled CPU op in {seconds:.0f} s: {library}")
        return _loaded(library), library, seconds


def op() -> SimpleNamespace | None:
    """The compiled ops, built on first call: ``.forward``, ``.backward``, ``.ghost_forward`` and
    ``.ghost_backward`` (torch_bn_cpp::batch_norm_forward ... through typed bindings, which call
    the dispatcher as torch.ops does, a few microseconds a call sooner) and the same four as
    torch.ops overloads, ``.forward_op`` (``torch.ops.torch_bn_cpp.batch_norm_forward.default``)
    and so on; None where they are switched off (``ENABLED``) or cannot be built (then one
    RuntimeWarning says why and what to do)."""
    global _ops
    if not ENABLED:
        return None
    if _ops is None:
        try:
            _ops = build()[0]
        except Exception as e:  # no compiler or ninja, a failed build, a load error
            warnings.warn(
                f"torch_bn: the compiled CPU op cannot be built ({type(e).__name__}: {str(e).strip()[:300]}); "
                f"CPU inputs take torch_bn's tensor-op paths, which are correct but slower per call. "
                f"Install a C++ compiler (g++) and ninja (pip install ninja) for the fast path, or set "
                f"TORCH_BN_CPP=0 to skip the build", RuntimeWarning, stacklevel=2)
            _ops = False
    return _ops or None


def output_cache_info() -> dict[str, int]:
    """The compiled kernels' cache of large output buffers (``csrc/outputs.cpp``): outputs (y, dx)
    of 4 MiB and more take memory that earlier outputs freed, already mapped, instead of fresh
    memory whose every page faults in on first write. Returns ``cached_bytes`` (held in free
    buffers), ``limit_bytes`` (the most it holds; 1 GiB unless set), ``hits`` and ``misses``
    (outputs served from a held buffer, from new memory); zeros where the op is not available."""
    values = torch.ops.torch_bn_cpp.output_cache_info() if op() is not None else [0, 0, 0, 0]
    return dict(zip(("cached_bytes", "limit_bytes", "hits", "misses"), values))


def set_output_cache_limit(nbytes: int) -> int:
    """Let the output cache hold at most ``nbytes`` of free buffers (0: none, each freed output
    goes back to the system at once), freeing held buffers down to it; returns the bytes freed.
    The limit is the process's (every thread's) and lasts until set again."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_output_cache_limit takes a number of bytes >= 0, got {nbytes!r}")
    return torch.ops.torch_bn_cpp.set_output_cache_limit(nbytes) if op() is not None else 0


def empty_output_cache() -> int:
    """Give every held output buffer back to the system (as ``torch.cuda.empty_cache`` does for
    CUDA's cache), keeping the limit; returns the bytes freed."""
    return torch.ops.torch_bn_cpp.empty_output_cache() if op() is not None else 0
