"""torch_bn: batch normalization from first principles, a drop-in for PyTorch's."""
from . import functional, ops
from .function import BatchNormFunction
from .modules import BatchNorm1d, BatchNorm2d, convert

__all__ = ["BatchNormFunction", "BatchNorm1d", "BatchNorm2d", "convert", "functional", "ops"]
