// The training-mode batch-norm loops behind kernels.h: statistics, y, and the closed-form
// backward, for any CPU floating input (float, double, half, bfloat16), 2D to 5D, contiguous or
// channels-last (read in place). Parallel over at::parallel_for (torch.set_num_threads is
// obeyed), vectorized with at::vec::Vectorized (the build picks its instruction set: see
// torch_bn/cpp.py), arithmetic in the op-math type (float for half/bfloat16/float, double for
// double).
//
// Two shapes of loop cover every input, by how x lies in memory:
// - rows: (R, C) row-major, one channel per column: 2D input (R = N), channels-last input
//   (R = N * H * W ...), or any input whose spatial size is 1. Vectors run along the channels.
// - planes: (N, C, L) with L > 1 (contiguous NCHW...): N runs of L values per channel. Vectors
//   run along each run.
//
// Statistics, accurate where one-pass sums are not: the data is cut into tiles (rows: 32 rows x
// up to 1024 channels, the first tile of a range 8 rows; planes: whole runs of a channel grouped
// up to 2048 values, the first group up to 512, or 2048-value segments of longer runs).
// The first tile is read twice while it is in cache: its sum gives a centre c, then sum(x - c)
// and sum((x - c)^2) give its mean and centred sum of squares; every later tile is read once,
// centred on the mean of the values before it. Tiles merge into double-precision running
// (count, mean, M2) per channel by Chan et al.'s pairwise update (rows: one count for all
// columns, the means and M2 as arrays, so the merges vectorize). So deviations are always taken
// from a nearby centre (constant features give M2 = 0 exactly, 1e6 + randn keeps its variance)
// while x leaves memory once for the statistics.
//
// y = (x - mean_f) * scale + shift, where mean_f is the mean rounded to the op-math type,
// scale = rstd * weight and shift = bias - (mean - mean_f) * scale: x - mean_f is exact in
// float for x near the mean, and the rounding of the mean is carried, in double, by the shift.
// Constant features give exactly beta.
//
// The backward (docs/derivation.md): per channel s1 = sum(dy), s2 = sum(dy * (x - mean)) (float
// over a tile, double across tiles), then dx = a * dy + b * (x - mean) + c with g = rstd * weight,
// a = g, b = -g * rstd^2 * s2 / M, c = -g * s1 / M; dweight = rstd * s2, dbias = s1.
//
// Planes run one channel per task, statistics then y (or sums then dx) while the channel is
// still in cache; rows split the rows over threads, each keeping its own per-channel state,
// merged afterwards, then a second parallel sweep writes y (or dx).

#include "kernels.h"
#include "outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace torch_bn_cpp {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// Elements per parallel task at least: smaller inputs run on the calling thread.
constexpr int64_t kGrain = 1 << 15;
// Rows tiles: rows per tile and channels per tile.
constexpr int64_t kTileRows = 32;
// Rows of the first tile of a range, the one read twice (its own mean is its centre): few, since
// the later tiles need only some centre near the data, and a second pass costs as much as a first.
constexpr int64_t kFirstTileRows = 8;
constexpr int64_t kTileCols = 1024;
// Rows rows_moments takes together, each pack's sums held in registers across them.
constexpr int64_t kRowGroup = 4;
// Planes tiles: values of one run per tile.
constexpr int64_t kSegment = 2048;
// Values of the first tile of a channel's runs, where runs are grouped (see plane_moments).
constexpr int64_t kFirstSegment = 512;

// Two vectors of op-math values, loaded from / stored to scalar_t memory; n < kSize reads only
// the first n values (the rest are zero) and writes only the first n.
template <typename scalar_t, typename = void>
struct Pack {
  using opmath_t = scalar_t;
  using V = Vectorized<scalar_t>;
  static constexpr int64_t kSize = 2 * V::size();
  static inline void load(const scalar_t* p, V& a, V& b, int64_t n = kSize) {
    if (n >= kSize) {
      a = V::loadu(p);
      b = V::loadu(p + V::size());
    } else if (n > V::size()) {
      a = V::loadu(p);
      b = V::loadu(p + V::size(), n - V::size());
    } else {
      a = V::loadu(p, n);
      b = V(scalar_t(0));
    }
  }
  static inline void store(scalar_t* p, const V& a, const V& b, int64_t n = kSize) {
    if (n >= kSize) {
      a.store(p);
      b.store(p + V::size());
    } else if (n > V::size()) {
      a.store(p);
      b.store(p + V::size(), n - V::size());
    } else {
      a.store(p, n);
    }
  }
  // A full pack in an order of lanes of the Pack's choosing, the same for every load_any and
  // store_any: for loops where each value's result depends on that value alone, or that only sum
  // (the planes: one channel per run). Here the memory order.
  static inline void load_any(const scalar_t* p, V& a, V& b) { load(p, a, b); }
  static inline void store_any(scalar_t* p, const V& a, const V& b) { store(p, a, b); }
  // Whether load_any's lanes are in memory order; to_lanes reorders a full pack read with load
  // (memory order) into load_any's order, to_memory back.
  static constexpr bool kMemoryOrder = true;
  static inline void to_lanes(V&, V&) {}
  static inline void to_memory(V&, V&) {}
};

// float16 / bfloat16: one vector of 16-bit values is two vectors of float.
template <typename scalar_t>
struct Pack<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using opmath_t = float;
  using V = Vectorized<float>;
  using H = Vectorized<scalar_t>;
  static constexpr int64_t kSize = H::size();
  static_assert(kSize == 2 * V::size(), "a 16-bit vector holds two float vectors");
  static inline void load(const scalar_t* p, V& a, V& b, int64_t n = kSize) {
    const H h = n >= kSize ? H::loadu(p) : H::loadu(p, n);
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(h);
  }
  static inline void store(scalar_t* p, const V& a, const V& b, int64_t n = kSize) {
    const H h = at::vec::convert_from_float<scalar_t>(a, b);
    if (n >= kSize) {
      h.store(p);
    } else {
      h.store(p, static_cast<int>(n));
    }
  }
  // As Pack<float>'s. For bfloat16, a = the values at even positions and b = those at odd ones:
  // a bfloat16 is the upper half of a float, so read as 32-bit pairs they are (pair << 16) and
  // (pair & 0xffff0000), two operations for what convert_to_float does with five, and stores are
  // the reverse, without convert_from_float's pack and lane permutation. The float16 conversions
  // are single instructions already: memory order.
  static inline void load_any(const scalar_t* p, V& a, V& b) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      const I pairs = I::loadu(p);
      a = at::vec::cast<float>(pairs << I(16));
      b = at::vec::cast<float>(pairs & I(kUpperHalf));
    } else {
      load(p, a, b);
    }
  }
  static inline void store_any(scalar_t* p, const V& a, const V& b) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      ((rounded(b) & I(kUpperHalf)) | ((rounded(a) >> I(16)) & I(0xffff))).store(p);
    } else {
      store(p, a, b);
    }
  }
  static constexpr bool kMemoryOrder = !std::is_same_v<scalar_t, c10::BFloat16>;
  // bfloat16: the even-position values to a, the odd ones to b (and back).
  static inline void to_lanes(V& a, V& b) {
    if constexpr (!kMemoryOrder) std::tie(a, b) = at::vec::deinterleave2(a, b);
  }
  static inline void to_memory(V& a, V& b) {
    if constexpr (!kMemoryOrder) std::tie(a, b) = at::vec::interleave2(a, b);
  }

 private:
  using I = Vectorized<int32_t>;
  static constexpr int32_t kUpperHalf = static_cast<int32_t>(0xffff0000u);
  // The bits of v rounded to bfloat16 in their upper halves: round to nearest, ties to even, and
  // NaN as 0xffff, exactly as convert_from_float rounds.
  static inline I rounded(const V& v) {
    const I bits = at::vec::cast<int32_t>(v);
    const I r = bits + ((bits >> I(16)) & I(1)) + I(0x7fff);
    return I::blendv(r, I(-1), at::vec::cast<int32_t>(v.isnan()));
  }
};

