"""torch_bn: batch normalization from first principles, a drop-in for PyTorch's.

The library needs only torch (Triton, where installed, for the CUDA kernels). The CIFAR-10
application that trains with it is the separate package ``cifar_bn``.
"""
from . import dispatch, func, functional, ops
from .dispatch import use_path
from .function import BatchNormFunction
from .ghost import GhostBatchNormFunction
from .masked import MaskedBatchNormFunction
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
                      GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d,
                      LazyBatchNorm3d, convert)
from .renorm import BatchRenormFunction
from .sync_batchnorm import DistributedDataParallel, SyncBatchNorm, convert_sync_batchnorm
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze, unfreeze
from .recalibrate import recalibrate
from .fold import fold
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

__all__ = ["BatchNormFunction", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d",
           "LazyBatchNorm2d", "LazyBatchNorm3d", "convert", "dispatch", "func", "functional", "ops", "use_path",
           "SyncBatchNorm", "convert_sync_batchnorm", "DistributedDataParallel",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormFunction",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormFunction",
           "MaskedBatchNormFunction",
           "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze",
           "recalibrate", "fold", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
