// CPU kernels of LayerNorm / RMSNorm (+ fused residual add), forward and backward.
//
// Forward, per row: pass 1 reads the row from memory (adding the residual and writing the sum, or
// widening bfloat16/float16, into a float staging row) and sums it; pass 2 sums the squared
// deviations from the mean -- exact two-pass statistics, never E[x^2] - E[x]^2; pass 3 writes the
// output. Passes 2 and 3 read the row from L1/L2, so memory sees one read and one write per element.
//
// Backward, per row: pass A sums g*w*xhat and g*w; pass B writes dx and adds g*xhat and g into the
// dweight/dbias partial rows of the row's chunk. Chunks are a partition of the rows that depends on
// the shape only, and the partial rows are summed in chunk order, so dweight/dbias are the same bits
// whatever the thread count.
//
// Sums use 4 vector accumulators that restart every kBlock elements (blocked summation: the error
// grows with N / kBlock, not N); their order is fixed by this code, so results are deterministic.
#include "norm_kernels.h"

#include "output_cache.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace layernorm {
namespace {

using simd::kLanes;
using simd::Vec;

template <typename T>
using acc_t = typename simd::Acc<T>::type;

// Elements per task below which a forward or backward pass is not split over threads: the start of a
// parallel region costs a few microseconds, as much as normalizing ~16k floats.
constexpr int64_t kParallelGrainElements = 32768;
// dweight/dbias chunks: at most this many (enough for 64 threads), each of at least kChunkElements
// elements when the shape allows (the partial rows then cost little next to dy and x).
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kChunkElements = 65536;

template <typename A, typename VecTerm, typename ScalarTerm>
inline A reduce(int64_t n, VecTerm vec_term, ScalarTerm scalar_term) {
  constexpr int L = kLanes<A>;
  constexpr int64_t kBlock = 64 * L;
  using V = Vec<A>;
  V total = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t j = i; j < i + kBlock; j += 4 * L) {
      a0 += vec_term(j);
      a1 += vec_term(j + L);
      a2 += vec_term(j + 2 * L);
      a3 += vec_term(j + 3 * L);
    }
    total += (a0 + a1) + (a2 + a3);
  }
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 += vec_term(i);
    a1 += vec_term(i + L);
    a2 += vec_term(i + 2 * L);
    a3 += vec_term(i + 3 * L);
  }
  for (; i + L <= n; i += L) a0 += vec_term(i);
  total += (a0 + a1) + (a2 + a3);
  A s = simd::hsum<A>(total);
  for (; i < n; ++i) s += scalar_term(i);
  return s;
}

// Two sums in one sweep (the backward's pass A). vec_term(j, &u, &v) adds its terms to u and v.
template <typename A, typename VecTerm, typename ScalarTerm>
inline std::pair<A, A> reduce2(int64_t n, VecTerm vec_term, ScalarTerm scalar_term) {
  constexpr int L = kLanes<A>;
  constexpr int64_t kBlock = 64 * L;
  using V = Vec<A>;
  V total_u = {}, total_v = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    V u0 = {}, u1 = {}, v0 = {}, v1 = {};
    for (int64_t j = i; j < i + kBlock; j += 2 * L) {
      vec_term(j, u0, v0);
      vec_term(j + L, u1, v1);
    }
    total_u += u0 + u1;
    total_v += v0 + v1;
  }
  V u0 = {}, u1 = {}, v0 = {}, v1 = {};
  for (; i + 2 * L <= n; i += 2 * L) {
    vec_term(i, u0, v0);
    vec_term(i + L, u1, v1);
  }
  for (; i + L <= n; i += L) vec_term(i, u0, v0);
  total_u += u0 + u1;
  total_v += v0 + v1;
  A su = simd::hsum<A>(total_u), sv = simd::hsum<A>(total_v);
  for (; i < n; ++i) scalar_term(i, su, sv);
  return {su, sv};
}