// The rows loops' packs. A rows pack holds kSize columns of one row: a full pack (kFull) is read
// and written in load_any's lane order, the last, partial pack of a row (n < kSize columns) in
// memory order, as load reads it. Each lane of a rows pack is a column, so the per-column values
// beside it (centres, means, coefficients) are read in the same order (in_lane_order, then
// load_columns) and the per-lane sums put back in memory order (to_memory) before they land in
// per-column arrays. For bfloat16 this spares every full pack convert_to_float's and
// convert_from_float's lane permutations: the rows loops, compute-bound on them, take 0.6-0.9x the
// time they took (bench/RESULTS.md). for_packs runs the full packs apart from the partial one, so
// that the full packs' loop has no branch on the count.
template <bool kFull, typename scalar_t, typename V>
inline void load_pack(const scalar_t* p, V& a, V& b, int64_t n) {
  if constexpr (kFull) {
    Pack<scalar_t>::load_any(p, a, b);
  } else {
    Pack<scalar_t>::load(p, a, b, n);
  }
}

template <bool kFull, typename scalar_t, typename V>
inline void store_pack(scalar_t* p, const V& a, const V& b, int64_t n) {
  if constexpr (kFull) {
    Pack<scalar_t>::store_any(p, a, b);
  } else {
    Pack<scalar_t>::store(p, a, b, n);
  }
}

// Per-column values v[0, n) beside a pack of n columns, as two vectors (zeros past n).
template <bool kFull, typename T>
inline void load_columns(const T* v, Vectorized<T>& lo, Vectorized<T>& hi, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t h = V::size();
  if constexpr (kFull) {
    lo = V::loadu(v);
    hi = V::loadu(v + h);
  } else {
    lo = V::loadu(v, std::min(n, h));
    hi = n > h ? V::loadu(v + h, n - h) : V(T(0));
  }
}

// f(full, q, n) for each pack q of `columns` columns, n columns in it: the full packs first, full
// = std::true_type, then the partial one, if any, with std::false_type.
template <int64_t kSize, typename F>
inline void for_packs(int64_t columns, const F& f) {
  const int64_t full = columns / kSize;
  for (int64_t q = 0; q < full; ++q) f(std::true_type{}, q, kSize);
  if (full * kSize < columns) f(std::false_type{}, full, columns - full * kSize);
}

// Per-column values v[0, C) in the order load_pack gives a row's lanes: each full pack of
// columns reordered as load_any orders it, a last partial pack as is. v itself where load_any
// reads memory order, else order's buffer, filled.
template <typename scalar_t, typename T>
const T* in_lane_order(const T* v, int64_t C, std::vector<T>& order) {
  using P = Pack<scalar_t>;
  if constexpr (P::kMemoryOrder) {
    return v;
  } else {
    using V = typename P::V;
    order.assign(v, v + C);
    for (int64_t j = 0; j + P::kSize <= C; j += P::kSize) {
      V a = V::loadu(v + j), b = V::loadu(v + j + V::size());
      P::to_lanes(a, b);
      a.store(order.data() + j);
      b.store(order.data() + j + V::size());
    }
    return order.data();
  }
}

// v with lanes [n, size) set to zero.
template <typename V>
inline V first(const V& v, int64_t n) {
  return n >= V::size() ? v : V::set(V(0), v, std::max<int64_t>(n, 0));
}

template <typename V>
inline double lane_sum(const V& v) {
  using T = typename V::value_type;
  __at_align__ T t[V::size()];
  v.store(t);
  double s = 0;
  for (int64_t k = 0; k < V::size(); ++k) s += static_cast<double>(t[k]);
  return s;
}

// Running statistics of one channel (or column): count, mean, centred sum of squares.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  // add() for a tile of nb values merged into a state of n values, with the factors every column
  // of a rows tile shares (they all hold the same count): inv = 1 / nb, w = nb / (n + nb),
  // cross = n * nb / (n + nb).
  struct Factors {
    double inv, w, cross;
    Factors(double n, double nb) : inv(1.0 / nb), w(nb / (n + nb)), cross(n * nb / (n + nb)) {}
  };
  // (On a column's mean and m2 held apart: rows keep one count for all their columns.)
  static inline void add(const Factors& f, double c, double s1, double s2, double& mean, double& m2) {
    const double mb = c + s1 * f.inv;
    const double m2b = s2 - s1 * (s1 * f.inv);
    const double delta = mb - mean;
    mean += delta * f.w;
    m2 += m2b + delta * delta * f.cross;
  }
  // Merges a tile of nb values with centre c, s1 = sum(x - c), s2 = sum((x - c)^2).
  inline void add(double nb, double c, double s1, double s2) {
    const double mb = c + s1 / nb;
    const double m2b = s2 - s1 * (s1 / nb);
    merge(nb, mb, m2b);
  }
  inline void merge(double nb, double mb, double m2b) {
    if (nb == 0) return;
    const double total = n + nb;
    const double delta = mb - mean;
    mean += delta * (nb / total);
    m2 += m2b + delta * delta * (n * nb / total);
    n = total;
  }
};

// How x lies in memory: rows (R, C) or planes (N, C, L), and the layout y and dx take.
struct Geometry {
  bool rows;
  int64_t n, c, l;  // rows: (n = R, c = C, l = 1)
  at::MemoryFormat format;
};

