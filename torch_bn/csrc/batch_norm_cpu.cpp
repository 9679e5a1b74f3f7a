// torch_bn_cpp::batch_norm_train: a whole training-mode batch-norm layer on CPU as one compiled op.
//
// The forward (batch statistics, y, the running-statistics update) and its backward are the
// math of torch_bn/ops.py, written as plain loops over x viewed as (N, C, L), with the autograd
// node built in C++, so that a call runs no Python and a few small loops instead of a dozen
// tensor ops. torch_bn/cpp.py compiles and loads this file; torch_bn.function.choose_path
// decides when it runs (small CPU inputs in training mode).
//
// Numerics (tested against float64 and nn.BatchNorm1d in tests/test_cpp.py):
// - sums accumulate in double; the statistics are two-pass (the mean, then the mean of squared
//   deviations), as in the reference, so constant features give beta exactly and far-from-zero
//   ones (1e4 + noise) keep their variance;
// - y = (x - mean) * (rstd * weight) + bias and the closed-form dx are computed in the input's
//   "op-math" type (float for float16/bfloat16/float32, double for float64);
// - running_mean / running_var move by lerp_ (running += momentum * (batch - running)) with
//   the unbiased batch variance, the same ATen op the Python path uses.
// When the backward is itself recorded (double backward) or its gradient is not a plain CPU
// tensor (vmap over the backward), it runs the same closed form as differentiable ATen ops.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

// Named (not anonymous) so that the autograd node reads torch_bn_cpp::BatchNormFunction.
namespace torch_bn_cpp {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Elements per parallel task: smaller inputs run on the calling thread (no thread wake-up).
constexpr int64_t kGrain = 1 << 15;

// x (N, C, *) seen as (N, C, L): N * C blocks of L values each, in memory order.
struct Geometry {
  int64_t n, c, l;
  int64_t m() const { return n * l; }  // values per channel
};

// The input in the memory order the loops read, and how they read it. A channels-last input
// (N, *, C in memory) is N * H * W rows of C values: (N * H * W, C, 1), read in place, and the
// output takes its layout, as PyTorch's; any other input is made contiguous, (N, C, L).
struct Layout {
  Tensor x;
  Geometry g;
  at::MemoryFormat format;
};

Layout layout(const Tensor& input) {
  const int64_t n = input.size(0), c = input.size(1);
  const auto format = input.dim() >= 4 ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  if (format != at::MemoryFormat::Contiguous && input.is_contiguous(format) && c > 0) {
    return {input, {input.numel() / c, c, 1}, format};
  }
  return {input.contiguous(), {n, c, n * c == 0 ? 1 : input.numel() / (n * c)}, at::MemoryFormat::Contiguous};
}

// Runs f(c0, c1) over channel ranges, in parallel when the input is large enough to pay for it.
template <typename F>
void for_channels(const Geometry& g, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.m()));
  at::parallel_for(0, g.c, grain, f);
}

// The per-channel loops below run over channels [c0, c1) of x seen as (N, C, L). When L == 1
// (rows of C values, the (N, C) case) the innermost loop runs along the channels: independent
// accumulators that the compiler vectorizes. Sums accumulate in double.

// s[c] = sum(a)
template <typename scalar_t>
void channel_sum(const scalar_t* __restrict__ a, const Geometry& g, int64_t c0, int64_t c1,
                 double* __restrict__ s) {
  if (g.l == 1) {
    for (int64_t c = c0; c < c1; ++c) s[c] = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      const scalar_t* __restrict__ ar = a + i * g.c;
      for (int64_t c = c0; c < c1; ++c) s[c] += static_cast<double>(ar[c]);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    double t = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      const scalar_t* __restrict__ ap = a + (i * g.c + c) * g.l;
      for (int64_t j = 0; j < g.l; ++j) t += static_cast<double>(ap[j]);
    }
    s[c] = t;
  }
}

