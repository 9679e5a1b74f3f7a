"""Helpers shared by the tests: a float64 batch-norm reference, torch_bn/nn module pairs, and a
tiny CIFAR-10 folder in torchvision's pickle layout."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import torch_bn


def float64_reference(x, weight, bias, eps):
    """Batch norm straight from its definition, in float64 (mean, then centred variance)."""
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


PAIRS = {1: (torch_bn.BatchNorm1d, nn.BatchNorm1d), 2: (torch_bn.BatchNorm2d, nn.BatchNorm2d)}


def make_pair(kind, c, dtype=torch.float64, **kwargs):
    ours_cls, theirs_cls = PAIRS[kind]
    backward = kwargs.pop("backward", "closed_form")
    ours = ours_cls(c, dtype=dtype, backward=backward, **kwargs)
    theirs = theirs_cls(c, dtype=dtype, **kwargs)
    if ours.affine:  # non-trivial affine parameters, identical in both
        with torch.no_grad():
            ours.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=dtype))
            theirs.weight.copy_(ours.weight)
            if ours.bias is not None:
                ours.bias.copy_(torch.linspace(-1.0, 1.0, c, dtype=dtype))
                theirs.bias.copy_(ours.bias)
    return ours, theirs


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


def float64_inputs(shape, affine: bool, seed: int = 0):
    """x (shape, away from zero), weight and bias (or None) requiring grad, and running mean and
    variance, all float64 from one seeded generator: the inputs of the gradient checks."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64) + 2).requires_grad_()
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    rm = torch.randn(c, generator=g, dtype=torch.float64)
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, rm, rv


class Interrupt(Exception):
    """Raised by :func:`crash_after_first_save` to simulate a killed training run."""


def crash_after_first_save(monkeypatch, trainer_cls, launch) -> None:
    """Run launch() with trainer_cls._save raising Interrupt right after it writes the first
    checkpoint (as a run killed there), then restore _save."""
    original_save = trainer_cls._save

    def save_then_crash(self):
        original_save(self)
        raise Interrupt

    monkeypatch.setattr(trainer_cls, "_save", save_then_crash)
    with pytest.raises(Interrupt):
        launch()
    monkeypatch.setattr(trainer_cls, "_save", original_save)