Geometry geometry(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t l = n * c == 0 ? 1 : x.numel() / (n * c);
  if (x.dim() >= 4) {
    const auto format = x.suggest_memory_format();
    if (format != at::MemoryFormat::Contiguous && x.is_contiguous(format) && c > 0) {
      return {true, x.numel() / c, c, 1, format};
    }
  }
  if (l == 1) return {true, n, c, 1, at::MemoryFormat::Contiguous};
  return {false, n, c, l, at::MemoryFormat::Contiguous};
}

// ---------------------------------------------------------------------------------------------
// rows: (R, C) row-major

// Moments of every column over rows [r0, r1) (r1 - r0 values each): means and M2 written to
// mean[0..C) and m2[0..C).
//
// Each tile's deviations are taken from a centre per column. For the first tile of the range: the
// tile's own mean (a first pass, row by row, for the sums; then the deviations, one vector of
// columns at a time, from cache). For every later tile: the mean of the rows before it, already
// in st, so a single pass (rows in groups of kRowGroup) gives the sums of deviations and of their
// squares. The float error of the tile's M2 = s2 - s1^2 / nb is then about eps * s2, where
// s2 = M2 + nb * d^2 and d is the tile's mean minus the centre; the merge adds about nb * d^2 to
// the running M2 for that tile, so the error stays a few eps of the M2 it lands in, however far the
// centre is (drifting or sorted rows, an outlier block first). Constant features (centre = their
// value) give M2 = 0 exactly.
template <typename scalar_t>
void rows_moments(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, double* mean, double* m2) {
  using P = Pack<scalar_t>;
  using opmath_t = typename P::opmath_t;
  using V = typename P::V;
  constexpr int64_t h = V::size();
  constexpr int64_t kVecs = kTileCols / P::kSize + 1;
  // Per vector of columns q: a, b halves of the centres and of the sums s1, s2.
  V ca[kVecs], cb[kVecs], s1a[kVecs], s1b[kVecs], s2a[kVecs], s2b[kVecs];
  __at_align__ opmath_t c_buf[P::kSize], s1_buf[P::kSize], s2_buf[P::kSize];
  // The running state of every column, as arrays (every column holds the same count), so that
  // the per-tile merges and centre loads below are loops the compiler vectorizes.
  std::fill(mean, mean + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  for (int64_t i0 = r0, nb = 0; i0 < r1; i0 += nb) {
    const bool first_tile = i0 == r0;
    nb = std::min(first_tile ? kFirstTileRows : kTileRows, r1 - i0);
    const V inv(opmath_t(1) / static_cast<opmath_t>(nb));
    const Moments::Factors factors(static_cast<double>(i0 - r0), static_cast<double>(nb));
    for (int64_t j0 = 0; j0 < C; j0 += kTileCols) {
      const int64_t wt = std::min(kTileCols, C - j0);
      const int64_t nq = (wt + P::kSize - 1) / P::kSize;
      if (first_tile) {
        // Pass 1, row by row: the tile's column sums; pass 2, one vector of columns at a time
        // from cache: the deviations from the tile's mean.
        for (int64_t q = 0; q < nq; ++q) s1a[q] = s1b[q] = V(opmath_t(0));
        for (int64_t i = i0; i < i0 + nb; ++i) {
          for_packs<P::kSize>(wt, [&](auto full, int64_t q, int64_t n) {
            V a, b;
            load_pack<decltype(full)::value>(x + i * C + j0 + q * P::kSize, a, b, n);
            s1a[q] += a;
            s1b[q] += b;
          });
        }
        for_packs<P::kSize>(wt, [&](auto full, int64_t q, int64_t n) {
          const scalar_t* xc = x + j0 + q * P::kSize;
          const V mean_a = s1a[q] * inv, mean_b = s1b[q] * inv;
          V t1a(opmath_t(0)), t1b(opmath_t(0)), t2a(opmath_t(0)), t2b(opmath_t(0));
          for (int64_t i = i0; i < i0 + nb; ++i) {
            V a, b;
            load_pack<decltype(full)::value>(xc + i * C, a, b, n);
            a = a - mean_a;
            b = b - mean_b;
            t1a += a;
            t1b += b;
            t2a = at::vec::fmadd(a, a, t2a);
            t2b = at::vec::fmadd(b, b, t2b);
          }
          ca[q] = mean_a, cb[q] = mean_b, s1a[q] = t1a, s1b[q] = t1b, s2a[q] = t2a, s2b[q] = t2b;
        });
      } else {
        // (Lanes past the last column read zeros and have centre zero: they add nothing.)
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t cnt = std::min(P::kSize, wt - q * P::kSize);
          const double* mq = mean + j0 + q * P::kSize;
          for (int64_t k = 0; k < cnt; ++k) c_buf[k] = static_cast<opmath_t>(mq[k]);
          for (int64_t k = cnt; k < P::kSize; ++k) c_buf[k] = opmath_t(0);
          ca[q] = V::loadu(c_buf);
          cb[q] = V::loadu(c_buf + h);
          if (cnt == P::kSize) P::to_lanes(ca[q], cb[q]);
          s1a[q] = s1b[q] = s2a[q] = s2b[q] = V(opmath_t(0));
        }
        // Each pack of `rows` rows from row i on, summed in registers before they join the tile's
        // sums (one load and store of those per kRowGroup rows: the loop is bound by them one row
        // at a time).
        auto add_rows = [&](auto rows, int64_t i) {
          for_packs<P::kSize>(wt, [&](auto full, int64_t q, int64_t n) {
            V t1a(opmath_t(0)), t1b(opmath_t(0)), t2a(opmath_t(0)), t2b(opmath_t(0));
            for (int64_t r = 0; r < decltype(rows)::value; ++r) {
              V a, b;
              load_pack<decltype(full)::value>(x + (i + r) * C + j0 + q * P::kSize, a, b, n);
              a = a - ca[q];
              b = b - cb[q];
              t1a += a;
              t1b += b;
              t2a = at::vec::fmadd(a, a, t2a);
              t2b = at::vec::fmadd(b, b, t2b);
            }
            s1a[q] += t1a;
            s1b[q] += t1b;
            s2a[q] += t2a;
            s2b[q] += t2b;
          });
        };
        int64_t i = i0;
        for (; i + kRowGroup <= i0 + nb; i += kRowGroup) add_rows(std::integral_constant<int64_t, kRowGroup>{}, i);
        for (; i < i0 + nb; ++i) add_rows(std::integral_constant<int64_t, 1>{}, i);
      }
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t cnt = std::min(P::kSize, wt - q * P::kSize);
        if (cnt == P::kSize) {  // back to memory order: lane k is column k
          P::to_memory(ca[q], cb[q]);
          P::to_memory(s1a[q], s1b[q]);
          P::to_memory(s2a[q], s2b[q]);
        }
        ca[q].store(c_buf);
        cb[q].store(c_buf + h);
        s1a[q].store(s1_buf);
        s1b[q].store(s1_buf + h);
        s2a[q].store(s2_buf);
        s2b[q].store(s2_buf + h);
        double* mq = mean + j0 + q * P::kSize;
        double* m2q = m2 + j0 + q * P::kSize;
        for (int64_t k = 0; k < cnt; ++k) {
          Moments::add(factors, static_cast<double>(c_buf[k]), static_cast<double>(s1_buf[k]),
                       static_cast<double>(s2_buf[k]), mq[k], m2q[k]);
        }
      }
    }
  }
}