// rstd of a row whose squared deviations overflowed (|x| ~ 1e20 in float32): rescale by the largest
// magnitude s, as reference.row_rstd: rstd = 1 / (s * sqrt(mean((c / s)^2) + eps / s^2)).
// Returns the plain rstd unchanged when the row is not finite (NaN/Inf stay in their row).
template <typename A>
A rescaled_rstd(const A* h, int64_t n, A mean, A eps, A plain_rstd) {
  A scale = 0;
  for (int64_t j = 0; j < n; ++j) scale = std::max(scale, std::fabs(h[j] - mean));
  if (!std::isfinite(scale) || std::isnan(scale)) return plain_rstd;
  A safe = scale > 0 ? scale : A(1);
  A sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    A c = (h[j] - mean) / safe;
    sum += c * c;
  }
  return A(1) / std::sqrt(sum / A(n) + eps / (safe * safe)) / safe;
}

template <typename T, bool kRms>
void forward_row(const T* x, const T* r, T* z, T* y, int64_t n, const acc_t<T>* w, const acc_t<T>* b,
                 acc_t<T> eps, bool round_normalized, acc_t<T>* staging, acc_t<T>* mean_out,
                 acc_t<T>* rstd_out, const T* x_next, const T* r_next, bool stream) {
  using A = acc_t<T>;
  using V = Vec<A>;
  constexpr int L = kLanes<A>;
  constexpr bool kWide = std::is_same_v<T, A>;  // float32 or float64 storage: no staging needed
  const bool staged = r != nullptr || !kWide;

  // Pass 1: h = x (+ residual, rounded to T as it is stored in z); LN sums h, RMSNorm sums h^2.
  const A* h;
  A first;
  if (staged) {
    first = reduce<A>(
        n,
        [&](int64_t j) {
          V v = simd::load(x + j);
          if (r != nullptr) {
            v = simd::round_to<T>(v + simd::load(r + j));
            simd::store(z + j, v);
          }
          simd::store(staging + j, v);
          return kRms ? v * v : v;
        },
        [&](int64_t j) {
          A v = simd::to_acc(x[j]);
          if (r != nullptr) {
            z[j] = simd::from_acc<T>(v + simd::to_acc(r[j]));
            v = simd::to_acc(z[j]);
          }
          staging[j] = v;
          return kRms ? v * v : v;
        });
    h = staging;
  } else {
    h = reinterpret_cast<const A*>(x);
    first = reduce<A>(
        n,
        [&](int64_t j) {
          V v = simd::load(h + j);
          return kRms ? v * v : v;
        },
        [&](int64_t j) { return kRms ? h[j] * h[j] : h[j]; });
  }

  // Pass 2: the biased variance about the mean (LN), or the mean square (RMSNorm).
  const A mean = kRms ? A(0) : first / A(n);
  A var;
  if constexpr (kRms) {
    var = first / A(n);
  } else {
    const V vmean = simd::splat(mean);
    var = reduce<A>(
              n,
              [&](int64_t j) {
                V c = simd::load(h + j) - vmean;
                return c * c;
              },
              [&](int64_t j) {
                A c = h[j] - mean;
                return c * c;
              }) /
          A(n);
  }
  A rstd = A(1) / std::sqrt(var + eps);
  if (std::isinf(var)) rstd = rescaled_rstd(h, n, mean, eps, rstd);

  // Pass 3: y = xhat * w + b, xhat = (h - mean) * rstd (rounded to T first: Llama's casting).
  // It runs from cache, so it also asks for the next row: memory keeps streaming while this one is
  // finished, and that row's pass 1 finds it in cache (without this, wide rows reached ~0.8 of a copy).
  const V vmean = simd::splat(mean), vrstd = simd::splat(rstd);
  // The options are loop invariants. Passed as std::true_type / std::false_type they are constants and
  // leave the loop (gcc did not unswitch it: five tests and branches per vector, most of the bfloat16
  // forward's time in cache); passed as bool they stay runtime branches, for the rarer combinations.
  const T* px = x_next != nullptr ? x_next : x;  // prefetching a line already in cache is harmless
  const T* pr = r_next != nullptr ? r_next : px;
  int64_t j = 0;
  auto finish = [&](auto use_w, auto use_b, auto round, auto streaming) {
    for (; j + L <= n; j += L) {
      __builtin_prefetch(px + j);
      __builtin_prefetch(pr + j);
      V xh = (simd::load(h + j) - vmean) * vrstd;
      if (round) xh = simd::round_to<T>(xh);
      if (use_w) xh = xh * simd::load(w + j);
      if (use_b) xh = xh + simd::load(b + j);
      if (streaming) {
        simd::store_stream(y + j, xh);
      } else {
        simd::store(y + j, xh);
      }
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  const bool has_w = w != nullptr, has_b = b != nullptr;
  if (has_w && has_b && !round_normalized) {  // LayerNorm
    stream ? finish(Yes{}, Yes{}, No{}, Yes{}) : finish(Yes{}, Yes{}, No{}, No{});
  } else if (has_w && !has_b) {  // RMSNorm, Llama's casting or not
    if (round_normalized) {
      stream ? finish(Yes{}, No{}, Yes{}, Yes{}) : finish(Yes{}, No{}, Yes{}, No{});
    } else {
      stream ? finish(Yes{}, No{}, No{}, Yes{}) : finish(Yes{}, No{}, No{}, No{});
    }
  } else {
    finish(has_w, has_b, round_normalized, stream);
  }
  for (; j < n; ++j) {
    A xh = (h[j] - mean) * rstd;
    if (round_normalized) xh = simd::round_scalar_to<T>(xh);
    if (w != nullptr) xh = xh * w[j];
    if (b != nullptr) xh = xh + b[j];
    y[j] = simd::from_acc<T>(xh);
  }
  if (mean_out != nullptr) *mean_out = mean;
  if (rstd_out != nullptr) *rstd_out = rstd;
}

// Backward rows with wide partial rows are processed in groups: pass A per row, then pass B over the
// group column by column, so each partial dweight/dbias element is loaded and stored once per group
// instead of once per row.
constexpr int kRowGroup = 4;
constexpr int64_t kGroupAbovePartialBytes = 16384;

// Pass A of one row: (mean(dxhat * xhat), mean(dxhat)), dxhat = g * w (the second is 0 for RMSNorm).
template <typename T, bool kRms>
std::pair<acc_t<T>, acc_t<T>> backward_row_means(const T* dy, const T* h, int64_t n, const acc_t<T>* w,
                                                 acc_t<T> mean, acc_t<T> rstd) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const V vmean = simd::splat(mean), vrstd = simd::splat(rstd);
  auto [sum_dxhat_xhat, sum_dxhat] = reduce2<A>(
      n,
      [&](int64_t j, V& u, V& v) {
        V g = simd::load(dy + j);
        if (w != nullptr) g = g * simd::load(w + j);
        V xh = (simd::load(h + j) - vmean) * vrstd;
        u += g * xh;
        if (!kRms) v += g;
      },
      [&](int64_t j, A& u, A& v) {
        A g = simd::to_acc(dy[j]);
        if (w != nullptr) g *= w[j];
        A xh = (simd::to_acc(h[j]) - mean) * rstd;
        u += g * xh;
        if (!kRms) v += g;
      });
  return {sum_dxhat_xhat / A(n), kRms ? A(0) : sum_dxhat / A(n)};
}

// Pass B of rows [first, first + count): dx = rstd * (dxhat - xhat * k1 - k2) (+ dz), and
// g * xhat, g added into the partial rows dw_acc, db_acc (row by row, in order, per column).
template <typename T, bool kRms, int count>
void backward_rows_fixed(int64_t first, int64_t n, const T* dy, const T* dz, const T* h, T* dx,
                         const acc_t<T>* w, const acc_t<T>* mean, const acc_t<T>* rstd, bool round_normalized,
                         acc_t<T>* dw_acc, acc_t<T>* db_acc) {
  using A = acc_t<T>;
  using V = Vec<A>;
  constexpr int L = kLanes<A>;
  A k1[count] = {}, k2[count] = {}, rs[count], mu[count];
  const T *dyr[count], *hr[count], *dzr[count];
  T* dxr[count];
  for (int r = 0; r < count; ++r) {
    const int64_t i = first + r, off = i * n;
    dyr[r] = dy + off;
    hr[r] = h + off;
    dzr[r] = dz ? dz + off : nullptr;
    dxr[r] = dx ? dx + off : nullptr;
    mu[r] = kRms ? A(0) : mean[i];
    rs[r] = rstd[i];
    if (dx != nullptr) std::tie(k1[r], k2[r]) = backward_row_means<T, kRms>(dyr[r], hr[r], n, w, mu[r], rs[r]);
  }
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V wv = w != nullptr ? simd::load(w + j) : simd::splat(A(1));
    V accw = dw_acc != nullptr ? simd::load(dw_acc + j) : V{};
    V accb = db_acc != nullptr ? simd::load(db_acc + j) : V{};
#pragma GCC unroll 4
    for (int r = 0; r < count; ++r) {
      const V g = simd::load(dyr[r] + j);
      const V xh = (simd::load(hr[r] + j) - simd::splat(mu[r])) * simd::splat(rs[r]);
      if (dx != nullptr) {
        V d = simd::splat(rs[r]) * (g * wv - xh * simd::splat(k1[r]) - simd::splat(k2[r]));
        if (dz != nullptr) d += simd::load(dzr[r] + j);
        simd::store(dxr[r] + j, d);
      }
      accw += g * (round_normalized ? simd::round_to<T>(xh) : xh);
      accb += g;
    }
    if (dw_acc != nullptr) simd::store(dw_acc + j, accw);
    if (db_acc != nullptr) simd::store(db_acc + j, accb);
  }
  for (; j < n; ++j) {
    const A wj = w != nullptr ? w[j] : A(1);
    for (int r = 0; r < count; ++r) {
      const A g = simd::to_acc(dyr[r][j]);
      const A xh = (simd::to_acc(hr[r][j]) - mu[r]) * rs[r];
      if (dx != nullptr) {
        A d = rs[r] * (g * wj - xh * k1[r] - k2[r]);
        if (dz != nullptr) d += simd::to_acc(dzr[r][j]);
        dxr[r][j] = simd::from_acc<T>(d);
      }
      if (dw_acc != nullptr) dw_acc[j] += g * (round_normalized ? simd::round_scalar_to<T>(xh) : xh);
      if (db_acc != nullptr) db_acc[j] += g;
    }
  }
}

