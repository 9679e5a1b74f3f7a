// torch_bn's compiled CPU ops, torch.ops.torch_bn_cpp.batch_norm_forward / batch_norm_backward
// and ghost_batch_norm_forward / ghost_batch_norm_backward (ghost batch norm: each ghost batch of
// samples with its own statistics): the schemas, the input checks, and the CPU implementations,
// which call the loops of kernels.cpp (interface: kernels.h); and output_cache_info /
// set_output_cache_limit / empty_output_cache, for the cache of large outputs' memory (outputs.cpp).
//
// There is no autograd node here: the ops are the bodies of torch_bn's Python autograd Function
// (torch_bn/function.py, BatchNormFunction), which calls batch_norm_forward in its forward and
// batch_norm_backward in its backward; torch_bn/ghost.py's GhostBatchNormFunction likewise calls
// the ghost ops. torch_bn/cpp.py builds and loads this library;
// torch_bn/dispatch.py's choose_path decides when these ops run.
//
// The fake implementations (outputs' shapes, dtypes and strides without computing them, for
// FakeTensor, torch.compile and torch.library.opcheck) are registered from Python by
// torch_bn/cpp.py with torch.library.register_fake: they handle symbolic shapes there.

#include "kernels.h"
#include "outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace torch_bn_cpp {
namespace {

using at::Tensor;

// An optional tensor argument that is given: present and defined.
bool given(const std::optional<Tensor>& v) { return v.has_value() && v->defined(); }

void check_input(const char* op, const Tensor& x, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 2, op, ": batch_norm expects input of shape (N, C) or (N, C, *), got ", x.dim(),
              "D input of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": batch_norm expects a floating-point input, got ",
              x.scalar_type(), "; convert it first, e.g. input.float()");
  const int64_t c = x.size(1);
  for (const auto* v : {&weight, &bias}) {
    TORCH_CHECK(!given(*v) || (*v)->numel() == c, op, ": a per-channel tensor has ",
                (*v)->numel(), " elements but the input has ", c, " channels (dim 1) in shape ", x.sizes());
  }
  const int64_t m = c == 0 ? x.size(0) : x.numel() / c;
  TORCH_CHECK(m > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
}

void check_cpu(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, " runs on CPU tensors, got ", x.device(),
              "; call torch_bn.functional.batch_norm, which picks the path for the device");
}

// A (C,) vector as the kernels take it: contiguous, in the op-math dtype; undefined when absent.
Tensor channel_vector(const std::optional<Tensor>& v, at::ScalarType dtype) {
  return given(v) ? v->to(dtype).contiguous() : Tensor();
}

// running = lerp(running, factor * batch, momentum), computed as ATen's lerp_ computes it (in the
// buffer's dtype, the weight's two branches) after batch * factor in the op-math dtype, as the
// Python paths do with tensor ops; a loop over C values when the buffer is a contiguous float or
// double vector in the op-math dtype (the usual case: no dispatch per op), else those tensor ops.
void update_running(Tensor& running, const Tensor& batch, double factor, double momentum) {
  if (!(running.is_contiguous() && running.scalar_type() == batch.scalar_type() &&
        (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble))) {
    running.lerp_((factor == 1.0 ? batch : batch.mul(factor)).to(running.scalar_type()), momentum);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "torch_bn_cpp::update_running", [&] {
    scalar_t* r = running.mutable_data_ptr<scalar_t>();
    const scalar_t* b = batch.const_data_ptr<scalar_t>();
    const scalar_t f = static_cast<scalar_t>(factor), w = static_cast<scalar_t>(momentum);
    for (int64_t c = 0; c < running.numel(); ++c) {
      const scalar_t end = factor == 1.0 ? b[c] : b[c] * f;
      r[c] = std::abs(w) < scalar_t(0.5) ? r[c] + w * (end - r[c]) : end - (end - r[c]) * (scalar_t(1) - w);
    }
  });
}