// y[i, j] = (x[i, j] - mean[j]) * scale[j] + shift[j] over rows [r0, r1); with kWithU,
// y = alpha[j] * u[i, j] + ... (the backward's dx, u = dy, scale = b, shift = c); without
// kCentred, y = x[i, j] * scale[j] + shift[j] (mean unused). alpha, mean, scale and shift in
// in_lane_order.
template <bool kWithU, typename scalar_t, typename opmath_t, bool kCentred = true>
void rows_affine(const scalar_t* u, const scalar_t* x, int64_t C, int64_t r0, int64_t r1, const opmath_t* alpha,
                 const opmath_t* mean, const opmath_t* scale, const opmath_t* shift, scalar_t* out) {
  using P = Pack<scalar_t>;
  using V = typename P::V;
  for (int64_t i = r0; i < r1; ++i) {
    for_packs<P::kSize>(C, [&](auto full, int64_t q, int64_t n) {
      constexpr bool kFull = decltype(full)::value;
      const int64_t j = q * P::kSize, o = i * C + j;
      V a, b, sa, sb, ta, tb;
      load_pack<kFull>(x + o, a, b, n);
      if constexpr (kCentred) {
        V ma, mb;
        load_columns<kFull>(mean + j, ma, mb, n);
        a = a - ma;
        b = b - mb;
      }
      load_columns<kFull>(scale + j, sa, sb, n);
      load_columns<kFull>(shift + j, ta, tb, n);
      V ya = at::vec::fmadd(a, sa, ta), yb = at::vec::fmadd(b, sb, tb);
      if constexpr (kWithU) {
        V ua, ub, aa, ab;
        load_pack<kFull>(u + o, ua, ub, n);
        load_columns<kFull>(alpha + j, aa, ab, n);
        ya = at::vec::fmadd(aa, ua, ya);
        yb = at::vec::fmadd(ab, ub, yb);
      }
      store_pack<kFull>(out + o, ya, yb, n);
    });
  }
}

// s1[j] += sum(dy[i, j]), s2[j] += sum(dy[i, j] * (x[i, j] - mean[j])) over rows [r0, r1); mean in
// in_lane_order.
template <typename scalar_t, typename opmath_t>
void rows_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t r0, int64_t r1, const opmath_t* mean,
                    double* s1, double* s2) {
  using P = Pack<scalar_t>;
  using V = typename P::V;
  constexpr int64_t h = V::size();
  constexpr int64_t kVecs = kTileCols / P::kSize + 1;
  V a1[kVecs], b1[kVecs], a2[kVecs], b2[kVecs];
  __at_align__ opmath_t buf1[P::kSize], buf2[P::kSize];
  for (int64_t i0 = r0; i0 < r1; i0 += kTileRows) {
    const int64_t i1 = std::min(r1, i0 + kTileRows);
    for (int64_t j0 = 0; j0 < C; j0 += kTileCols) {
      const int64_t wt = std::min(kTileCols, C - j0);
      const int64_t nq = (wt + P::kSize - 1) / P::kSize;
      for (int64_t q = 0; q < nq; ++q) a1[q] = b1[q] = a2[q] = b2[q] = V(opmath_t(0));
      // Past the last column dy is zero, so the product is zero whatever the mean lanes hold.
      for (int64_t i = i0; i < i1; ++i) {
        for_packs<P::kSize>(wt, [&](auto full, int64_t q, int64_t n) {
          constexpr bool kFull = decltype(full)::value;
          const int64_t j = j0 + q * P::kSize;
          V ga, gb, xa, xb, ma, mb;
          load_pack<kFull>(dy + i * C + j, ga, gb, n);
          load_pack<kFull>(x + i * C + j, xa, xb, n);
          load_columns<kFull>(mean + j, ma, mb, n);
          a1[q] += ga;
          b1[q] += gb;
          a2[q] = at::vec::fmadd(ga, xa - ma, a2[q]);
          b2[q] = at::vec::fmadd(gb, xb - mb, b2[q]);
        });
      }
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t j = j0 + q * P::kSize, cnt = std::min(P::kSize, C - j);
        if (cnt == P::kSize) {
          P::to_memory(a1[q], b1[q]);
          P::to_memory(a2[q], b2[q]);
        }
        a1[q].store(buf1);
        b1[q].store(buf1 + h);
        a2[q].store(buf2);
        b2[q].store(buf2 + h);
        for (int64_t k = 0; k < cnt; ++k) {
          s1[j + k] += static_cast<double>(buf1[k]);
          s2[j + k] += static_cast<double>(buf2[k]);
        }
      }
    }
  }
}

// How many row chunks to split R rows of C values into (one per thread at most).
int64_t row_chunks(int64_t R, int64_t C) {
  const int64_t by_size = std::max<int64_t>(1, R * C / kGrain);
  const int64_t by_rows = std::max<int64_t>(1, R / kTileRows);
  return std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), by_size, by_rows});
}

template <typename F>
void for_chunks(int64_t chunks, const F& f) {
  if (chunks <= 1) {
    f(0, chunks);
  } else {
    at::parallel_for(0, chunks, 1, f);
  }
}

// ---------------------------------------------------------------------------------------------
// planes: (N, C, L), L > 1

// Runs of one channel lie C * L values apart: short ones (8x8 bfloat16 is 128 bytes a run, 32 KiB
// apart at 256 channels) give the hardware prefetcher nothing to follow, and each read waits for
// memory. So the loops below ask for the run kAhead samples on while they read this one (runs of
// up to kPrefetchBytes; longer ones stream well enough by themselves).
constexpr int64_t kAhead = 4;
constexpr int64_t kPrefetchBytes = 1024;

template <typename scalar_t>
inline void prefetch_run(const scalar_t* run, int64_t len, bool for_write = false) {
  const int64_t bytes = len * static_cast<int64_t>(sizeof(scalar_t));
  if (bytes > kPrefetchBytes) return;
  const char* b = reinterpret_cast<const char*>(run);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write) {
      __builtin_prefetch(b + off, 1);
    } else {
      __builtin_prefetch(b + off, 0);
    }
  }
}