// The group size as a compile-time constant, so the loop over the group's rows is unrolled and its
// per-row constants stay in registers.
template <typename T, bool kRms>
void backward_rows(int64_t first, int count, int64_t n, const T* dy, const T* dz, const T* h, T* dx,
                   const acc_t<T>* w, const acc_t<T>* mean, const acc_t<T>* rstd, bool round_normalized,
                   acc_t<T>* dw_acc, acc_t<T>* db_acc) {
  static_assert(kRowGroup == 4, "the cases below cover groups of 1 to 4 rows");
  switch (count) {
    case 4: return backward_rows_fixed<T, kRms, 4>(first, n, dy, dz, h, dx, w, mean, rstd, round_normalized, dw_acc, db_acc);
    case 3: return backward_rows_fixed<T, kRms, 3>(first, n, dy, dz, h, dx, w, mean, rstd, round_normalized, dw_acc, db_acc);
    case 2: return backward_rows_fixed<T, kRms, 2>(first, n, dy, dz, h, dx, w, mean, rstd, round_normalized, dw_acc, db_acc);
    default: return backward_rows_fixed<T, kRms, 1>(first, n, dy, dz, h, dx, w, mean, rstd, round_normalized, dw_acc, db_acc);
  }
}

// Sums of many rows, the way torch sums (cascade summation): rows are added into level 0; once it holds
// kFanIn rows it is added into level 1 and cleared, and so on up. The rounding error then grows with
// kFanIn * log(rows) instead of with the number of rows, and the order depends only on the row count.
// Levels are allocated when first reached, so a chunk of a few rows costs one level.
template <typename A>
class CascadeRows {
 public:
  static constexpr int kFanIn = 16;
  static constexpr int kLevels = 6;  // 16^6 rows before the last level takes every row