// s[c] = sum((a - ca[c]) * (b - cb[c]))
template <typename scalar_t>
void channel_dot(const scalar_t* __restrict__ a, const double* __restrict__ ca, const scalar_t* __restrict__ b,
                 const double* __restrict__ cb, const Geometry& g, int64_t c0, int64_t c1,
                 double* __restrict__ s) {
  if (g.l == 1) {
    for (int64_t c = c0; c < c1; ++c) s[c] = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      const scalar_t* __restrict__ ar = a + i * g.c;
      const scalar_t* __restrict__ br = b + i * g.c;
      for (int64_t c = c0; c < c1; ++c) {
        s[c] += (static_cast<double>(ar[c]) - ca[c]) * (static_cast<double>(br[c]) - cb[c]);
      }
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    double t = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      const scalar_t* __restrict__ ap = a + (i * g.c + c) * g.l;
      const scalar_t* __restrict__ bp = b + (i * g.c + c) * g.l;
      for (int64_t j = 0; j < g.l; ++j) {
        t += (static_cast<double>(ap[j]) - ca[c]) * (static_cast<double>(bp[j]) - cb[c]);
      }
    }
    s[c] = t;
  }
}

// out = alpha[c] * u + beta[c] * (x - mean[c]) + gamma[c] in opmath_t; without u (kWithU false)
// the first term is left out. This one loop is the forward's y and the backward's dx.
template <bool kWithU, typename scalar_t, typename opmath_t>
void channel_affine(const scalar_t* __restrict__ u, const scalar_t* __restrict__ x, const Geometry& g,
                    int64_t c0, int64_t c1, const opmath_t* __restrict__ alpha, const opmath_t* __restrict__ beta,
                    const opmath_t* __restrict__ mean, const opmath_t* __restrict__ gamma,
                    scalar_t* __restrict__ out) {
  if (g.l == 1) {
    for (int64_t i = 0; i < g.n; ++i) {
      const int64_t row = i * g.c;
      for (int64_t c = c0; c < c1; ++c) {
        opmath_t v = beta[c] * (static_cast<opmath_t>(x[row + c]) - mean[c]) + gamma[c];
        if constexpr (kWithU) v += alpha[c] * static_cast<opmath_t>(u[row + c]);
        out[row + c] = static_cast<scalar_t>(v);
      }
    }
    return;
  }
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (i * g.c + c) * g.l;
      const opmath_t al = kWithU ? alpha[c] : opmath_t(0), be = beta[c], mu = mean[c], ga = gamma[c];
      for (int64_t j = 0; j < g.l; ++j) {
        opmath_t v = be * (static_cast<opmath_t>(x[base + j]) - mu) + ga;
        if constexpr (kWithU) v += al * static_cast<opmath_t>(u[base + j]);
        out[base + j] = static_cast<scalar_t>(v);
      }
    }
  }
}

at::ScalarType opmath_dtype(const Tensor& x) {
  return at::toOpMathType(x.scalar_type());
}

// A (C,) vector as a contiguous tensor of the op-math type (no copy when it already is one).
Tensor channel_vector(const std::optional<Tensor>& v, at::ScalarType dtype) {
  return v.has_value() && v->defined() ? v->to(dtype).contiguous() : Tensor();
}

