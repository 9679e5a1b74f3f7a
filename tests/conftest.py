"""Shared fixtures: a tiny CIFAR-10 folder in torchvision's pickle layout; Triton on CPU."""
import os
import pickle

import numpy as np
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

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_tiny_cifar10(root: str, per_batch: int = 30, num_test: int = 40, seed: int = 0) -> str:
    """Write cifar-10-batches-py/ under root with 5 training batches and a test batch of random
    images whose mean colour depends on the label (so a model can learn something)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def batch(n, name):
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 200, (n, 3072)) + 5 * labels[:, None]
        return {"batch_label": name, "labels": labels.tolist(), "data": data.astype(np.uint8),
                "filenames": [f"img_{name}_{i}.png" for i in range(n)]}

    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per_batch, f"training batch {i} of 5"), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(num_test, "testing batch 1 of 1"), f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> str:
    """Root folder of a tiny CIFAR-10 copy: 150 training images, 40 test images."""
    return write_tiny_cifar10(str(tmp_path_factory.mktemp("cifar")))