// Merges the moments of one channel's N runs of L values (run i at p + i * stride) into st. A tile
// is a group of whole runs of up to kSegment values together, or a segment of one long run. As in
// rows_moments: the first tile is centred on its own mean (two passes, the second from cache),
// every later one on the mean of the values before it (one pass).
template <typename scalar_t>
void plane_moments(const scalar_t* p, int64_t N, int64_t L, int64_t stride, Moments& st) {
  using P = Pack<scalar_t>;
  using opmath_t = typename P::opmath_t;
  using V = typename P::V;
  constexpr int64_t h = V::size();
  const int64_t group = std::max<int64_t>(1, kSegment / std::max<int64_t>(L, 1));
  const int64_t seg = std::min(L, kSegment);
  // The first tile, read twice, groups fewer runs (as rows_moments' first tile has fewer rows).
  const int64_t first_group = std::max<int64_t>(1, kFirstSegment / std::max<int64_t>(L, 1));
  for (int64_t i0 = 0, g = first_group; i0 < N; i0 += g, g = group) {
    const int64_t i1 = std::min(N, i0 + g);
    for (int64_t s0 = 0; s0 < L; s0 += seg) {
      const int64_t len = std::min(seg, L - s0);
      const double nb = static_cast<double>((i1 - i0) * len);
      opmath_t c = static_cast<opmath_t>(st.mean);
      if (st.n == 0) {
        V sa(opmath_t(0)), sb(opmath_t(0));
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* q = p + i * stride + s0;
          if (i + kAhead < N) prefetch_run(q + kAhead * stride, len);
          for (int64_t k = 0; k < len; k += P::kSize) {
            V a, b;
            if (len - k >= P::kSize) {
              P::load_any(q + k, a, b);
            } else {
              P::load(q + k, a, b, len - k);
            }
            sa += a;
            sb += b;
          }
        }
        c = static_cast<opmath_t>(lane_sum(sa + sb) / nb);
      }
      const V cv(c);
      V t1a(opmath_t(0)), t1b(opmath_t(0)), t2a(opmath_t(0)), t2b(opmath_t(0));
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* q = p + i * stride + s0;
        if (st.n > 0 && i + kAhead < N) prefetch_run(q + kAhead * stride, len);  // (a first tile is in cache)
        for (int64_t k = 0; k < len; k += P::kSize) {
          const int64_t cnt = std::min(P::kSize, len - k);
          V a, b;
          if (cnt == P::kSize) {
            P::load_any(q + k, a, b);
            a = a - cv;
            b = b - cv;
          } else {  // lanes past the run read zeros: no deviation there
            P::load(q + k, a, b, cnt);
            a = first(a - cv, cnt);
            b = first(b - cv, cnt - h);
          }
          t1a += a;
          t1b += b;
          t2a = at::vec::fmadd(a, a, t2a);
          t2b = at::vec::fmadd(b, b, t2b);
        }
      }
      st.add(nb, static_cast<double>(c), lane_sum(t1a + t1b), lane_sum(t2a + t2b));
    }
  }
}

// out = (x - mean) * scale + shift over a run; with kWithU, + alpha * u; without kCentred,
// out = x * scale + shift (mean unused).
template <bool kWithU, typename scalar_t, typename opmath_t, bool kCentred = true>
void run_affine(const scalar_t* u, const scalar_t* x, int64_t len, opmath_t alpha, opmath_t mean, opmath_t scale,
                opmath_t shift, scalar_t* out) {
  using P = Pack<scalar_t>;
  using V = typename P::V;
  const V al(alpha), mu(mean), sc(scale), sh(shift);
  auto pack = [&](V a, V b, const V& ua, const V& ub, V& ya, V& yb) {
    if constexpr (kCentred) {
      a = a - mu;
      b = b - mu;
    }
    ya = at::vec::fmadd(a, sc, sh);
    yb = at::vec::fmadd(b, sc, sh);
    if constexpr (kWithU) {
      ya = at::vec::fmadd(al, ua, ya);
      yb = at::vec::fmadd(al, ub, yb);
    }
  };
  int64_t k = 0;
  for (; k + P::kSize <= len; k += P::kSize) {  // full packs, lanes in the Pack's order
    V a, b, ua, ub, ya, yb;
    P::load_any(x + k, a, b);
    if constexpr (kWithU) P::load_any(u + k, ua, ub);
    pack(a, b, ua, ub, ya, yb);
    P::store_any(out + k, ya, yb);
  }
  if (k < len) {
    const int64_t cnt = len - k;
    V a, b, ua, ub, ya, yb;
    P::load(x + k, a, b, cnt);
    if constexpr (kWithU) P::load(u + k, ua, ub, cnt);
    pack(a, b, ua, ub, ya, yb);
    P::store(out + k, ya, yb, cnt);
  }
}

// s1 = sum(dy), s2 = sum(dy * (x - mean)) over one channel's N runs of L values (float over
// tiles as in plane_moments, double across them).
template <typename scalar_t, typename opmath_t>
void plane_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t N, int64_t L, int64_t stride, opmath_t mean,
                     double& s1, double& s2) {
  using P = Pack<scalar_t>;
  using V = typename P::V;
  const V mu(mean);
  const int64_t group = std::max<int64_t>(1, kSegment / std::max<int64_t>(L, 1));
  const int64_t seg = std::min(L, kSegment);
  s1 = s2 = 0;
  for (int64_t i0 = 0; i0 < N; i0 += group) {
    const int64_t i1 = std::min(N, i0 + group);
    for (int64_t s0 = 0; s0 < L; s0 += seg) {
      const int64_t len = std::min(seg, L - s0);
      V a1(opmath_t(0)), b1(opmath_t(0)), a2(opmath_t(0)), b2(opmath_t(0));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = i * stride + s0;
        if (i + kAhead < N) {
          prefetch_run(dy + o + kAhead * stride, len);
          prefetch_run(x + o + kAhead * stride, len);
        }
        for (int64_t k = 0; k < len; k += P::kSize) {
          const int64_t cnt = std::min(P::kSize, len - k);
          V ga, gb, xa, xb;
          if (cnt == P::kSize) {
            P::load_any(dy + o + k, ga, gb);
            P::load_any(x + o + k, xa, xb);
          } else {
            P::load(dy + o + k, ga, gb, cnt);
            P::load(x + o + k, xa, xb, cnt);
          }
          a1 += ga;
          b1 += gb;
          a2 = at::vec::fmadd(ga, xa - mu, a2);  // zero past the run: dy reads zeros there
          b2 = at::vec::fmadd(gb, xb - mu, b2);
        }
      }
      s1 += lane_sum(a1 + b1);
      s2 += lane_sum(a2 + b2);
    }
  }
}

