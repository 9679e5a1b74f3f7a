"""torch_bn: batch normalization from first principles, a drop-in for PyTorch's.

The library needs only torch (Triton, where installed, for the CUDA kernels). The CIFAR-10
application that trains with it is the separate package ``cifar_bn``.
"""
from . import func, functional, ops
from .function import BatchNormFunction
from .modules import BatchNorm1d, BatchNorm2d, convert

__all__ = ["BatchNormFunction", "BatchNorm1d", "BatchNorm2d", "convert", "func", "functional", "ops"]
