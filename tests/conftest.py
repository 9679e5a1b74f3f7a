"""Test settings for the whole suite: hypothesis profile for CI, Triton's interpreter on CPU, and the
compiled ops as a fixture."""
import os

import pytest
import torch
from hypothesis import settings

# CI (CI=true) replays the same examples every run; locally hypothesis keeps exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernels are defined (first import of torch_bn.triton_kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def ops():
    """The compiled ops (torch_bn.cpp.op()), built here if no earlier test built them (once per
    source version); the test skips, saying why, under TORCH_BN_CPP=0."""
    from torch_bn import cpp

    if not cpp.ENABLED:
        pytest.skip("the compiled op is switched off by TORCH_BN_CPP=0")
    built = cpp.op()
    assert built is not None, "the compiled op could not be built (see the RuntimeWarning)"
    return built