  explicit CascadeRows(int64_t width) : width_(width) { level(0); }

  A* first() { return sums_[0].data(); }

  // `rows` more rows were added into first().
  void rows_added(int rows) {
    counts_[0] += rows;
    for (int l = 0; l < kLevels - 1 && counts_[l] >= kFanIn; ++l) {
      counts_[l] = 0;
      ++counts_[l + 1];
      A* from = sums_[l].data();
      A* to = level(l + 1);
      for (int64_t j = 0; j < width_; ++j) {
        to[j] += from[j];
        from[j] = A(0);
      }
    }
  }

  // The total into out (from the top level down), and every level cleared for the next chunk.
  void finish(A* out) {
    std::fill(out, out + width_, A(0));
    for (int l = static_cast<int>(sums_.size()) - 1; l >= 0; --l) {
      A* from = sums_[l].data();
      for (int64_t j = 0; j < width_; ++j) {
        out[j] += from[j];
        from[j] = A(0);
      }
      counts_[l] = 0;
    }
  }

 private:
  A* level(int l) {
    while (static_cast<int>(sums_.size()) <= l) sums_.emplace_back(static_cast<size_t>(width_), A(0));
    return sums_[l].data();
  }

  int64_t width_;
  std::vector<std::vector<A>> sums_;
  int counts_[kLevels] = {};
};

