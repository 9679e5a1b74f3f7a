"""The notebook's fully connected network: (Linear -> norm -> ReLU) x L, then a final Linear."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

import torch_bn
from torch_bn import BatchNorm1d, BatchNorm2d

from .config import RENORM_DMAX, RENORM_RMAX, canonical_norm, check_norm_options


def norm_layer(norm: str, features: int, *, virtual_batch_size: int | None = None,
               renorm_warmup: int = 0) -> nn.Module | None:
    """The layer ``norm`` (a name in NORMS) puts after a hidden Linear of ``features`` outputs (None
    for "none"); virtual_batch_size is ghost batch norm's chunk size, renorm_warmup the steps batch
    renormalization runs as plain batch norm first."""
    if norm == "torch_bn":
        return BatchNorm1d(features)
    if norm == "nn":
        return nn.BatchNorm1d(features)
    if norm == "renorm":
        return torch_bn.BatchRenorm1d(features, rmax=RENORM_RMAX, dmax=RENORM_DMAX, warmup_steps=renorm_warmup)
    if norm == "ghost":
        if virtual_batch_size is None:
            raise ValueError("ghost batch norm needs a virtual batch size (--virtual-batch-size V)")
        return torch_bn.GhostBatchNorm1d(features, virtual_batch_size)
    if norm == "layernorm":
        return nn.LayerNorm(features)
    return None


class MLP(nn.Module):
    """Multi-layer perceptron for flattened images, with optional batch norm per hidden layer.

    Args:
        input_dim: features per input (3072 for flattened CIFAR-10 images).
        hidden_dims: width of each hidden layer (each positive).
        num_classes: logits out.
        norm: "torch_bn" (torch_bn.BatchNorm1d), "nn" (nn.BatchNorm1d; "torch" is an alias), "none",
            "renorm" (torch_bn.BatchRenorm1d), "ghost" (torch_bn.GhostBatchNorm1d) or "layernorm"
            (nn.LayerNorm over each sample's features).
        weight_scale: if given, every Linear weight ~ N(0, weight_scale^2) and biases 0 (the
            notebook's init); None keeps PyTorch's default init.
        dropout: probability after each ReLU, in [0, 1) (0: no dropout layers).
        virtual_batch_size: ghost batch norm's chunk size (norm "ghost" only, at least 2).
        renorm_warmup: steps of plain batch norm before batch renormalization corrects with the
            running statistics (norm "renorm" only).

    Shape:
        Input (N, input_dim) or images (N, C, H, W), flattened; output logits (N, num_classes).

    Examples:
        >>> model = MLP(3072, (100, 100), 10, norm="torch_bn", weight_scale=2e-2)
        >>> model(torch.randn(50, 3, 32, 32)).shape
        torch.Size([50, 10])
    """

    def __init__(self, input_dim: int = 3072, hidden_dims: Sequence[int] = (100,) * 5, num_classes: int = 10,
                 norm: str = "torch_bn", weight_scale: float | None = None, dropout: float = 0.0, *,
                 virtual_batch_size: int | None = None, renorm_warmup: int = 0) -> None:
        super().__init__()
        norm = canonical_norm(norm)
        check_norm_options(norm, virtual_batch_size, renorm_warmup)
        if not hidden_dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in hidden_dims):
            raise ValueError(f"hidden_dims must be one or more positive integers, got {tuple(hidden_dims)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout is a probability in [0, 1), got {dropout}")
        if weight_scale is not None and not weight_scale > 0:
            raise ValueError(f"weight_scale must be positive (or None for PyTorch's init), got {weight_scale}")
        layers: list[nn.Module] = []
        dims = [input_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(d_in, d_out))
            layer = norm_layer(norm, d_out, virtual_batch_size=virtual_batch_size, renorm_warmup=renorm_warmup)
            if layer is not None:
                layers.append(layer)
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
    """The normalization layers of ``model`` (torch_bn's and torch.nn's batch norms, batch
    renormalization, ghost batch norm, layer norm), in order."""
    return [m for m in model.modules() if isinstance(m, _NORMS)]


class HiddenLayer(NamedTuple):
    """One hidden layer of a model: its Linear (or conv), the norm after it (None without) and
    its activation."""

    linear: nn.Module
    norm: nn.Module | None
    activation: nn.Module


_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
# Batch norms (torch_bn's, its renorm and ghost layers among them, subclass nn's) and layer norm.
_NORMS = (nn.modules.batchnorm._BatchNorm, BatchNorm1d, BatchNorm2d, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU)


def hidden_layers(model: nn.Module) -> list[HiddenLayer]:
    """The hidden layers of ``model`` in forward order: each Linear/conv, the batch norm right
    after it if any, and the activation that ends it (found by module order, which is the
    forward order for Sequential models such as MLP). A Linear with no activation after it (the
    output layer) is not a hidden layer."""
    layers: list[HiddenLayer] = []
    linear = norm = None
    for m in model.modules():
        if isinstance(m, _WEIGHTED):
            linear, norm = m, None
        elif linear is not None and norm is None and isinstance(m, _NORMS):
            norm = m
        elif linear is not None and isinstance(m, _ACTIVATIONS):
            layers.append(HiddenLayer(linear, norm, m))
            linear = norm = None
    return layers


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """Every Linear and conv layer of ``model`` in module order (the hidden ones, then the output)."""
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)]


@torch.no_grad()
def activation_stds(model: nn.Module, x: Tensor) -> list[float]:
    """Standard deviation of each hidden layer's output (after its activation) for the batch x,
    with batch norm on batch statistics (as in training) and dropout off. The model's mode and
    buffers (running statistics) are left as they were."""
    outputs: list[Tensor] = []
    handles = [layer.activation.register_forward_hook(lambda m, i, out: outputs.append(out))
               for layer in hidden_layers(model)]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(buffers, strict=False)
        model.train(was_training)
    return [out.float().std().item() for out in outputs]
