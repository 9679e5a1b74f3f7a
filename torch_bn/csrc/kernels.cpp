// The loops of torch_bn's compiled CPU op: training-mode batch-norm forward and closed-form
// backward over x viewed as (N, C, L), behind the interface of kernels.h. ops.cpp registers the
// ops that call them; torch_bn/function.py's BatchNormFunction calls those ops as its bodies.
//
// Numerics (tested against float64 and nn.BatchNorm1d in tests/test_cpp.py):
// - sums accumulate in double; the statistics are two-pass (the mean, then the mean of squared
//   deviations), as in the reference ops (torch_bn/ops.py), so constant features give beta
//   exactly and far-from-zero ones (1e4 + noise) keep their variance;
// - y = (x - mean) * (rstd * weight) + bias and the closed-form dx are computed in the input's
//   "op-math" type (float for float16/bfloat16/float32, double for float64).

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace torch_bn_cpp {

namespace {

using at::Tensor;

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

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_kernel(const Tensor& input, const Tensor& weight,
                                                          const Tensor& bias, double eps) {
  const Layout in = layout(input);
  const Tensor& x = in.x;
  const Geometry g = in.g;
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor y = at::empty_like(x, in.format);
  Tensor mean = at::empty({g.c}, x.options().dtype(acc));
  Tensor var = at::empty({g.c}, x.options().dtype(acc));
  Tensor rstd = at::empty({g.c}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_bn_cpp::forward_kernel", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
    opmath_t* vp = var.mutable_data_ptr<opmath_t>();
    opmath_t* rp = rstd.mutable_data_ptr<opmath_t>();
    const opmath_t* wp = weight.defined() ? weight.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* bp = bias.defined() ? bias.const_data_ptr<opmath_t>() : nullptr;
    const double m = static_cast<double>(g.m());
    std::vector<double> center(g.c), s1(g.c), s2(g.c);
    std::vector<opmath_t> scale(g.c), shift(g.c);
    for_channels(g, [&](int64_t c0, int64_t c1) {
      // Two passes: the mean (s1 / M), then the sum of squared deviations from it (s2).
      channel_sum(xp, g, c0, c1, s1.data());
      for (int64_t c = c0; c < c1; ++c) center[c] = s1[c] / m;
      channel_dot(xp, center.data(), xp, center.data(), g, c0, c1, s2.data());
      for (int64_t c = c0; c < c1; ++c) {
        const double v = s2[c] / m;
        mp[c] = static_cast<opmath_t>(center[c]);
        vp[c] = static_cast<opmath_t>(v);
        rp[c] = static_cast<opmath_t>(1.0 / std::sqrt(v + eps));
        scale[c] = wp ? rp[c] * wp[c] : rp[c];
        shift[c] = bp ? bp[c] : opmath_t(0);
      }
      channel_affine<false>(xp, xp, g, c0, c1, scale.data(), scale.data(), mp, shift.data(), yp);
    });
  });
  return {y, mean, var, rstd};
}

// The closed form (docs/derivation.md) with g = rstd * weight, M values per channel:
//   dbias = sum(dy),  dweight = rstd * sum(dy * (x - mean)),
//   dx = g * dy - g * rstd * dweight / M * (x - mean) - g * dbias / M.
std::tuple<Tensor, Tensor, Tensor> backward_kernel(const Tensor& grad, const Tensor& input, const Tensor& weight,
                                                   const Tensor& mean, const Tensor& rstd, bool need_dx) {
  const Layout in = layout(input);
  const Tensor& x = in.x;
  const Geometry g = in.g;
  const Tensor dy = grad.contiguous(in.format);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor dweight = at::empty({g.c}, x.options().dtype(acc));
  Tensor dbias = at::empty({g.c}, x.options().dtype(acc));
  Tensor dx = need_dx ? at::empty_like(x, in.format) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_bn_cpp::backward_kernel", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const opmath_t* mp = mean.const_data_ptr<opmath_t>();
    const opmath_t* rp = rstd.const_data_ptr<opmath_t>();
    const opmath_t* wp = weight.defined() ? weight.const_data_ptr<opmath_t>() : nullptr;
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

}  // namespace torch_bn_cpp