// A weight or bias as the kernels read it: accumulation-type values with RMSNorm's offset added
// (Gemma's 1 + w, in float32 as Gemma computes it). The parameter's own memory when it already is that,
// else a converted copy in a plain buffer (no tensor ops: for an inference-sized call, two dispatched
// conversions cost more than the normalization).
template <typename A>
class ParamValues {
 public:
  ParamValues(const std::optional<at::Tensor>& param, double offset) {
    if (!param.has_value() || !param->defined()) return;
    contiguous_ = param->contiguous();
    if (contiguous_.scalar_type() == c10::CppTypeToScalarType<A>::value && offset == 0.0) {
      data_ = contiguous_.const_data_ptr<A>();
      return;
    }
    const int64_t n = contiguous_.numel();
    converted_.resize(static_cast<size_t>(n));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, contiguous_.scalar_type(), "layernorm_param", [&] {
      const scalar_t* src = contiguous_.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) converted_[j] = static_cast<A>(src[j]) + static_cast<A>(offset);
    });
    data_ = converted_.data();
  }

  const A* data() const { return data_; }

 private:
  at::Tensor contiguous_;
  std::vector<A> converted_;
  const A* data_ = nullptr;
};

// Outputs at least this large are written with streaming stores (they would not stay in the caches
// anyway; the same threshold above which they come from the output cache, 2 MiB aligned).
constexpr int64_t kStreamingBytes = int64_t(32) << 20;

// Whether the output rows of out (M rows of N elements) take streaming stores: large enough, and every
// row's vectors aligned to the store size.
template <typename T>
bool streams(const T* out, int64_t M, int64_t N) {
  constexpr int64_t store_bytes = kLanes<acc_t<T>> * int64_t(sizeof(T));
  const int64_t row_bytes = N * int64_t(sizeof(T));
  return M * row_bytes >= kStreamingBytes && row_bytes % store_bytes == 0 &&
         reinterpret_cast<uintptr_t>(out) % store_bytes == 0;
}