// ---------------------------------------------------------------------------------------------

// Per-channel output of the statistics: mean, biased var, rstd, and the coefficients of y.
template <typename opmath_t>
struct ChannelOut {
  opmath_t *mean, *var, *rstd, *scale, *shift;
  const opmath_t *weight, *bias;
  double eps;
  // Where given: y = x * gain + offset, the same map folded (for 16-bit input, see forward_into).
  opmath_t *gain = nullptr, *offset = nullptr;
  void set(int64_t c, const Moments& m) {
    const double var_c = m.n > 0 ? std::max(m.m2 / m.n, 0.0) : std::numeric_limits<double>::quiet_NaN();
    const double mean_c = m.n > 0 ? m.mean : std::numeric_limits<double>::quiet_NaN();
    set(c, mean_c, var_c, 1.0 / std::sqrt(var_c + eps));
  }
  // set() for every channel of a rows range, whose moments are arrays with one count n: the
  // variances and rstd a vector of channels at a time (the same IEEE divisions and square roots as
  // set's, so the same values), which at a few hundred channels and rows took a tenth of a forward
  // one channel at a time.
  void set_all(int64_t C, double n, const double* mean_in, const double* m2_in) {
    using VD = Vectorized<double>;
    if (!(n > 0)) {
      for (int64_t c = 0; c < C; ++c) set(c, Moments{});
      return;
    }
    std::vector<double> var_d(C), r_d(C);
    const VD vn(n), zero(0.0), veps(eps), one(1.0);
    int64_t c = 0;
    for (; c + VD::size() <= C; c += VD::size()) {
      const VD v = at::vec::maximum(VD::loadu(m2_in + c) / vn, zero);
      v.store(var_d.data() + c);
      (one / (v + veps).sqrt()).store(r_d.data() + c);
    }
    for (; c < C; ++c) {
      var_d[c] = std::max(m2_in[c] / n, 0.0);
      r_d[c] = 1.0 / std::sqrt(var_d[c] + eps);
    }
    for (c = 0; c < C; ++c) set(c, mean_in[c], var_d[c], r_d[c]);
  }
  inline void set(int64_t c, double mean_c, double var_c, double r) {
    const opmath_t mean_f = static_cast<opmath_t>(mean_c);
    const double sc = weight ? r * static_cast<double>(weight[c]) : r;
    mean[c] = mean_f;
    var[c] = static_cast<opmath_t>(var_c);
    rstd[c] = static_cast<opmath_t>(r);
    scale[c] = static_cast<opmath_t>(sc);
    // y = (x - mean_f) * scale + shift = (x - mean) * scale + bias.
    shift[c] = static_cast<opmath_t>((bias ? static_cast<double>(bias[c]) : 0.0) -
                                     (mean_c - static_cast<double>(mean_f)) * sc);
    if (gain) {
      // A constant channel (var 0: every x is the mean) maps to bias exactly, as in the centred form.
      gain[c] = var_c == 0 ? opmath_t(0) : static_cast<opmath_t>(sc);
      offset[c] = static_cast<opmath_t>((bias ? static_cast<double>(bias[c]) : 0.0) - (var_c == 0 ? 0.0 : mean_c * sc));
    }
  }
};

Tensor channel_vector(const Tensor& v, at::ScalarType dtype) {
  return v.defined() ? v.to(dtype).contiguous() : Tensor();
}

}  // namespace

namespace {

// Block k of n samples cut into blocks of v (the last may be smaller): its first sample, its
// sample count, and its geometry (rows: the block's rows; planes: its samples). A block of a
// contiguous or channels-last tensor is one run of memory, numel / n elements a sample.
struct Block {
  int64_t start, count;
  Geometry g;
};

Block block(const Geometry& g, int64_t n, int64_t v, int64_t k) {
  const int64_t start = k * v, count = std::min(v, n - start);
  Geometry gk = g;
  if (count != n) gk.n = g.rows ? g.n / n * count : count;
  return {start, count, gk};
}

int64_t block_count(int64_t n, int64_t v) { return n == 0 ? 1 : (n + v - 1) / v; }

// The forward over each block of v samples of x (v = N: the whole batch; v < N: ghost batches),
// each with its own statistics: x and y laid out as whole says (contiguous, or channels-last),
// mean, var and rstd (blocks * C) contiguous, written block after block.
void forward_into(const Tensor& x, const Geometry& whole, const Tensor& w, const Tensor& b, double eps, int64_t v,
                  const Tensor& y, const Tensor& mean, const Tensor& var, const Tensor& rstd) {
  const int64_t C = whole.c, n = x.size(0), per_sample = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_bn_forward_kernel", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> scale(C), shift(C), gain, offset, lanes[2];
    ChannelOut<opmath_t> out{nullptr, nullptr, nullptr, scale.data(), shift.data(),
                             w.defined() ? w.const_data_ptr<opmath_t>() : nullptr,
                             b.defined() ? b.const_data_ptr<opmath_t>() : nullptr, eps};
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      // float16/bfloat16 (rows and planes): y = x * gain + offset, one operation (and, in rows, two
      // coefficient loads) fewer per vector than (x - mean) * scale + shift in the y pass, which
      // the conversions to and from 16 bits make compute-bound. The centred form guards float32 outputs against
      // cancellation for inputs far from zero; here the folded form's float error (about
      // 2^-23 |x * gain|) stays below the output's own rounding (2^-9 |y| for bfloat16, 2^-11 for
      // float16) unless |x - mean| < 2^-12 |x|, and 16-bit inputs that close to their mean are
      // equal to it (their spacing is 2^-8 |x| in bfloat16, 2^-10 |x| in float16).
      gain.resize(C);
      offset.resize(C);
      out.gain = gain.data();
      out.offset = offset.data();
    }
    for (int64_t k = 0, blocks = block_count(n, v); k < blocks; ++k) {
      const Block blk = block(whole, n, v, k);
      const Geometry& g = blk.g;
      const scalar_t* xp = x.const_data_ptr<scalar_t>() + blk.start * per_sample;
      scalar_t* yp = y.mutable_data_ptr<scalar_t>() + blk.start * per_sample;
      out.mean = mean.mutable_data_ptr<opmath_t>() + k * C;
      out.var = var.mutable_data_ptr<opmath_t>() + k * C;
      out.rstd = rstd.mutable_data_ptr<opmath_t>() + k * C;
      if (g.rows) {
        const int64_t R = g.n;
        const int64_t chunks = row_chunks(R, C);
        // Each chunk's column means and M2 (chunk k: rows [k * R / chunks, (k + 1) * R / chunks)),
        // merged into chunk 0's.
        std::vector<double> means(std::max<int64_t>(chunks, 1) * C), m2s(std::max<int64_t>(chunks, 1) * C);
        for_chunks(chunks, [&](int64_t k0, int64_t k1) {
          for (int64_t k = k0; k < k1; ++k) {
            rows_moments(xp, C, k * R / chunks, (k + 1) * R / chunks, means.data() + k * C, m2s.data() + k * C);
          }
        });
        if (chunks > 1) {
          for (int64_t c = 0; c < C; ++c) {
            Moments m{static_cast<double>(R / chunks), means[c], m2s[c]};
            for (int64_t k = 1; k < chunks; ++k) {
              m.merge(static_cast<double>((k + 1) * R / chunks - k * R / chunks), means[k * C + c], m2s[k * C + c]);
            }
            means[c] = m.mean;
            m2s[c] = m.m2;
          }
        }
        out.set_all(C, static_cast<double>(R), means.data(), m2s.data());
        const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
        if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
          const opmath_t* gain_l = in_lane_order<scalar_t>(out.gain, C, lanes[0]);
          const opmath_t* offset_l = in_lane_order<scalar_t>(out.offset, C, lanes[1]);
          at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
            rows_affine<false, scalar_t, opmath_t, false>(xp, xp, C, r0, r1, nullptr, nullptr, gain_l, offset_l, yp);
          });
        } else {
          at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
            rows_affine<false>(xp, xp, C, r0, r1, out.scale, out.mean, out.scale, out.shift, yp);
          });
        }
      } else {
        const int64_t N = g.n, L = g.l;
        const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(N * L, 1));
        at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            Moments m;
            plane_moments(xp + c * L, N, L, C * L, m);
            out.set(c, m);
            for (int64_t i = 0; i < N; ++i) {
              const int64_t o = (i * C + c) * L;
              if (i + kAhead < N) prefetch_run(yp + o + kAhead * C * L, L, true);
              if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {  // y = x * gain + offset
                run_affine<false, scalar_t, opmath_t, false>(xp, xp + o, L, opmath_t(0), opmath_t(0), out.gain[c],
                                                             out.offset[c], yp + o);
              } else {
                run_affine<false>(xp, xp + o, L, opmath_t(0), out.mean[c], out.scale[c], out.shift[c], yp + o);
              }
            }
          }
        });
      }
    }
  });
}

