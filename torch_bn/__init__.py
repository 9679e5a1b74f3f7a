"""torch_bn: batch normalization from first principles, a drop-in for PyTorch's.

The training side (torch_bn.data, .training, .dashboard, .experiments) is imported on demand:
it pulls in torchvision, tensorboard and matplotlib.
"""
from . import functional, models, ops
from .function import BatchNormFunction
from .modules import BatchNorm1d, BatchNorm2d, convert

__all__ = ["BatchNormFunction", "BatchNorm1d", "BatchNorm2d", "convert", "functional", "models", "ops"]