int64_t rows_of(const at::Tensor& t, int64_t N) {
  if (N > 0) return t.numel() / N;
  int64_t m = 1;
  for (int64_t d = 0; d < t.dim(); ++d) m *= t.size(d);  // numel()/N is undefined for N = 0
  return m;
}

template <typename T, bool kRms>
void forward_impl(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, at::Tensor& z, at::Tensor& mean,
                  at::Tensor& rstd, int64_t M, int64_t N, const acc_t<T>* wp, const acc_t<T>* bp, double eps,
                  bool round_normalized) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  const T* rp = r.defined() ? r.const_data_ptr<T>() : nullptr;
  T* zp = r.defined() ? z.mutable_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  A* mp = kRms || !mean.defined() ? nullptr : mean.mutable_data_ptr<A>();
  A* sp = rstd.defined() ? rstd.mutable_data_ptr<A>() : nullptr;
  const bool staged = rp != nullptr || !std::is_same_v<T, A>;
  const bool stream = streams(yp, M, N);
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> staging(staged ? N : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = i * N;
      const bool more = i + 1 < end;
      forward_row<T, kRms>(xp + off, rp ? rp + off : nullptr, zp ? zp + off : nullptr, yp + off, N, wp, bp,
                           static_cast<A>(eps), round_normalized, staging.data(), mp ? mp + i : nullptr,
                           sp ? sp + i : nullptr, more ? xp + off + N : nullptr,
                           more && rp ? rp + off + N : nullptr, stream);
    }
    if (stream) simd::stream_fence();
  });
}

