// Typed Python bindings of the four ops of ops.cpp (batch_norm_forward / _backward and the ghost
// ones), which torch_bn's Python code calls: each calls its op through the dispatcher, unboxed,
// so every dispatch key torch.ops would reach (the CPU kernel, a Python dispatch mode, the
// profiler's record) is reached the same way, with the GIL released as torch.ops releases it. What
// is skipped is torch.ops' boxing of the Python arguments into a stack of IValues and of the
// results back: 3-4 microseconds a call, about 7% of a layer's forward + backward at the MLP's
// (50, 100) (bench/RESULTS.md). torch_bn/cpp.py imports this module from the same library.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

// The ops' C++ signatures, as their schemas in ops.cpp declare them.
using Forward = Four(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var,
                     const OptionalTensor& num_batches_tracked, double momentum, double eps);
using Backward = Three(const Tensor& dy, const Tensor& x, const OptionalTensor& weight, const Tensor& mean,
                       const Tensor& rstd, bool need_dx);
using GhostForward = Four(const Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                          int64_t virtual_batch_size, double eps);
using GhostBackward = Three(const Tensor& dy, const Tensor& x, const OptionalTensor& weight, const Tensor& mean,
                            const Tensor& rstd, int64_t virtual_batch_size, bool need_dx);

template <typename Signature>
struct Dispatched;

// A callable for pybind11 that calls the op `name` through its typed handle, looked up once here
// (loading the library registered the schemas before Python imports this module).
template <typename R, typename... Args>
struct Dispatched<R(Args...)> {
  static auto callable(const char* name) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<R(Args...)>();
    return [op](Args... args) -> R { return op.call(args...); };
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("batch_norm_forward", Dispatched<Forward>::callable("torch_bn_cpp::batch_norm_forward"), release);
  m.def("batch_norm_backward", Dispatched<Backward>::callable("torch_bn_cpp::batch_norm_backward"), release);
  m.def("ghost_batch_norm_forward", Dispatched<GhostForward>::callable("torch_bn_cpp::ghost_batch_norm_forward"),
        release);
  m.def("ghost_batch_norm_backward", Dispatched<GhostBackward>::callable("torch_bn_cpp::ghost_batch_norm_backward"),
        release);
}
