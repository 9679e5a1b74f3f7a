"""Build torch_bn's compiled CPU op ahead of time: ``python -m torch_bn.build``.

Otherwise the first CPU batch norm of a process builds it (once per version of the sources, torch
and Python) while training waits. Prints where the library is and how long the build took (or that
an existing build was found), and exits 0; where it cannot be built, prints why on stderr and
exits 1. The build goes to torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions), where every later process loads it; several processes may run this
(or start training) at once: one builds, the others wait for it.
"""
from __future__ import annotations

import sys
import time

from . import cpp


def main() -> int:
    start = time.perf_counter()
    try:
        _ops, library, seconds = cpp.build()
    except Exception as e:
        print(f"torch_bn: cannot build the compiled CPU op: {type(e).__name__}: {str(e).strip()[:2000]}\n"
              f"It needs a C++ compiler (g++ or clang++; the CXX environment variable picks one) and ninja "
              f"(pip install ninja). Without it torch_bn still runs, slower per call on CPU.", file=sys.stderr)
        return 1
    if seconds is None:
        print(f"torch_bn: the compiled CPU op is already built: {library} (ready after {time.perf_counter() - start:.2f} s)")
    else:  # the build's own lines on stderr said how long it took
        print(f"torch_bn: the compiled CPU op is ready: {library} (built in {seconds:.0f} s)")
    if not cpp.ENABLED:
        print("torch_bn: note: TORCH_BN_CPP=0 is set, so torch_bn will not use it until that is unset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