template <typename T, bool kRms>
void backward_impl(const at::Tensor& dy, const at::Tensor& dz, const at::Tensor& h, const at::Tensor& mean,
                   const at::Tensor& rstd, const acc_t<T>* wp, at::Tensor& dx, at::Tensor& dw, at::Tensor& db,
                   int64_t M, int64_t N, bool round_normalized) {
  using A = acc_t<T>;
  const T* dyp = dy.const_data_ptr<T>();
  const T* dzp = dz.defined() ? dz.const_data_ptr<T>() : nullptr;
  const T* hp = h.const_data_ptr<T>();
  const A* mp = kRms ? nullptr : mean.const_data_ptr<A>();
  const A* sp = rstd.const_data_ptr<A>();
  T* dxp = dx.defined() ? dx.mutable_data_ptr<T>() : nullptr;
  const bool want_dw = dw.defined(), want_db = db.defined();

  if (!want_dw && !want_db) {  // rows are independent: parallel like the forward
    const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(N, 1));
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        backward_rows<T, kRms>(i, 1, N, dyp, dzp, hp, dxp, wp, mp, sp, round_normalized, nullptr, nullptr);
      }
    });
    return;
  }

  // A partition of the rows into chunks that depends on (M, N) only.
  int64_t rows_per_chunk = std::max<int64_t>(1, (kChunkElements + N - 1) / N);
  int64_t chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  if (chunks > kMaxChunks) {
    rows_per_chunk = (M + kMaxChunks - 1) / kMaxChunks;
    chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  }
  const int64_t width = N * (int64_t(want_dw) + int64_t(want_db));
  // Rows in groups only where the partial rows outgrow L1: below that their loads and stores are
  // cheap, and one row at a time keeps each row's two passes back to back (faster for narrow rows).
  const int group = width * static_cast<int64_t>(sizeof(A)) > kGroupAbovePartialBytes ? kRowGroup : 1;
  // Uninitialised: each chunk writes its own partial rows, in parallel.
  std::unique_ptr<A[]> partial(new A[static_cast<size_t>(chunks * width)]);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    CascadeRows<A> cascade(width);
    for (int64_t c = cbegin; c < cend; ++c) {
      A* dw_acc = want_dw ? cascade.first() : nullptr;
      A* db_acc = want_db ? cascade.first() + (want_dw ? N : 0) : nullptr;
      const int64_t end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < end; i += group) {
        const int count = static_cast<int>(std::min<int64_t>(group, end - i));
        backward_rows<T, kRms>(i, count, N, dyp, dzp, hp, dxp, wp, mp, sp, round_normalized, dw_acc, db_acc);
        cascade.rows_added(count);
      }
      cascade.finish(partial.get() + c * width);
    }
  });
  // Per column, the partial rows summed in chunk order, written in the parameter's dtype.
  auto reduce_into = [&](at::Tensor& out, int64_t column_offset) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "layernorm_param_grad", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, N, kParallelGrainElements / 8, [&](int64_t begin, int64_t end) {
        std::vector<A> total(partial.get() + column_offset + begin, partial.get() + column_offset + end);
        for (int64_t c = 1; c < chunks; ++c) {  // row by row: contiguous, vectorized
          const A* row = partial.get() + c * width + column_offset;
          for (int64_t j = begin; j < end; ++j) total[j - begin] += row[j];
        }
        for (int64_t j = begin; j < end; ++j) o[j] = static_cast<scalar_t>(total[j - begin]);
      });
    });
  };
  if (want_dw) reduce_into(dw, 0);
  if (want_db) reduce_into(db, want_dw ? N : 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, int64_t N,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, bool rms,
    double offset, bool round_normalized, bool want_stats) {
  const at::Tensor x = input.contiguous();
  const bool has_residual = residual.has_value() && residual->defined();
  const at::Tensor r = has_residual ? residual->contiguous() : at::Tensor();
  const int64_t M = rows_of(x, N);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor z, mean, rstd;
  if (has_residual) z = empty_output(x.sizes(), x.options());
  if (want_stats) {
    z = has_residual ? z : x.new_empty({0});
    mean = x.new_empty({rms ? 0 : M}, x.options().dtype(acc));
    rstd = x.new_empty({M}, x.options().dtype(acc));
  }
  if (M == 0) return {y, z, mean, rstd};
  if (N == 0) {  // nothing to normalize: statistics of an empty row
    if (mean.defined()) mean.zero_();
    if (rstd.defined()) rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, z, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layernorm_norm_forward", [&] {
    using A = acc_t<scalar_t>;
    const ParamValues<A> w(weight, offset), b(bias, 0.0);
    if (rms) {
      forward_impl<scalar_t, true>(x, r, y, z, mean, rstd, M, N, w.data(), b.data(), eps, round_normalized);
    } else {
      forward_impl<scalar_t, false>(x, r, y, z, mean, rstd, M, N, w.data(), b.data(), eps, round_normalized);
    }
  });
  return {y, z, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t N, bool rms, double offset, bool round_normalized,
    std::array<bool, 3> output_mask) {
  const at::Tensor h = input.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  const bool has_dz = grad_sum.has_value() && grad_sum->defined();
  const at::Tensor dz = has_dz ? grad_sum->contiguous() : at::Tensor();
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const int64_t M = rows_of(h, N);
  at::Tensor dx = output_mask[0] ? empty_output(h.sizes(), h.options()) : at::Tensor();
  at::Tensor dw = output_mask[1] && has_w ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor db = output_mask[2] && has_b ? at::empty_like(*bias, at::MemoryFormat::Contiguous) : at::Tensor();
  if (M == 0 || N == 0) {
    if (dx.defined()) {
      if (has_dz) dx.copy_(dz); else dx.zero_();
    }
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "layernorm_norm_backward", [&] {
      using A = acc_t<scalar_t>;
      const ParamValues<A> w(weight, offset);
      const at::Tensor m = rms ? mean : mean.contiguous();
      const at::Tensor s = rstd.contiguous();
      if (rms) {
        backward_impl<scalar_t, true>(dy, dz, h, m, s, w.data(), dx, dw, db, M, N, round_normalized);
      } else {
        backward_impl<scalar_t, false>(dy, dz, h, m, s, w.data(), dx, dw, db, M, N, round_normalized);
      }
    });
  }
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : h.new_empty({0}); };
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

}  // namespace layernorm