void check_input(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var) {
  TORCH_CHECK(x.device().is_cpu(), "torch_bn::batch_norm_train runs on CPU tensors, got ", x.device(),
              "; call torch_bn.functional.batch_norm, which picks the path for the device");
  TORCH_CHECK(x.dim() >= 2, "batch_norm expects input of shape (N, C) or (N, C, *), got ", x.dim(),
              "D input of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "batch_norm expects a floating-point input, got ",
              x.scalar_type(), "; convert it first, e.g. input.float()");
  const int64_t c = x.size(1);
  for (const auto* v : {&weight, &bias, &running_mean, &running_var}) {
    TORCH_CHECK(!v->has_value() || !(*v)->defined() || (*v)->numel() == c,
                "a per-channel tensor has ", (*v)->numel(), " elements but the input has ", c,
                " channels (dim 1) in shape ", x.sizes());
  }
  const int64_t m = x.size(1) == 0 ? x.size(0) : x.numel() / x.size(1);
  TORCH_CHECK(m > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
}

// The forward: y, and the batch mean and rstd (C,) in op-math type; updates the running stats.
std::tuple<Tensor, Tensor, Tensor> forward_impl(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    double momentum, double eps) {
  check_input(input, weight, bias, running_mean, running_var);
  const Layout in = layout(input);
  const Tensor& x = in.x;
  const Geometry g = in.g;
  const auto acc = opmath_dtype(x);
  const Tensor w = channel_vector(weight, acc), b = channel_vector(bias, acc);
  Tensor y = at::empty_like(x, in.format);
  Tensor mean = at::empty({g.c}, x.options().dtype(acc));
  Tensor rstd = at::empty({g.c}, x.options().dtype(acc));
  const bool track = (running_mean.has_value() && running_mean->defined()) ||
                     (running_var.has_value() && running_var->defined());
  Tensor var_unbiased = track ? at::empty({g.c}, x.options().dtype(acc)) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_train", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
    opmath_t* rp = rstd.mutable_data_ptr<opmath_t>();
    opmath_t* vp = track ? var_unbiased.mutable_data_ptr<opmath_t>() : nullptr;
    const opmath_t* wp = w.defined() ? w.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* bp = b.defined() ? b.const_data_ptr<opmath_t>() : nullptr;
    const double m = static_cast<double>(g.m());
    std::vector<double> center(g.c), s1(g.c), s2(g.c);
    std::vector<opmath_t> scale(g.c), shift(g.c);
    for_channels(g, [&](int64_t c0, int64_t c1) {
      // Two passes: the mean (s1 / M), then the sum of squared deviations from it (s2).
      channel_sum(xp, g, c0, c1, s1.data());
      for (int64_t c = c0; c < c1; ++c) center[c] = s1[c] / m;
      channel_dot(xp, center.data(), xp, center.data(), g, c0, c1, s2.data());
      for (int64_t c = c0; c < c1; ++c) {
        const double var = s2[c] / m;
        mp[c] = static_cast<opmath_t>(center[c]);
        rp[c] = static_cast<opmath_t>(1.0 / std::sqrt(var + eps));
        if (vp) vp[c] = static_cast<opmath_t>(s2[c] / (m - 1));
        scale[c] = wp ? rp[c] * wp[c] : rp[c];
        shift[c] = bp ? bp[c] : opmath_t(0);
      }
      channel_affine<false>(xp, xp, g, c0, c1, scale.data(), scale.data(), mp, shift.data(), yp);
    });
  });
  if (running_mean.has_value() && running_mean->defined()) {
    Tensor rm = *running_mean;
    rm.lerp_(mean.to(rm.scalar_type()), momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    Tensor rv = *running_var;
    rv.lerp_(var_unbiased.to(rv.scalar_type()), momentum);
  }
  return {y, mean, rstd};
}