// x as the kernels read it (contiguous, or channels-last read in place), its geometry, and weight
// and bias as op-math vectors, checked.
struct Prepared {
  Geometry g;
  Tensor x, w, b;
};

Prepared prepare(const Tensor& input, const Tensor& weight, const Tensor& bias, const char* name) {
  TORCH_CHECK(input.device().is_cpu() && input.dim() >= 2 && at::isFloatingType(input.scalar_type()),
              "torch_bn ", name, " expects a (N, C, *) floating CPU tensor, got ", input.scalar_type(), " ",
              input.sizes(), " on ", input.device());
  const Geometry g = geometry(input);
  const Tensor x = g.rows && g.format != at::MemoryFormat::Contiguous ? input : input.contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  const Tensor w = channel_vector(weight, acc), b = channel_vector(bias, acc);
  TORCH_CHECK(!w.defined() || w.numel() == g.c, "weight has ", w.numel(), " elements, expected ", g.c);
  TORCH_CHECK(!b.defined() || b.numel() == g.c, "bias has ", b.numel(), " elements, expected ", g.c);
  return {g, x, w, b};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_kernel(const Tensor& input, const Tensor& weight,
                                                          const Tensor& bias, double eps) {
  const Prepared p = prepare(input, weight, bias, "forward_kernel");
  const auto opts = p.x.options().dtype(at::toOpMathType(p.x.scalar_type()));
  Tensor y = empty_output(p.x, p.g.format);
  Tensor mean = at::empty({p.g.c}, opts), var = at::empty({p.g.c}, opts), rstd = at::empty({p.g.c}, opts);
  forward_into(p.x, p.g, p.w, p.b, eps, std::max<int64_t>(p.x.size(0), 1), y, mean, var, rstd);
  return {y, mean, var, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_forward_kernel(const Tensor& input, const Tensor& weight,
                                                                const Tensor& bias, int64_t virtual_batch_size,
                                                                double eps) {
  const Prepared p = prepare(input, weight, bias, "ghost_forward_kernel");
  TORCH_CHECK(virtual_batch_size >= 1, "torch_bn ghost_forward_kernel: virtual_batch_size must be >= 1, got ",
              virtual_batch_size);
  const int64_t chunks = block_count(p.x.size(0), virtual_batch_size);
  const auto opts = p.x.options().dtype(at::toOpMathType(p.x.scalar_type()));
  Tensor y = empty_output(p.x, p.g.format);
  Tensor mean = at::empty({chunks, p.g.c}, opts), var = at::empty({chunks, p.g.c}, opts);
  Tensor rstd = at::empty({chunks, p.g.c}, opts);
  forward_into(p.x, p.g, p.w, p.b, eps, virtual_batch_size, y, mean, var, rstd);
  return {y, mean, var, rstd};
}

namespace {

// The closed-form backward over each block of v samples (as forward_into's): dy, x and dx laid out
// as whole says; mean, rstd (blocks * C) each block's statistics; dweight, dbias (blocks * C)
// each block's sums, written.
void backward_into(const Tensor& dy, const Tensor& x, const Geometry& whole, const Tensor& w, const Tensor& mean,
                   const Tensor& rstd, int64_t v, bool need_dx, const Tensor& dx, const Tensor& dweight,
                   const Tensor& dbias) {
  const int64_t C = whole.c, n = x.size(0), per_sample = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torch_bn_backward_kernel", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* wp = w.defined() ? w.const_data_ptr<opmath_t>() : nullptr;
    std::vector<opmath_t> alpha(C), beta(C), gamma(C), lanes[4];
    for (int64_t k = 0, blocks = block_count(n, v); k < blocks; ++k) {
      const Block blk = block(whole, n, v, k);
      const Geometry& g = blk.g;
      const double M = static_cast<double>(C == 0 ? 0 : blk.count * per_sample / C);
      const scalar_t* xp = x.const_data_ptr<scalar_t>() + blk.start * per_sample;
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>() + blk.start * per_sample;
      const opmath_t* mp = mean.const_data_ptr<opmath_t>() + k * C;
      const opmath_t* rp = rstd.const_data_ptr<opmath_t>() + k * C;
      opmath_t* dwp = dweight.mutable_data_ptr<opmath_t>() + k * C;
      opmath_t* dbp = dbias.mutable_data_ptr<opmath_t>() + k * C;
      scalar_t* dxp = need_dx ? dx.mutable_data_ptr<scalar_t>() + blk.start * per_sample : nullptr;
      // dbias, dweight and dx's coefficients from the sums of one channel.
      auto finish = [&](int64_t c, double s1, double s2) {
        const double r = static_cast<double>(rp[c]);
        const double gc = wp ? r * static_cast<double>(wp[c]) : r;
        dbp[c] = static_cast<opmath_t>(s1);
        dwp[c] = static_cast<opmath_t>(r * s2);
        alpha[c] = static_cast<opmath_t>(gc);
        beta[c] = static_cast<opmath_t>(-gc * r * r * s2 / M);
        gamma[c] = static_cast<opmath_t>(-gc * s1 / M);
      };
      if (g.rows) {
        const int64_t R = g.n;
        const int64_t chunks = row_chunks(R, C);
        const opmath_t* mean_l = in_lane_order<scalar_t>(mp, C, lanes[0]);
        std::vector<double> s1(std::max<int64_t>(chunks, 1) * C, 0.0), s2(std::max<int64_t>(chunks, 1) * C, 0.0);
        for_chunks(chunks, [&](int64_t k0, int64_t k1) {
          for (int64_t k = k0; k < k1; ++k) {
            rows_grad_sums(dyp, xp, C, k * R / chunks, (k + 1) * R / chunks, mean_l, s1.data() + k * C,
                           s2.data() + k * C);
          }
        });
        for (int64_t c = 0; c < C; ++c) {
          double t1 = s1[c], t2 = s2[c];
          for (int64_t k = 1; k < chunks; ++k) {
            t1 += s1[k * C + c];
            t2 += s2[k * C + c];
          }
          finish(c, t1, t2);
        }
        if (need_dx) {
          const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
          const opmath_t* alpha_l = in_lane_order<scalar_t>(alpha.data(), C, lanes[1]);
          const opmath_t* beta_l = in_lane_order<scalar_t>(beta.data(), C, lanes[2]);
          const opmath_t* gamma_l = in_lane_order<scalar_t>(gamma.data(), C, lanes[3]);
          at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
            rows_affine<true>(dyp, xp, C, r0, r1, alpha_l, mean_l, beta_l, gamma_l, dxp);
          });
        }
      } else {
        const int64_t N = g.n, L = g.l;
        const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(N * L, 1));
        at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            double t1, t2;
            plane_grad_sums(dyp + c * L, xp + c * L, N, L, C * L, mp[c], t1, t2);
            finish(c, t1, t2);
            if (need_dx) {
              for (int64_t i = 0; i < N; ++i) {
                const int64_t o = (i * C + c) * L;
                if (i + kAhead < N) prefetch_run(dxp + o + kAhead * C * L, L, true);
                run_affine<true>(dyp + o, xp + o, L, alpha[c], mp[c], beta[c], gamma[c], dxp + o);
              }
            }
          }
        });
      }
    }
  });
}

