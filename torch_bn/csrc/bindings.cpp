// Typed Python bindings of the four ops of ops.cpp (batch_norm_forward / _backward and the ghost
// ones), which torch_bn's Python code calls: each calls its op through the dispatcher, unboxed,
// so every dispatch key torch.ops would reach (the CPU kernel, a Python dispatch mode, the
// profiler's record) is reached the same way, with the GIL released as torch.ops releases it. What
// is skipped is torch.ops' boxing of the Python arguments into a stack of IValues and of the
// results back: a few microseconds a call, which at the MLP's sizes is a tenth of a layer's
// forward + backward. torch_bn/cpp.py imports this module from the same library.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

// The op's typed handle, looked up once (loading the library registered the schemas).
template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Four forward(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
             const OptionalTensor& running_mean, const OptionalTensor& running_var,
             const OptionalTensor& num_batches_tracked, double momentum, double eps) {
  static const auto op = handle<Four(const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                     const OptionalTensor&, const OptionalTensor&, double, double)>(
      "torch_bn_cpp::batch_norm_forward");
  return op.call(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps);
}

Three backward(const Tensor& dy, const Tensor& x, const OptionalTensor& weight, const Tensor& mean,
               const Tensor& rstd, bool need_dx) {
  static const auto op = handle<Three(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                                      bool)>("torch_bn_cpp::batch_norm_backward");
  return op.call(dy, x, weight, mean, rstd, need_dx);
}

Four ghost_forward(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                   int64_t virtual_batch_size, double eps) {
  static const auto op = handle<Four(const Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t, double)>(
      "torch_bn_cpp::ghost_batch_norm_forward");
  return op.call(x, weight, bias, virtual_batch_size, eps);
}

Three ghost_backward(const Tensor& dy, const Tensor& x, const OptionalTensor& weight, const Tensor& mean,
                     const Tensor& rstd, int64_t virtual_batch_size, bool need_dx) {
  static const auto op = handle<Three(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                                      int64_t, bool)>("torch_bn_cpp::ghost_batch_norm_backward");
  return op.call(dy, x, weight, mean, rstd, virtual_batch_size, need_dx);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("batch_norm_forward", &forward, release);
  m.def("batch_norm_backward", &backward, release);
  m.def("ghost_batch_norm_forward", &ghost_forward, release);
  m.def("ghost_batch_norm_backward", &ghost_backward, release);
}