// The closed-form backward (docs/derivation.md) with g = rstd * weight, M values per channel:
//   dbias = sum(dy),  dweight = rstd * sum(dy * (x - mean)),
//   dx = g * dy - g * rstd * dweight / M * (x - mean) - g * dbias / M.
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& grad, const Tensor& input, const Tensor& weight,
                                                 const Tensor& mean, const Tensor& rstd, bool need_dx) {
  const Layout in = layout(input);
  const Tensor& x = in.x;
  const Geometry g = in.g;
  const Tensor dy = grad.contiguous(in.format);
  const auto acc = opmath_dtype(x);
  const Tensor w = weight.defined() ? weight.to(acc).contiguous() : Tensor();
  Tensor dweight = at::empty({g.c}, x.options().dtype(acc));
  Tensor dbias = at::empty({g.c}, x.options().dtype(acc));
  Tensor dx = need_dx ? at::empty_like(x, in.format) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_train_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "batch_norm_train backward: the gradient's dtype ",
                dy.scalar_type(), " differs from the input's ", x.scalar_type());
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const opmath_t* mp = mean.const_data_ptr<opmath_t>();
    const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
    const opmath_t* wp = w.defined() ? w.const_data_ptr<opmath_t>() : nullptr;
    opmath_t* dwp = dweight.mutable_data_ptr<opmath_t>();
    opmath_t* dbp = dbias.mutable_data_ptr<opmath_t>();
    const double m = static_cast<double>(g.m());
    std::vector<double> center(g.c), zero(g.c, 0.0), s1(g.c), s2(g.c);
    std::vector<opmath_t> alpha(g.c), beta(g.c), gamma(g.c);
    for_channels(g, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) center[c] = static_cast<double>(mp[c]);
      // s1 = sum(dy), s2 = sum(dy * (x - mean)).
      channel_sum(dyp, g, c0, c1, s1.data());
      channel_dot(dyp, zero.data(), xp, center.data(), g, c0, c1, s2.data());
      for (int64_t c = c0; c < c1; ++c) {
        const double r = static_cast<double>(rp[c]);
        const double gc = wp ? r * static_cast<double>(wp[c]) : r;
        dbp[c] = static_cast<opmath_t>(s1[c]);
        dwp[c] = static_cast<opmath_t>(r * s2[c]);
        alpha[c] = static_cast<opmath_t>(gc);
        beta[c] = static_cast<opmath_t>(-gc * r * r * s2[c] / m);
        gamma[c] = static_cast<opmath_t>(-gc * s1[c] / m);
      }
      if (need_dx) {
        channel_affine<true>(dyp, xp, g, c0, c1, alpha.data(), beta.data(), mp, gamma.data(),
                             dx.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return {dx, dweight, dbias};
}

// The same backward as differentiable ATen ops, for double backward and wrapped gradients: the
// statistics are recomputed from x so that their dependence on x is part of the recorded graph.
std::tuple<Tensor, Tensor, Tensor> backward_differentiable(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                           double eps) {
  const auto acc = opmath_dtype(x);
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  const double m = static_cast<double>(x.size(1) == 0 ? x.size(0) : x.numel() / x.size(1));
  std::vector<int64_t> channel_shape(x.dim(), 1);
  channel_shape[1] = x.size(1);
  const Tensor xc = x.to(acc), dyc = dy.to(acc);
  const Tensor mean = xc.mean(dims, /*keepdim=*/true);
  const Tensor xmu = xc - mean;
  const Tensor rstd = ((xmu * xmu).mean(dims, /*keepdim=*/true) + eps).rsqrt();
  const Tensor xhat = xmu * rstd;
  const Tensor dbias = dyc.sum(dims);
  const Tensor dweight = (dyc * xhat).sum(dims);
  const Tensor gain = weight.defined() ? rstd * weight.to(acc).view(channel_shape) : rstd;
  const Tensor dx = gain * (dyc - dbias.view(channel_shape) / m - xhat * (dweight.view(channel_shape) / m));
  return {dx.to(x.scalar_type()), dweight, dbias};
}

// A plain CPU tensor with memory the loops can read: not a functorch wrapper (as dy is when
// gradcheck or torch.func vmaps over the backward) nor a Python tensor subclass.
bool dense(const Tensor& t) {
  constexpr auto wrapped = c10::DispatchKeySet({c10::DispatchKey::FuncTorchBatched,
                                                c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Python});
  return t.has_storage() && t.layout() == at::kStrided && t.device().is_cpu() && !t.key_set().has_any(wrapped);
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, double momentum, double eps) {
    auto [y, mean, rstd] = forward_impl(x, weight, bias, running_mean, running_var, momentum, eps);
    const Tensor w = weight.has_value() ? *weight : Tensor();
    ctx->save_for_backward({x, w, mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] =
        bias.has_value() && bias->defined() ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &mean = saved[2], &rstd = saved[3];
    const Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(7);
    // needs_input_grad counts the tensor inputs that were given (the edges): x, then weight and
    // bias where present. The gradients returned are one per forward argument.
    const bool has_bias = ctx->saved_data["bias_dtype"].toInt() >= 0;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = w.defined() && ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(w.defined() ? 2 : 1);
    Tensor dx, dweight, dbias;
    if (at::GradMode::is_enabled() || !dense(dy)) {
      std::tie(dx, dweight, dbias) = backward_differentiable(dy, x, w, ctx->saved_data["eps"].toDouble());
    } else {
      std::tie(dx, dweight, dbias) = backward_impl(dy, x, w, mean, rstd, need_x);
    }
    variable_list out(7);
    if (need_x) out[0] = dx;
    if (need_w) out[1] = dweight.to(w.scalar_type());
    if (need_b) out[2] = dbias.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    return out;
  }
};

Tensor batch_norm_train_autograd(const Tensor& x, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                                 const std::optional<Tensor>& running_var, double momentum, double eps) {
  return BatchNormFunction::apply(x, weight, bias, running_mean, running_var, momentum, eps);
}

// Below autograd (inference mode): the forward alone.
Tensor batch_norm_train_cpu(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                            const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                            double momentum, double eps) {
  return std::get<0>(forward_impl(x, weight, bias, running_mean, running_var, momentum, eps));
}

}  // namespace torch_bn_cpp

TORCH_LIBRARY(torch_bn_cpp, m) {
  m.def("batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(torch_bn_cpp, Autograd, m) {
  m.impl("batch_norm_train", &torch_bn_cpp::batch_norm_train_autograd);
}

TORCH_LIBRARY_IMPL(torch_bn_cpp, CPU, m) {
  m.impl("batch_norm_train", &torch_bn_cpp::batch_norm_train_cpu);
}
