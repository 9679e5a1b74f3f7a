"""The notebook's fully connected network: (Linear -> norm -> ReLU) x L, then a final Linear."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torch_bn import BatchNorm1d, BatchNorm2d

NORMS = ("torch_bn", "torch", "none")


class MLP(nn.Module):
    """Multi-layer perceptron for flattened images, with optional batch norm per hidden layer.

    norm: "torch_bn" (torch_bn.BatchNorm1d), "torch" (nn.BatchNorm1d) or "none".
    weight_scale: if given, every Linear weight ~ N(0, weight_scale^2) and biases 0 (the notebook's
    init); None keeps PyTorch's default init. dropout: probability after each ReLU (0: none).
    Input (N, input_dim) or images (N, C, H, W), flattened; output logits (N, num_classes).
    """

    def __init__(self, input_dim: int = 3072, hidden_dims: Sequence[int] = (100,) * 5, num_classes: int = 10,
                 norm: str = "torch_bn", weight_scale: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if weight_scale is not None and not weight_scale > 0:
            raise ValueError(f"weight_scale must be positive (or None for PyTorch's init), got {weight_scale}")
        layers: list[nn.Module] = []
        dims = [input_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(d_in, d_out))
            if norm == "torch_bn":
                layers.append(BatchNorm1d(d_out))
            elif norm == "torch":
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)
        if weight_scale is not None:
            for m in self.linears():
                nn.init.normal_(m.weight, std=weight_scale)
                nn.init.zeros_(m.bias)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.flatten(x, 1))


def l2_penalty(model: nn.Module, reg: float) -> Tensor:
    """The notebook's regularizer: 0.5 * reg * the sum of squared weights of every Linear and conv
    layer of ``model`` (biases and normalization parameters are not penalized)."""
    return 0.5 * reg * sum((m.weight ** 2).sum() for m in model.modules()
                           if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch-norm layers of ``model`` (torch_bn's and torch.nn's), in order."""
    return [m for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm1d, BatchNorm2d))]