// The rest of torch_bn.functional.check_input's rules for a training-mode call, so that a call
// these checks pass is one that check_input passes too (torch_bn.functional.batch_norm runs them
// here, in C++, and check_input only to say what is wrong): eps positive; both running statistics
// or neither; weight, bias and the running statistics in one dtype, the input's or, for
// float16/bfloat16 input, float32 (PyTorch's rule); empty input refused (the Python paths give it
// an empty output). (Running statistics that require grad are refused in
// grad mode only, which is not known here: batch_norm checks that in Python.)
void check_training_arguments(const char* op, const Tensor& x, const std::optional<Tensor>& weight,
                              const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                              const std::optional<Tensor>& running_var, double eps) {
  TORCH_CHECK(eps > 0.0, op, ": batch_norm eps must be positive during training, got ", eps);
  TORCH_CHECK(given(running_mean) == given(running_var), op,
              ": running_mean and running_var must both be given or neither");
  TORCH_CHECK(x.numel() > 0, op, ": batch_norm got an empty input of shape ", x.sizes());
  const auto acc = at::toOpMathType(x.scalar_type());
  std::optional<at::ScalarType> common;
  for (const auto* v : {&weight, &bias, &running_mean, &running_var}) {
    if (!given(*v)) continue;
    const auto dtype = (*v)->scalar_type();
    if (!common) common = dtype;
    TORCH_CHECK(dtype == *common && (dtype == x.scalar_type() || dtype == acc), op, ": weight, bias, running_mean ",
                "and running_var must all be ", x.scalar_type(), acc != x.scalar_type() ? " (or all float)" : "",
                " for ", x.scalar_type(), " input, got one in ", dtype);
  }
}

// The forward, then (where given) the running statistics move towards the batch's, as in
// F.batch_norm: running = lerp(running, batch, momentum), with the unbiased batch variance.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(const Tensor& x, const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias,
                                                       const std::optional<Tensor>& running_mean,
                                                       const std::optional<Tensor>& running_var,
                                                       const std::optional<Tensor>& num_batches_tracked,
                                                       double momentum, double eps) {
  constexpr const char* op = "torch_bn_cpp::batch_norm_forward";
  check_cpu(op, x);
  check_input(op, x, weight, bias);
  for (const auto* v : {&running_mean, &running_var}) {
    TORCH_CHECK(!given(*v) || (*v)->numel() == x.size(1), op, ": a running statistic has ",
                (*v)->numel(), " elements but the input has ", x.size(1), " channels (dim 1)");
  }
  check_training_arguments(op, x, weight, bias, running_mean, running_var, eps);
  const bool count = given(num_batches_tracked);
  TORCH_CHECK(!count || (num_batches_tracked->numel() == 1 && num_batches_tracked->device().is_cpu()), op,
              ": num_batches_tracked must be a one-element CPU counter, got ", num_batches_tracked->sizes(), " on ",
              num_batches_tracked->device());
  const auto acc = at::toOpMathType(x.scalar_type());
  auto result = forward_kernel(x, channel_vector(weight, acc), channel_vector(bias, acc), eps);
  const Tensor &mean = std::get<1>(result), &var = std::get<2>(result);
  if (given(running_mean)) {
    Tensor rm = *running_mean;
    update_running(rm, mean, 1.0, momentum);
  }
  if (given(running_var)) {
    Tensor rv = *running_var;
    const double m = static_cast<double>(x.numel() / x.size(1));
    update_running(rv, var, m / (m - 1), momentum);
  }
  if (count) {  // the module's batch counter (an int64 scalar as nn's), one more batch
    Tensor t = *num_batches_tracked;
    if (t.scalar_type() == at::kLong) {
      *t.mutable_data_ptr<int64_t>() += 1;
    } else {
      t.add_(1);
    }
  }
  return result;
}

// The gradient dy has the input's shape and dtype.
void check_gradient(const char* op, const Tensor& dy, const Tensor& x) {
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": the gradient's shape ", dy.sizes(), " differs from the input's ",
              x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": the gradient's dtype ", dy.scalar_type(),
              " differs from the input's ", x.scalar_type());
}

void check_backward(const char* op, const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd) {
  check_gradient(op, dy, x);
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const Tensor* v : {&mean, &rstd}) {
    TORCH_CHECK(v->dim() == 1 && v->numel() == x.size(1) && v->scalar_type() == acc, op,
                ": mean and rstd must be (C,) in ", acc, " (from batch_norm_forward), got ", v->sizes(), " in ",
                v->scalar_type());
  }
}

// dx is an empty (0,) tensor when need_dx is false (a schema's Tensor output is always a tensor).
std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                                const Tensor& mean, const Tensor& rstd, bool need_dx) {
  constexpr const char* op = "torch_bn_cpp::batch_norm_backward";
  check_cpu(op, x);
  check_cpu(op, dy);
  check_input(op, x, weight, std::nullopt);
  check_backward(op, dy, x, mean, rstd);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto [dx, dweight, dbias] =
      backward_kernel(dy, x, channel_vector(weight, acc), mean.contiguous(), rstd.contiguous(), need_dx);
  return {need_dx ? dx : at::empty({0}, x.options()), dweight, dbias};
}

