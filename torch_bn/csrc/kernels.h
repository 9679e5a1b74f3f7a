// The compiled CPU kernels' interface: the boundary between the op layer (ops.cpp: schemas,
// checks, the torch.library registrations) and the loops (kernels.cpp). Agreed between issue 17
// (the op layer) and issue 18 (faster loops behind the same declarations).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace torch_bn_cpp {

// Training-mode forward.
// x: (N, C, *) CPU floating tensor (float, double, half, bfloat16), any strides or layout.
// weight, bias: undefined, or (C,) contiguous tensors in the op-math dtype
//   (at::toOpMathType(x.scalar_type()): float for half/bfloat16/float, double for double).
// Returns y (x's dtype and shape; channels_last memory format when x is channels_last- (or
// channels_last_3d-) contiguous, else contiguous), and per channel (C,) in op-math dtype:
// mean, biased var, rstd = 1 / sqrt(var + eps). Statistics accumulate in double (or an
// equally accurate scheme) and are two-pass or equivalently accurate: constant features give
// exactly beta; data far from zero (1e6 + randn) keeps its variance.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_kernel(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// Closed-form training-mode backward (docs/derivation.md).
// dy: like x (any strides); x: the forward's input; weight: undefined or (C,) op-math;
// mean, rstd: (C,) op-math from forward_kernel.
// Returns dx (x's dtype, laid out as forward_kernel lays out y; undefined when !need_dx),
// dweight = sum(dy * xhat) and dbias = sum(dy), (C,) in op-math dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool need_dx);

// Ghost batch norm: forward_kernel on each ghost batch of x, the consecutive blocks of
// virtual_batch_size samples along dim 0 (the last may be smaller), each with its own statistics,
// read and written in place (a ghost batch of contiguous or channels-last x is a block of memory).
// Returns y (laid out as forward_kernel's) and mean, biased var, rstd (ghost batches, C) in op-math.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_forward_kernel(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t virtual_batch_size,
    double eps);

// Its closed-form backward: backward_kernel on each ghost batch, with its (ghost batches, C) mean
// and rstd; dweight and dbias (C,) are the sums over the ghost batches.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_backward_kernel(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t virtual_batch_size, bool need_dx);

}  // namespace torch_bn_cpp