void check_grad(const Tensor& grad, const Tensor& input, const char* name) {
  TORCH_CHECK(grad.sizes() == input.sizes(), "torch_bn ", name, ": the gradient's shape ", grad.sizes(),
              " differs from the input's ", input.sizes());
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "torch_bn ", name, ": the gradient's dtype ",
              grad.scalar_type(), " differs from the input's ", input.scalar_type());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> backward_kernel(const Tensor& grad, const Tensor& input, const Tensor& weight,
                                                   const Tensor& mean_in, const Tensor& rstd_in, bool need_dx) {
  check_grad(grad, input, "backward_kernel");
  const Prepared p = prepare(input, weight, Tensor(), "backward_kernel");
  const Tensor dy = grad.contiguous(p.g.format);
  const auto acc = at::toOpMathType(p.x.scalar_type());
  const Tensor mean = channel_vector(mean_in, acc), rstd = channel_vector(rstd_in, acc);
  Tensor dweight = at::empty({p.g.c}, p.x.options().dtype(acc));
  Tensor dbias = at::empty({p.g.c}, p.x.options().dtype(acc));
  Tensor dx = need_dx ? empty_output(p.x, p.g.format) : Tensor();
  backward_into(dy, p.x, p.g, p.w, mean, rstd, std::max<int64_t>(p.x.size(0), 1), need_dx, dx, dweight, dbias);
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor, Tensor> ghost_backward_kernel(const Tensor& grad, const Tensor& input,
                                                         const Tensor& weight, const Tensor& mean_in,
                                                         const Tensor& rstd_in, int64_t virtual_batch_size,
                                                         bool need_dx) {
  check_grad(grad, input, "ghost_backward_kernel");
  TORCH_CHECK(virtual_batch_size >= 1, "torch_bn ghost_backward_kernel: virtual_batch_size must be >= 1, got ",
              virtual_batch_size);
  const Prepared p = prepare(input, weight, Tensor(), "ghost_backward_kernel");
  const Tensor dy = grad.contiguous(p.g.format);
  const auto acc = at::toOpMathType(p.x.scalar_type());
  const Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  const int64_t chunks = block_count(p.x.size(0), virtual_batch_size);
  TORCH_CHECK(mean.numel() == chunks * p.g.c && rstd.numel() == chunks * p.g.c,
              "torch_bn ghost_backward_kernel: mean and rstd must be (ghost batches, C) = (", chunks, ", ", p.g.c,
              "), got ", mean.sizes(), " and ", rstd.sizes());
  Tensor dweights = at::empty({chunks, p.g.c}, p.x.options().dtype(acc));
  Tensor dbiases = at::empty({chunks, p.g.c}, p.x.options().dtype(acc));
  Tensor dx = need_dx ? empty_output(p.x, p.g.format) : Tensor();
  backward_into(dy, p.x, p.g, p.w, mean, rstd, virtual_batch_size, need_dx, dx, dweights, dbiases);
  // The parameters' gradients are the sums over the ghost batches (in double, then op-math).
  Tensor dweight = at::empty({p.g.c}, dweights.options()), dbias = at::empty({p.g.c}, dbiases.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "torch_bn_ghost_backward_sums", [&] {
    for (auto [sums, total] : {std::pair{&dweights, &dweight}, std::pair{&dbiases, &dbias}}) {
      const scalar_t* per_chunk = sums->const_data_ptr<scalar_t>();
      scalar_t* out = total->mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < p.g.c; ++c) {
        double t = 0.0;
        for (int64_t k = 0; k < chunks; ++k) t += static_cast<double>(per_chunk[k * p.g.c + c]);
        out[c] = static_cast<scalar_t>(t);
      }
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace torch_bn_cpp