// Ghost batch norm: every ghost batch of virtual_batch_size samples (the last may be smaller) needs
// more than one value per channel, as batch norm does.
void check_ghost(const char* op, const Tensor& x, int64_t virtual_batch_size) {
  TORCH_CHECK(virtual_batch_size >= 1, op, ": virtual_batch_size must be a positive number of samples, got ",
              virtual_batch_size);
  const int64_t n = x.size(0), per_sample = n == 0 || x.size(1) == 0 ? 1 : x.numel() / (n * x.size(1));
  const int64_t v = std::min(virtual_batch_size, n), last = n % v == 0 ? v : n % v;
  TORCH_CHECK(last * per_sample > 1, "Expected more than 1 value per channel when training: ghost batch norm with ",
              "virtual_batch_size=", virtual_batch_size, " cuts input of size ", x.sizes(), " into ghost batches ",
              "with ", last * per_sample, " value per channel");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_forward_cpu(const Tensor& x, const std::optional<Tensor>& weight,
                                                             const std::optional<Tensor>& bias,
                                                             int64_t virtual_batch_size, double eps) {
  constexpr const char* op = "torch_bn_cpp::ghost_batch_norm_forward";
  check_cpu(op, x);
  check_input(op, x, weight, bias);
  check_ghost(op, x, virtual_batch_size);
  const auto acc = at::toOpMathType(x.scalar_type());
  return ghost_forward_kernel(x, channel_vector(weight, acc), channel_vector(bias, acc),
                              std::min(virtual_batch_size, x.size(0)), eps);
}

std::tuple<Tensor, Tensor, Tensor> ghost_backward_cpu(const Tensor& dy, const Tensor& x,
                                                      const std::optional<Tensor>& weight, const Tensor& mean,
                                                      const Tensor& rstd, int64_t virtual_batch_size, bool need_dx) {
  constexpr const char* op = "torch_bn_cpp::ghost_batch_norm_backward";
  check_cpu(op, x);
  check_cpu(op, dy);
  check_input(op, x, weight, std::nullopt);
  check_ghost(op, x, virtual_batch_size);
  check_gradient(op, dy, x);
  const int64_t v = std::min(virtual_batch_size, x.size(0)), chunks = (x.size(0) + v - 1) / v;
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == chunks && t->size(1) == x.size(1) && t->scalar_type() == acc, op,
                ": mean and rstd must be (ghost batches, C) = (", chunks, ", ", x.size(1), ") in ", acc,
                " (from ghost_batch_norm_forward), got ", t->sizes(), " in ", t->scalar_type());
  }
  auto [dx, dweight, dbias] = ghost_backward_kernel(dy, x, channel_vector(weight, acc), mean, rstd, v, need_dx);
  return {need_dx ? dx : at::empty({0}, x.options()), dweight, dbias};
}

std::vector<int64_t> output_cache_info_op() {
  const OutputCacheInfo info = output_cache_info();
  return {info.cached_bytes, info.limit_bytes, info.hits, info.misses};
}

}  // namespace
}  // namespace torch_bn_cpp

TORCH_LIBRARY(torch_bn_cpp, m) {
  // y, mean, biased var, rstd = 1 / sqrt(var + eps); the statistics (C,) in the op-math dtype.
  // running_mean / running_var, where given, are updated in place (lerp by momentum), and the
  // counter num_batches_tracked, where given, counts one more batch (the modules' bookkeeping in
  // the same call: one tensor op fewer per layer and step).
  m.def("batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float momentum, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // dx (empty when not need_dx), dweight = sum(dy * xhat), dbias = sum(dy).
  m.def("batch_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
  // Ghost batch norm: y, and mean, biased var, rstd (ghost batches, C) in the op-math dtype.
  m.def("ghost_batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, int virtual_batch_size, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // dx (empty when not need_dx), dweight, dbias (C,) summed over the ghost batches.
  m.def("ghost_batch_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "int virtual_batch_size, bool need_dx) -> (Tensor, Tensor, Tensor)");
  // The large outputs' cache (outputs.cpp): [bytes held, limit, hits, misses]; and setting its
  // limit in bytes, which frees held buffers down to it and returns the bytes freed.
  m.def("output_cache_info() -> int[]", &torch_bn_cpp::output_cache_info_op);
  m.def("set_output_cache_limit(int bytes) -> int", &torch_bn_cpp::set_output_cache_limit);
  // Every held buffer back to the system, the limit kept; returns the bytes freed.
  m.def("empty_output_cache() -> int", &torch_bn_cpp::empty_output_cache);
}

TORCH_LIBRARY_IMPL(torch_bn_cpp, CPU, m) {
  m.impl("batch_norm_forward", &torch_bn_cpp::forward_cpu);
  m.impl("batch_norm_backward", &torch_bn_cpp::backward_cpu);
  m.impl("ghost_batch_norm_forward", &torch_bn_cpp::ghost_forward_cpu);
  m.impl("ghost_batch_norm_backward", &torch_bn_cpp::ghost_backward_cpu);
}
