"""Test settings for the whole suite: hypothesis profile for CI, Triton's interpreter on CPU."""
import os

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
