// The LN-LSTM and LN-GRU recurrences on CPU: forward and hand-written backward through time.
//
// Equations: layernorm/rnn/reference.py; arguments, saved tensors and gradients: layernorm/rnn/contract.py
// (the entry points below take the contract's arguments in its order). Design and measurements:
// docs/rnn_fast.md.
//
// One OpenMP parallel region runs all T steps. The work of a step is split among the threads once:
//  - batch split (B >= 2 threads): each thread owns a block of rows for the whole sequence and runs
//    its own GEMM h_rows W^T, then the fused row pass of those rows. Rows never meet, so there is no
//    synchronisation at all inside the loop;
//  - column split (small B, e.g. B = 1): each thread multiplies all rows by its own slice of W's
//    columns (its slice of W stays in its core's L2), a barrier, the row pass (rows shared out), a
//    barrier.
// Nothing is dispatched per step: the GEMMs are single-thread calls (oneDNN's BRGEMM micro-kernel
// through at::native::cpublas for float32, BLAS for float64) on pointers, and the layer norms, gates,
// cell update and zoneout are one pass per row. dW_hh (and the LSTMP's dW_hr) are one large GEMM
// after the loop.
//
// exp/tanh are written out as polynomials (Cephes constants, ~2 ulp) because calls to libm stop gcc
// from vectorizing the row loops and glibc's vector math needs -ffast-math, which we do not want
// (it would also change the NaN and rounding behaviour of the layer-norm statistics). The build
// adds -fno-trapping-math (lets gcc turn the clamps into blends) and -fno-math-errno (inline sqrt);
// without them NO row loop vectorizes (checked with -fopt-info-vec) and the forward is 3x slower.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <vector>

// ATen's oneDNN matmul; no public header ships it. Weak: where torch lacks it the pointer is null and
// the large GEMMs go to ATen's mm.
namespace at { namespace native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
}}  // namespace at::native

#if defined(LAYERNORM_AVX512)
// The row passes are bound by their exp/tanh polynomials, not by memory: 512-bit vectors make the
// LSTM inference forward ~3% faster here (docs/rnn_fast.md). Only this file; the loader sets the
// macro when torch itself dispatches to AVX-512 on this CPU.
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#endif

namespace {

using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

// ----------------------------------------------------------------------------------------------
// Elementwise maths
// ----------------------------------------------------------------------------------------------

static inline float fexp(float x) {
  x = x < -87.0f ? -87.0f : x;  // keeps 2^n a normal float
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(float));
  return y * s;
}

static inline float ftanh(float x) {
  float ax = std::fabs(x);
  float t = fexp(-2.0f * ax);
  float big = (1.0f - t) / (1.0f + t);
  float z = x * x;  // below 0.625 the odd polynomial avoids the cancellation in 1 - t
  float p = -5.70498872745E-3f;
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  float small = ax + ax * z * p;
  float r = ax < 0.625f ? small : big;
  return std::copysign(r, x);
}

template <typename T> inline T t_exp(T x) { return std::exp(x); }
template <> inline float t_exp<float>(float x) { return fexp(x); }
template <typename T> inline T t_tanh(T x) { return std::tanh(x); }
template <> inline float t_tanh<float>(float x) { return ftanh(x); }
template <typename T> inline T t_sigmoid(T x) { return T(1) / (T(1) + t_exp<T>(-x)); }

// Row reductions with four independent vector accumulators. A `simd reduction` loop keeps one
// vector accumulator, so every add waits for the previous one (4 cycles): perf showed row_stats
// spending half its time on that chain, ~0.3 us per 1024-wide pass, 3 passes per row and step.
template <typename T>
struct Vec {
  static constexpr int kLanes = 32 / sizeof(T);
  typedef T type __attribute__((vector_size(32)));
  static inline type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static inline T sum(type v) {
    T s = 0;
    for (int j = 0; j < kLanes; ++j) s += v[j];
    return s;
  }
};

// sum of f(k) for k < n, f(k) a vector of lanes k..k+L-1 (fv) or one element (fs)
template <typename T, typename FV, typename FS>
inline T reduce_row(int64_t n, FV fv, FS fs) {
  using V = Vec<T>;
  constexpr int L = V::kLanes;
  typename V::type a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t k = 0;
  for (; k + 4 * L <= n; k += 4 * L) {
    a0 += fv(k);
    a1 += fv(k + L);
    a2 += fv(k + 2 * L);
    a3 += fv(k + 3 * L);
  }
  for (; k + L <= n; k += L) a0 += fv(k);
  T s = V::sum((a0 + a1) + (a2 + a3));
  for (; k < n; ++k) s += fs(k);
  return s;
}

// Mean and 1/sqrt(biased var + eps) of v[0:n], two passes (no E[x^2]-E[x]^2 cancellation).
template <typename T>
inline void row_stats(const T* v, int64_t n, double eps, T& mean, T& rstd) {
  using V = Vec<T>;
  const T s = reduce_row<T>(n, [&](int64_t k) { return V::load(v + k); }, [&](int64_t k) { return v[k]; });
  const T m = s / T(n);
  const T q = reduce_row<T>(
      n, [&](int64_t k) { auto d = V::load(v + k) - m; return d * d; },
      [&](int64_t k) { const T d = v[k] - m; return d * d; });
  mean = m;
  rstd = T(1) / std::sqrt(q / T(n) + T(eps));
}

// dx of x_hat = (x - mean) * rstd given g = d x_hat: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
template <typename T>
inline void ln_backward_row(const T* g, const T* xhat, int64_t n, T rstd, T* dx) {
  using V = Vec<T>;
  const T s1 = reduce_row<T>(n, [&](int64_t k) { return V::load(g + k); }, [&](int64_t k) { return g[k]; });
  const T s2 = reduce_row<T>(n, [&](int64_t k) { return V::load(g + k) * V::load(xhat + k); },
                             [&](int64_t k) { return g[k] * xhat[k]; });
  const T m1 = s1 / T(n), m2 = s2 / T(n);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dx[k] = rstd * (g[k] - m1 - xhat[k] * m2);
}

// at::empty for the large per-call buffers (the saved per-step tensors, dxw, dhw: megabytes each).
// glibc serves them with a fresh mmap and returns them to the OS when freed, so every call
// page-faults them in again, 4 KiB at a time: perf showed the faults costing as much as the row
// passes of the forward. Asking for transparent huge pages on the buffer (as PyTorch's own
// THP_MEM_ALLOC_ENABLE does) before its first touch turns ~500 faults per 2 MiB into one. Only
// whole 2 MiB pages inside the buffer are advised; small buffers and kernels without THP are left
// as they are (madvise then fails harmlessly).
//
// `stagger`: the tensor starts `stagger` cache lines into its allocation. The row passes read and
// write rows of 4H elements of several of these tensors at the same index k; rows whose addresses
// agree in their low 12 bits make a load wait for an unrelated earlier store (4K aliasing), so each
// kind of buffer gets its own offset (the scratch rows below likewise).
Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts, int64_t stagger = 0) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const int64_t line = std::max<int64_t>(1, 64 / int64_t(c10::elementSize(c10::typeMetaToScalarType(opts.dtype()))));
  auto base = at::empty({numel + stagger * line}, opts);
  // from_blob with a deleter that owns `base`: the tensor starts at the offset with storage offset 0
  // (custom-op outputs must match their fake kernels, which know nothing of the offset)
  char* start = static_cast<char*>(base.data_ptr()) + stagger * line * base.element_size();
  auto t = stagger == 0 ? base.view(sizes)
                        : at::from_blob(start, sizes, [base](void*) mutable { base.reset(); }, opts);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(base.data_ptr());
  const uintptr_t hi = lo + base.nbytes();
  const uintptr_t a = (lo + kHuge - 1) & ~(kHuge - 1), b = hi & ~(kHuge - 1);
  if (base.nbytes() >= 4 * kHuge && b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#endif
  return t;
}

// Offsets of per-thread scratch rows of the given lengths, each one cache line further from a
// 4 KiB boundary than the previous (see empty_big); the last entry is the total.
inline std::vector<int64_t> scratch_layout(std::initializer_list<int64_t> lengths, int64_t line = 16) {
  std::vector<int64_t> off{0};
  int64_t k = 1;
  for (int64_t n : lengths) off.push_back(off.back() + n + line * k++);
  return off;
}

// Software prefetch of [p, p + bytes): the row passes stream a row's worth (4H) of several saved
// tensors from memory, one row after the other, and perf showed the backward's row pass waiting on
// those first loads (the instructions after them held 60% of its samples). The next row's lines are
// requested while this row computes.
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < int64_t(n * sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 3);
}


inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

template <typename T>
inline const T* ptr_or_null(const OptTensor& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}

std::vector<int64_t> lengths_vec(const OptTensor& lengths, int64_t B, int64_t T) {
  std::vector<int64_t> L(B, T);
  if (has(lengths)) {
    auto l = lengths->to(at::kLong).contiguous();
    const int64_t* p = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) L[b] = std::min<int64_t>(std::max<int64_t>(p[b], 0), T);
  }
  return L;
}

// ----------------------------------------------------------------------------------------------
// The large GEMMs (input projection and its backward, weight gradients): oneDNN's matmul, as ATen's
// own mkldnn_matmul (exported by libtorch_cpu when torch is built with oneDNN, which the x86 and Arm
// wheels are), the library nn.LSTM's CPU kernel runs on; else ATen's mm. Measured on the 2-core
// AMD EPYC (Zen 4) of the CI box, fp32: 12-30% faster than at::mm (MKL) for the (T*B x 4H) GEMMs.
// ----------------------------------------------------------------------------------------------

bool onednn_enabled() {
  return &at::native::mkldnn_matmul != nullptr && at::globalContext().userEnabledMkldnn();
}

// out = a @ b (+ out when accumulate); out contiguous. float64 always goes to ATen.
void gemm(const Tensor& a, const Tensor& b, Tensor& out, bool accumulate) {
  if (onednn_enabled() && a.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0) {
    try {
      at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
      return;
    } catch (const c10::Error&) {
      // a build whose oneDNN refuses this case (none seen): ATen below gives the same product
    }
  }
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// A new (rows x N) product, in huge pages (the input projection at B = 128 is 52 MB).
Tensor gemm_new(const Tensor& a, const Tensor& b) {
  auto out = empty_big({a.size(0), b.size(1)}, a.options(), 4);
  if (a.size(0) == 0 || b.size(1) == 0) return out;
  if (a.size(1) == 0) return out.zero_();
  gemm(a, b, out, false);
  return out;
}

Tensor linear_forward(const Tensor& x, const Tensor& w) { return gemm_new(x, w.t()); }

std::vector<Tensor> linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw) {
  Tensor dx, dw;
  if (need_dx) dx = gemm_new(dy, w);
  if (need_dw) dw = gemm_new(dy.t(), x);
  return {dx, dw};
}

// ----------------------------------------------------------------------------------------------
// The per-step GEMM, called by one thread inside the parallel region: C[M x N] (+)= A[M x K] B[K x N],
// all row-major. float32: oneDNN's BRGEMM micro-kernel (at::native::cpublas::brgemm, the kernel
// PyTorch's CPU flash attention calls per thread), in column blocks of kBrgemmN; float64: BLAS
// (single-threaded inside a parallel region).
// ----------------------------------------------------------------------------------------------

extern "C" {
// Fortran BLAS, exported by torch's MKL builds. Weak: null where absent (then naive_gemm below).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

std::atomic<int> g_step_gemm{0};  // 0: brgemm for float32, 1: BLAS (A/B measurement, _set_step_gemm)
constexpr int64_t kBrgemmN = 1024;  // column blocks per brgemm call (64 to 1024 measured: 1024 fastest, 3%)

template <typename T>
void naive_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::memset(c, 0, N * sizeof(T));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * lda + k];
      const T* b = B + k * ldb;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T>
void blas_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
               int64_t ldc, bool accumulate) {
  // column-major BLAS: C^T (N x M) = B^T (N x K) A^T (K x M)
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const T one = 1, beta = accumulate ? T(1) : T(0);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  }
  naive_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <typename T>
void thread_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                 int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(T));
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    if (g_step_gemm.load(std::memory_order_relaxed) == 0) {
      for (int64_t n0 = 0; n0 < N; n0 += kBrgemmN) {
        at::native::cpublas::brgemm(M, std::min(kBrgemmN, N - n0), K, lda, ldb, ldc, accumulate, A, B + n0, C + n0);
      }
      return;
    }
  }
#endif
  blas_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// y[n] = W[n, :K] . x for n in [n0, n1): the step product of a single row (B = 1, and the rows of the
// column split), on W in its own (N x K) layout, eight rows of W at a time against one x held in
// registers. brgemm treats one row as a (1 x N) GEMM and ran at about a quarter of the bandwidth
// of W (9.5 us for half of the H = 256 W_hh per thread; this kernel: see docs/rnn_fast.md), and needs
// W transposed first.
template <typename T>
void gemv_rows(const T* W, int64_t ldw, int64_t n0, int64_t n1, int64_t K, const T* x, T* y) {
  using V = Vec<T>;
  constexpr int L = V::kLanes;
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const T* w = W + n * ldw;
    typename V::type a[8] = {};
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      const auto xv = V::load(x + k);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) a[r] += V::load(w + r * ldw + k) * xv;
    }
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      T s = V::sum(a[r]);
      for (int64_t j = k; j < K; ++j) s += w[r * ldw + j] * x[j];
      y[n + r] = s;
    }
  }
  for (; n < n1; ++n) {
    const T* w = W + n * ldw;
    y[n] = reduce_row<T>(K, [&](int64_t k) { return V::load(w + k) * V::load(x + k); },
                         [&](int64_t k) { return w[k] * x[k]; });
  }
}

// C[:, c0:c1] = A W^T for rows [r0, r1): one GEMV per row on W's own layout.
template <typename T>
void thread_gemv(int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t K, const T* A, int64_t lda, const T* W,
                 T* C, int64_t ldc) {
  for (int64_t r = r0; r < r1; ++r) gemv_rows(W, K, c0, c1, K, A + r * lda, C + r * ldc);
}

// dst (K x N) = src (N x K)^T for the rows [n0, n1) of src: brgemm's right operand. torch's
// w.t().contiguous() took 157 us for the 1 MiB W_hh of H = 256 (as long as 2 steps' row passes);
// 8 x 8 register tiles, on both threads, are several times faster.
#ifdef __AVX2__
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
         r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds),
         r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds),
         r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
         u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
         u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
         u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// dh_{t-1} for rows [r0, r1) and columns [c0, c1) of an N-wide state, in the backward of either cell:
// direct + dA_t W_hh (a: the step's G-wide pre-activation gradients from row r0, w: W_hh of row stride N),
// times the recurrent dropout mask where there is one (its product goes through the scratch sg first).
template <typename T>
void recurrent_dh(int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t G, int64_t N, const T* a, const T* w,
                  const T* direct, const T* mask, T* sg, T* dh) {
  if (mask == nullptr) {
    for (int64_t b = r0; b < r1; ++b) std::memcpy(dh + b * N + c0, direct + b * N + c0, (c1 - c0) * sizeof(T));
    thread_gemm<T>(r1 - r0, c1 - c0, G, a, G, w + c0, N, dh + r0 * N + c0, N, true);
    return;
  }
  thread_gemm<T>(r1 - r0, c1 - c0, G, a, G, w + c0, N, sg + r0 * N + c0, N, false);
  for (int64_t b = r0; b < r1; ++b)
    for (int64_t k = c0; k < c1; ++k) dh[b * N + k] = direct[b * N + k] + sg[b * N + k] * mask[b * N + k];
}

template <typename T>
void transpose_rows(const T* src, int64_t N, int64_t K, int64_t n0, int64_t n1, T* dst) {
  int64_t n = n0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    for (; n + 8 <= n1; n += 8) {
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) transpose8x8(src + n * K + k, K, dst + k * N + n, N);
      for (; k < K; ++k)
        for (int64_t j = 0; j < 8; ++j) dst[k * N + n + j] = src[(n + j) * K + k];
    }
  }
#endif
  for (; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) dst[k * N + n] = src[n * K + k];
}

// The end of the LSTM backward's row pass, for one row of G = 4H gate gradients dA:
//   dhw = LN_backward(dA * g_hh; x_hat = hh, rstd_hh),  dxw = LN_backward(dA * g_ih; x_hat = (xw - mx) rx, rx)
//   ag += dA * hh, ab += dA, agi += dA * x_hat_ih  (this row's sums of d ln_hh_weight, d bias, d ln_ih_weight)
// in two passes: one for the four sums (and y = dA * g, x_hat_ih kept in y_hh, y_ih, xih), one for the outputs.
template <typename T>
void lstm_gate_backward(int64_t G, const T* dA, const T* hh, const T* xr, T mx, T rx, const T* g_hh, const T* g_ih,
                        T* ag, T* ab, T* agi, T* y_hh, T* xih, T rstd_hh, T* dhw, T* dxw) {
  using V = Vec<T>;
  using VT = typename V::type;
  constexpr int L = V::kLanes;
  VT s1 = {}, s2 = {}, s3 = {}, s4 = {};
  T* y_ih = xih + G;  // the caller's scratch holds 2G here
  auto store = [](T* p, VT v) { std::memcpy(p, &v, sizeof(v)); };
  int64_t k = 0;
  for (; k + L <= G; k += L) {
    const VT a = V::load(dA + k), h = V::load(hh + k), xh = (V::load(xr + k) - mx) * rx;
    store(ag + k, V::load(ag + k) + a * h);
    store(ab + k, V::load(ab + k) + a);
    store(agi + k, V::load(agi + k) + a * xh);
    const VT y1 = a * V::load(g_hh + k), y2 = a * V::load(g_ih + k);
    store(y_hh + k, y1);
    store(y_ih + k, y2);
    store(xih + k, xh);
    s1 += y1;
    s2 += y1 * h;
    s3 += y2;
    s4 += y2 * xh;
  }
  T t1 = V::sum(s1), t2 = V::sum(s2), t3 = V::sum(s3), t4 = V::sum(s4);
  for (; k < G; ++k) {
    const T a = dA[k], h = hh[k], xh = (xr[k] - mx) * rx;
    ag[k] += a * h;
    ab[k] += a;
    agi[k] += a * xh;
    const T y1 = a * g_hh[k], y2 = a * g_ih[k];
    y_hh[k] = y1, y_ih[k] = y2, xih[k] = xh;
    t1 += y1, t2 += y1 * h, t3 += y2, t4 += y2 * xh;
  }
  const T m1 = t1 / T(G), m2 = t2 / T(G), m3 = t3 / T(G), m4 = t4 / T(G);
#pragma omp simd
  for (int64_t j = 0; j < G; ++j) {
    dhw[j] = rstd_hh * (y_hh[j] - m1 - hh[j] * m2);
    dxw[j] = rx * (y_ih[j] - m3 - xih[j] * m4);
  }
}

// The threads of the region, their share of the batch rows and of a GEMM's columns.
struct Split {
  int nt = 1;
  bool cols = false;  // column split (small batches): barriers between the phases of a step
  int64_t B = 0;
  static Split make(int64_t B) {
    Split s;
    s.nt = std::max(1, at::get_num_threads());
    s.B = B;
    s.cols = s.nt > 1 && B < 2 * s.nt;
    if (B == 0) s.nt = 1;
    return s;
  }
  // rows a thread multiplies (all rows in a column split)
  void gemm_rows(int id, int64_t& r0, int64_t& r1) const {
    if (cols) { r0 = 0; r1 = B; } else { r0 = B * id / nt; r1 = B * (id + 1) / nt; }
  }
  // rows a thread runs the row pass on
  void pass_rows(int id, int64_t& r0, int64_t& r1) const { r0 = B * id / nt; r1 = B * (id + 1) / nt; }
  // columns [c0, c1) of an N-column product a thread computes, in multiples of 16
  void gemm_cols(int id, int64_t N, int64_t& c0, int64_t& c1) const {
    if (!cols) { c0 = 0; c1 = N; return; }
    const int64_t blocks = (N + 15) / 16;
    c0 = std::min(N, 16 * (blocks * id / nt));
    c1 = std::min(N, 16 * (blocks * (id + 1) / nt));
  }
};

// Work of one thread inside the region. An exception is caught and recorded; the thread then skips
// every later phase but still reaches every barrier (the other threads would wait there forever), and
// the first exception is rethrown after the region.
struct Guard {
  std::atomic<bool>* failed;
  std::exception_ptr* error;
  std::mutex* mu;
  template <typename F>
  void operator()(F&& f) const {
    if (failed->load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(*mu);
      if (!*error) *error = std::current_exception();
      failed->store(true);
    }
  }
};

// Runs body(thread id, guard) on the split's threads.
template <typename F>
void run_region(const Split& s, F&& body) {
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mu;
  const Guard guard{&failed, &error, &mu};
#pragma omp parallel num_threads(s.nt)
  {
    body(omp_get_thread_num(), guard);
#ifdef CPUBLAS_BRGEMM_F32F32F32
    at::native::cpublas::brgemm_release(false);
#endif
  }
  if (error) std::rethrow_exception(error);
}

#define RNN_BARRIER(split) \
  do {                     \
    if ((split).cols) {    \
      _Pragma("omp barrier") \
    }                      \
  } while (0)

// ----------------------------------------------------------------------------------------------
// LSTM. Shapes: T steps, B rows, H hidden, R = proj_size or H; G = 4H gate pre-activations.
// ----------------------------------------------------------------------------------------------

// The contract's forward. Saved (save): hw_hat (T,B,4H), gates (T,B,4H), cs (T,B,H), stats (T,B,5) =
// rstd_hh, mean_c, rstd_c, mean_ih, rstd_ih; zeros (and the frozen c) on steps past a row's length.
std::vector<Tensor> lstm_forward(const Tensor& xw, const OptTensor& lengths, const Tensor& h0, const Tensor& c0,
                                 const Tensor& w_hh, const Tensor& g_hh, const OptTensor& bias, const Tensor& g_ih,
                                 const OptTensor& ln_cell_weight, const OptTensor& ln_cell_bias,
                                 const OptTensor& w_hr, const OptTensor& recurrent_mask, const OptTensor& zoneout_h,
                                 const OptTensor& zoneout_c, double eps, bool save) {
  at::NoGradGuard no_grad;  // called from autograd's backward too; nothing here is differentiated
  const int64_t T = xw.size(0), B = xw.size(1), G = xw.size(2), H = G / 4, R = h0.size(1);
  const bool proj = has(w_hr), cell_norm = has(ln_cell_weight), rec = has(recurrent_mask);
  const bool zh = has(zoneout_h), zc = has(zoneout_c);
  auto opts = xw.options();
  auto out = empty_big({T, B, R}, opts, 0);
  auto h = h0.contiguous().clone();
  auto c = c0.contiguous().clone();
  auto hw = at::empty({B, G}, opts);
  const Split split = Split::make(B);
  // the column split multiplies single rows (gemv_rows, on W's own layout); brgemm wants W^T
  auto w_hh_c = w_hh.contiguous();
  Tensor w_hr_c = proj ? w_hr->contiguous() : Tensor();
  Tensor wt = split.cols ? Tensor() : at::empty({R, G}, opts);          // W_hh^T, filled in the region
  Tensor wrt = proj && !split.cols ? at::empty({H, R}, opts) : Tensor();  // W_hr^T
  Tensor hin = rec ? h * *recurrent_mask : Tensor();            // (B, R) the GEMM's left operand
  Tensor mbuf = proj ? at::empty({B, H}, opts) : Tensor();      // (B, H) o tanh(LN(c~)) before W_hr
  Tensor htil = proj ? at::empty({B, R}, opts) : Tensor();      // (B, R) its projection
  Tensor bias_c = has(bias) ? bias->contiguous() : at::zeros({G}, opts);
  Tensor hw_hat, gates, cs, stats;
  if (save) {
    hw_hat = empty_big({T, B, G}, opts, 1);
    gates = empty_big({T, B, G}, opts, 2);
    cs = empty_big({T, B, H}, opts, 3);
    stats = at::empty({T, B, 5}, opts);
  }
  const auto L = lengths_vec(lengths, B, T);
  const auto sl = scratch_layout({G, G, H});  // hw_hat, gates (inference), c~ (cell zoneout)
  const int64_t scratch_per_thread = sl.back();
  auto scratch = at::empty({split.nt, scratch_per_thread}, opts);

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_hh.data_ptr<T_>();
    const T_* gi_p = g_ih.data_ptr<T_>();
    const T_* b_p = bias_c.data_ptr<T_>();
    const T_* wc_p = ptr_or_null<T_>(ln_cell_weight);
    const T_* bc_p = ptr_or_null<T_>(ln_cell_bias);
    const T_* rm_p = ptr_or_null<T_>(recurrent_mask);
    const T_* zh_p = ptr_or_null<T_>(zoneout_h);
    const T_* zc_p = ptr_or_null<T_>(zoneout_c);
    const T_* w_p = w_hh_c.data_ptr<T_>();
    const T_* wr_p = proj ? w_hr_c.data_ptr<T_>() : nullptr;
    T_* wt_p = wt.defined() ? wt.data_ptr<T_>() : nullptr;
    T_* wrt_p = wrt.defined() ? wrt.data_ptr<T_>() : nullptr;
    T_* out_p = out.data_ptr<T_>();
    T_* h_p = h.data_ptr<T_>();
    T_* c_p = c.data_ptr<T_>();
    T_* hw_p = hw.data_ptr<T_>();
    T_* hin_p = rec ? hin.data_ptr<T_>() : nullptr;
    T_* m_p = proj ? mbuf.data_ptr<T_>() : nullptr;
    T_* ht_p = proj ? htil.data_ptr<T_>() : nullptr;
    T_* hh_s = save ? hw_hat.data_ptr<T_>() : nullptr;
    T_* ga_s = save ? gates.data_ptr<T_>() : nullptr;
    T_* cs_s = save ? cs.data_ptr<T_>() : nullptr;
    T_* st_s = save ? stats.data_ptr<T_>() : nullptr;
    const T_* a_p = rec ? hin_p : h_p;                        // the step GEMM's left operand

    // the fused pass of row b at step t
    auto row = [&](int64_t t, int64_t b, T_* scr) {
      const int64_t tb = t * B + b;
      T_* orow = out_p + tb * R;
      T_* cr = c_p + b * H;
      if (t >= L[b]) {  // past the end: state frozen, output zero (with a projection: the fix-up's job)
        if (!proj) std::memset(orow, 0, R * sizeof(T_));
        if (save) {
          std::memset(hh_s + tb * G, 0, G * sizeof(T_));
          std::memset(ga_s + tb * G, 0, G * sizeof(T_));
          std::memset(st_s + tb * 5, 0, 5 * sizeof(T_));
          std::memcpy(cs_s + tb * H, cr, H * sizeof(T_));
        }
        return;
      }
      const T_* hwr = hw_p + b * G;
      const T_* xr = xw_p + tb * G;
      T_* hh = save ? hh_s + tb * G : scr + sl[0];
      T_* ga = save ? ga_s + tb * G : scr + sl[1];
      T_* ct = zc ? scr + sl[2] : cr;  // c~; without cell zoneout it is the new c, written in place
      T_ m1, r1, mx, rx;
      row_stats(hwr, G, eps, m1, r1);
      row_stats(xr, G, eps, mx, rx);
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) {
        const T_ xh = (hwr[k] - m1) * r1;
        hh[k] = xh;
        ga[k] = xh * g_p[k] + (xr[k] - mx) * rx * gi_p[k] + b_p[k];
      }
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {  // i, f, o sigmoid; g tanh
        ga[k] = t_sigmoid<T_>(ga[k]);
        ga[H + k] = t_sigmoid<T_>(ga[H + k]);
        ga[2 * H + k] = t_tanh<T_>(ga[2 * H + k]);
        ga[3 * H + k] = t_sigmoid<T_>(ga[3 * H + k]);
      }
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) ct[k] = ga[H + k] * cr[k] + ga[k] * ga[2 * H + k];
      T_ m2 = 0, r2 = 0;
      if (cell_norm) row_stats(ct, H, eps, m2, r2);
      // m = o tanh(LN(c~)); then h = m (+ zoneout), or with a projection m is kept for W_hr
      T_* mrow = proj ? m_p + b * H : orow;
      if (cell_norm) {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) mrow[k] = ga[3 * H + k] * t_tanh<T_>((ct[k] - m2) * r2 * wc_p[k] + bc_p[k]);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) mrow[k] = ga[3 * H + k] * t_tanh<T_>(ct[k]);
      }
      if (!proj) {
        T_* hr = h_p + b * R;
        if (zh) {
          const T_* z = zh_p + tb * R;
#pragma omp simd
          for (int64_t k = 0; k < R; ++k) orow[k] += z[k] * (hr[k] - orow[k]);
        }
        std::memcpy(hr, orow, R * sizeof(T_));
        if (rec) {
          const T_* rm = rm_p + b * R;
          T_* hi = hin_p + b * R;
#pragma omp simd
          for (int64_t k = 0; k < R; ++k) hi[k] = orow[k] * rm[k];
        }
      }
      if (zc) {
        const T_* z = zc_p + tb * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) cr[k] = ct[k] + z[k] * (cr[k] - ct[k]);
      }
      if (save) {
        std::memcpy(cs_s + tb * H, cr, H * sizeof(T_));
        T_* st = st_s + tb * 5;
        st[0] = r1, st[1] = m2, st[2] = r2, st[3] = mx, st[4] = rx;
      }
    };

    // LSTMP: h~ = m W_hr^T is in htil; zoneout, the length mask and the state update, for a block
    auto proj_fixup = [&](int64_t t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      for (int64_t b = r0; b < r1; ++b) {
        T_* orow = out_p + (t * B + b) * R;
        if (t >= L[b]) {
          std::memset(orow + c0, 0, (c1 - c0) * sizeof(T_));
          continue;
        }
        const T_* ht = ht_p + b * R;
        T_* hr = h_p + b * R;
        const T_* z = zh ? zh_p + (t * B + b) * R : nullptr;
        for (int64_t k = c0; k < c1; ++k) {
          const T_ v = zh ? ht[k] + z[k] * (hr[k] - ht[k]) : ht[k];
          hr[k] = v;
          orow[k] = v;
        }
        if (rec) {
          for (int64_t k = c0; k < c1; ++k) hin_p[b * R + k] = hr[k] * rm_p[b * R + k];
        }
      }
    };

    run_region(split, [&](int id, const Guard& guard) {
      T_* scr = scratch.data_ptr<T_>() + id * scratch_per_thread;
      int64_t gr0, gr1, pr0, pr1, gc0, gc1, pc0, pc1;
      split.gemm_rows(id, gr0, gr1);
      split.pass_rows(id, pr0, pr1);
      split.gemm_cols(id, G, gc0, gc1);
      split.gemm_cols(id, R, pc0, pc1);
      if (!split.cols) {  // brgemm's operands W^T, each thread a share, then everyone waits for them
        guard([&] {
          transpose_rows(w_p, G, R, G * id / split.nt, G * (id + 1) / split.nt, wt_p);
          if (proj) transpose_rows(wr_p, R, H, R * id / split.nt, R * (id + 1) / split.nt, wrt_p);
        });
#pragma omp barrier
      }
      for (int64_t t = 0; t < T; ++t) {
        guard([&] {  // hw = (h ρ) W_hh^T for this thread's block
          if (split.cols) {
            thread_gemv<T_>(gr0, gr1, gc0, gc1, R, a_p, R, w_p, hw_p, G);
          } else {
            thread_gemm<T_>(gr1 - gr0, gc1 - gc0, R, a_p + gr0 * R, R, wt_p + gc0, G, hw_p + gr0 * G + gc0, G, false);
          }
        });
        RNN_BARRIER(split);
        guard([&] {
          for (int64_t b = pr0; b < pr1; ++b) row(t, b, scr);
        });
        if (proj) {
          RNN_BARRIER(split);
          guard([&] {
            if (split.cols) {
              thread_gemv<T_>(gr0, gr1, pc0, pc1, H, m_p, H, wr_p, ht_p, R);
            } else {
              thread_gemm<T_>(gr1 - gr0, pc1 - pc0, H, m_p + gr0 * H, H, wrt_p + pc0, R, ht_p + gr0 * R + pc0, R, false);
            }
            proj_fixup(t, gr0, gr1, pc0, pc1);
          });
        }
        RNN_BARRIER(split);
      }
    });
  };
  if (B > 0) {
    if (xw.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  }
  if (!save) return {out, h, c};
  return {out, h, c, hw_hat, gates, cs, stats};
}

// The contract's backward -> dxw, dh0, dc0, dw_hh, dln_hh, dbias, dln_ih, dln_cell_weight,
// dln_cell_bias, dw_hr (undefined where the input is absent).
std::vector<Tensor> lstm_backward(const Tensor& xw, const OptTensor& lengths, const Tensor& h0, const Tensor& c0,
                                  const Tensor& w_hh, const Tensor& g_hh, const OptTensor& bias, const Tensor& g_ih,
                                  const OptTensor& ln_cell_weight, const OptTensor& ln_cell_bias,
                                  const OptTensor& w_hr, const OptTensor& recurrent_mask,
                                  const OptTensor& zoneout_h, const OptTensor& zoneout_c, double eps,
                                  const Tensor& out, const Tensor& hw_hat, const Tensor& gates, const Tensor& cs,
                                  const Tensor& stats, const Tensor& dout_in, const Tensor& dh_n, const Tensor& dc_n) {
  at::NoGradGuard no_grad;  // called from autograd's backward too; nothing here is differentiated
  (void)eps;
  const int64_t T = xw.size(0), B = xw.size(1), G = xw.size(2), H = G / 4, R = h0.size(1);
  const bool proj = has(w_hr), cell_norm = has(ln_cell_weight), rec = has(recurrent_mask);
  const bool zh = has(zoneout_h), zc = has(zoneout_c);
  auto opts = xw.options();
  auto dout = dout_in.contiguous();
  auto dxw = empty_big({T, B, G}, opts, 5);
  auto dhw = empty_big({T, B, G}, opts, 6);
  auto dh = dh_n.contiguous().clone();                          // dL/dh_t carried back, (B, R)
  auto dc = dc_n.contiguous().clone();                          // dL/dc_t carried back, (B, H)
  auto direct = at::empty({B, R}, opts);                        // the part of dL/dh_{t-1} that bypasses W_hh
  auto w_hh_c = w_hh.contiguous();                              // (4H, R): dh_{t-1} = dhw_t W_hh
  Tensor w_hr_c = proj ? w_hr->contiguous() : Tensor();         // (R, H): dm = dh~ W_hr
  Tensor dm = proj ? at::empty({B, H}, opts) : Tensor();
  Tensor dht_all = proj ? empty_big({T, B, R}, opts, 7) : Tensor();  // dL/dh~_t, for dW_hr
  Tensor m_all = proj ? empty_big({T, B, H}, opts, 8) : Tensor();    // m_t recomputed, for dW_hr
  Tensor sgemm = rec ? at::empty({B, R}, opts) : Tensor();
  auto c0_c = c0.contiguous();
  const auto L = lengths_vec(lengths, B, T);
  const Split split = Split::make(B);
  // Per-thread sums of the parameter gradients over the thread's rows and all steps, added up in
  // thread order at the end: deterministic for a given thread count. (Per-row sums, (B, 4H) each,
  // did not stay in L2 next to W_hh.)
  auto acc_g = at::zeros({split.nt, G}, opts);
  auto acc_b = at::zeros({split.nt, G}, opts);
  auto acc_gi = at::zeros({split.nt, G}, opts);
  auto acc_wc = at::zeros({split.nt, H}, opts);
  auto acc_bc = at::zeros({split.nt, H}, opts);
  const auto sl = scratch_layout({H, H, H, H, H, G, G, 2 * G});
  const int64_t scratch_per_thread = sl.back();
  auto scratch = at::empty({split.nt, scratch_per_thread}, opts);

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_hh.data_ptr<T_>();
    const T_* gi_p = g_ih.data_ptr<T_>();
    const T_* wc_p = ptr_or_null<T_>(ln_cell_weight);
    const T_* bc_p = ptr_or_null<T_>(ln_cell_bias);
    const T_* rm_p = ptr_or_null<T_>(recurrent_mask);
    const T_* zh_p = ptr_or_null<T_>(zoneout_h);
    const T_* zc_p = ptr_or_null<T_>(zoneout_c);
    const T_* w_p = w_hh_c.data_ptr<T_>();
    const T_* wr_p = proj ? w_hr_c.data_ptr<T_>() : nullptr;
    const T_* do_p = dout.data_ptr<T_>();
    const T_* hh_p = hw_hat.data_ptr<T_>();
    const T_* ga_p = gates.data_ptr<T_>();
    const T_* cs_p = cs.data_ptr<T_>();
    const T_* st_p = stats.data_ptr<T_>();
    const T_* c0_p = c0_c.data_ptr<T_>();
    T_* dxw_p = dxw.data_ptr<T_>();
    T_* dhw_p = dhw.data_ptr<T_>();
    T_* dh_p = dh.data_ptr<T_>();
    T_* dc_p = dc.data_ptr<T_>();
    T_* dir_p = direct.data_ptr<T_>();
    T_* dm_p = proj ? dm.data_ptr<T_>() : nullptr;
    T_* dht_p = proj ? dht_all.data_ptr<T_>() : nullptr;
    T_* mall_p = proj ? m_all.data_ptr<T_>() : nullptr;
    T_* sg_p = rec ? sgemm.data_ptr<T_>() : nullptr;
    T_* ag_p = acc_g.data_ptr<T_>();
    T_* ab_p = acc_b.data_ptr<T_>();
    T_* agi_p = acc_gi.data_ptr<T_>();
    T_* awc_p = acc_wc.data_ptr<T_>();
    T_* abc_p = acc_bc.data_ptr<T_>();

    // LSTMP: dL/dh~_t and `direct` for a block of (rows, R columns)
    auto proj_pre = [&](int64_t t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t tb = t * B + b;
        T_* dht = dht_p + tb * R;
        T_* dir = dir_p + b * R;
        const T_* dhc = dh_p + b * R;
        if (t >= L[b]) {
          for (int64_t k = c0; k < c1; ++k) {
            dir[k] = dhc[k];
            dht[k] = T_(0);
          }
          continue;
        }
        const T_* dor = do_p + tb * R;
        const T_* z = zh ? zh_p + tb * R : nullptr;
        for (int64_t k = c0; k < c1; ++k) {
          const T_ dhv = dor[k] + dhc[k];
          dht[k] = zh ? dhv * (T_(1) - z[k]) : dhv;
          dir[k] = zh ? z[k] * dhv : T_(0);
        }
      }
    };

    auto prefetch = [&](int64_t t, int64_t b) {
      if (t < 0 || t >= L[b]) return;
      const int64_t tb = t * B + b;
      prefetch_row(xw_p + tb * G, G);
      prefetch_row(hh_p + tb * G, G);
      prefetch_row(ga_p + tb * G, G);
      prefetch_row(cs_p + tb * H, H);
      if (t > 0) prefetch_row(cs_p + (tb - B) * H, H);
      prefetch_row(do_p + tb * R, R);
    };

    auto row = [&](int64_t t, int64_t b, T_* scr, int id) {
      const int64_t tb = t * B + b;
      T_* dxr = dxw_p + tb * G;
      T_* dhr = dhw_p + tb * G;
      T_* dcc = dc_p + b * H;
      if (t >= L[b]) {  // padding step: gradients pass through the frozen state untouched
        std::memset(dxr, 0, G * sizeof(T_));
        std::memset(dhr, 0, G * sizeof(T_));
        if (!proj) std::memcpy(dir_p + b * R, dh_p + b * R, R * sizeof(T_));
        if (proj) std::memset(mall_p + tb * H, 0, H * sizeof(T_));
        return;
      }
      T_* dmr = scr + sl[0];      // dL/dm (H)
      T_* dch = scr + sl[1];      // d c~ from the output path (H)
      T_* dov = scr + sl[2];      // d o after activation (H)
      T_* tcb = scr + sl[3];      // tanh(LN(c~)) (H)
      T_* ctb = scr + sl[4];      // c~ under cell zoneout (H)
      T_* dA = scr + sl[5];       // gate pre-activation gradient (4H)
      T_* dhh = scr + sl[6];      // d hw_hat, then d of the input LN's x_hat (4H)
      T_* xih = scr + sl[7];      // the input LN's x_hat (4H), then dA g_ih (4H)
      const T_* ga = ga_p + tb * G;
      const T_* hh = hh_p + tb * G;
      const T_* st = st_p + tb * 5;
      const T_* cp = t > 0 ? cs_p + (tb - B) * H : c0_p + b * H;
      const T_* gi = ga;
      const T_* gf = ga + H;
      const T_* gg = ga + 2 * H;
      const T_* go = ga + 3 * H;
      if (proj) {
        std::memcpy(dmr, dm_p + b * H, H * sizeof(T_));
      } else {  // R = H: dL/dm = dL/dh~ = (dout + dh)(1 - zeta); `direct` = zeta (dout + dh)
        const T_* dor = do_p + tb * R;
        const T_* dhc = dh_p + b * R;
        T_* dir = dir_p + b * R;
        if (zh) {
          const T_* z = zh_p + tb * R;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const T_ dhv = dor[k] + dhc[k];
            dmr[k] = dhv * (T_(1) - z[k]);
            dir[k] = z[k] * dhv;
          }
        } else {
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            dmr[k] = dor[k] + dhc[k];
            dir[k] = T_(0);
          }
        }
      }
      const T_* ct = cs_p + tb * H;
      if (zc) {  // c~ = f c_{t-1} + i g (the saved c_t is the zoned state)
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) ctb[k] = gf[k] * cp[k] + gi[k] * gg[k];
        ct = ctb;
      }
      if (cell_norm) {
        const T_ m2 = st[1], r2 = st[2];
        T_* awc = awc_p + id * H;
        T_* abc = abc_p + id * H;
        // three loops where one would do: as one `simd reduction` loop that also stored four arrays
        // and called tanh, it ran scalar (docs/rnn_fast.md, "scalar loops")
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) tcb[k] = t_tanh<T_>((ct[k] - m2) * r2 * wc_p[k] + bc_p[k]);
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          const T_ chat = (ct[k] - m2) * r2;
          const T_ tc = tcb[k];
          dov[k] = dmr[k] * tc;
          const T_ dpre = dmr[k] * go[k] * (T_(1) - tc * tc);
          awc[k] += dpre * chat;
          abc[k] += dpre;
          dch[k] = dpre * wc_p[k];
        }
        using V = Vec<T_>;
        const T_ s1 = reduce_row<T_>(H, [&](int64_t k) { return V::load(dch + k); }, [&](int64_t k) { return dch[k]; });
        const T_ s2 = reduce_row<T_>(
            H, [&](int64_t k) { return V::load(dch + k) * ((V::load(ct + k) - m2) * r2); },
            [&](int64_t k) { return dch[k] * ((ct[k] - m2) * r2); });
        const T_ mm1 = s1 / T_(H), mm2 = s2 / T_(H);
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) dch[k] = r2 * (dch[k] - mm1 - (ct[k] - m2) * r2 * mm2);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) tcb[k] = t_tanh<T_>(ct[k]);
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          const T_ tc = tcb[k];
          dov[k] = dmr[k] * tc;
          dch[k] = dmr[k] * go[k] * (T_(1) - tc * tc);
        }
      }
      if (proj) {
        T_* mr = mall_p + tb * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) mr[k] = go[k] * tcb[k];
      }
      if (zc) {
        const T_* z = zc_p + tb * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          const T_ dcv = dch[k] + dcc[k] * (T_(1) - z[k]);
          dA[k] = dcv * gg[k] * gi[k] * (T_(1) - gi[k]);
          dA[H + k] = dcv * cp[k] * gf[k] * (T_(1) - gf[k]);
          dA[2 * H + k] = dcv * gi[k] * (T_(1) - gg[k] * gg[k]);
          dA[3 * H + k] = dov[k] * go[k] * (T_(1) - go[k]);
          dcc[k] = dcv * gf[k] + z[k] * dcc[k];
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) {
          const T_ dcv = dch[k] + dcc[k];
          dA[k] = dcv * gg[k] * gi[k] * (T_(1) - gi[k]);
          dA[H + k] = dcv * cp[k] * gf[k] * (T_(1) - gf[k]);
          dA[2 * H + k] = dcv * gi[k] * (T_(1) - gg[k] * gg[k]);
          dA[3 * H + k] = dov[k] * go[k] * (T_(1) - go[k]);
          dcc[k] = dcv * gf[k];
        }
      }
      // Both layer-norm backwards of dA in two passes over 4H: the recurrent one (gain g_hh, x_hat =
      // hw_hat) and the input one (gain g_ih, x_hat recomputed from xw), with the parameter
      // gradients' row sums. Written as eight passes (two per LN backward's sums, one each for its
      // output, one each for the accumulations), the row pass waited on its loads of the saved rows.
      lstm_gate_backward(G, dA, hh, xw_p + tb * G, st[3], st[4], g_p, gi_p, ag_p + id * G, ab_p + id * G,
                         agi_p + id * G, dhh, xih, st[0], dhr, dxr);
    };

    // dh_{t-1} = direct + (dhw_t W_hh) rho for a block of (rows, R columns)
    auto dh_gemm = [&](int64_t t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      recurrent_dh<T_>(r0, r1, c0, c1, G, R, dhw_p + (t * B + r0) * G, w_p, dir_p, rec ? rm_p : nullptr, sg_p, dh_p);
    };

    run_region(split, [&](int id, const Guard& guard) {
      T_* scr = scratch.data_ptr<T_>() + id * scratch_per_thread;
      int64_t gr0, gr1, pr0, pr1, hc0, hc1, rc0, rc1;
      split.gemm_rows(id, gr0, gr1);
      split.pass_rows(id, pr0, pr1);
      split.gemm_cols(id, H, hc0, hc1);
      split.gemm_cols(id, R, rc0, rc1);
      for (int64_t t = T - 1; t >= 0; --t) {
        if (proj) {
          guard([&] { proj_pre(t, gr0, gr1, rc0, rc1); });
          RNN_BARRIER(split);
          guard([&] {  // dm = dh~_t W_hr
            thread_gemm<T_>(gr1 - gr0, hc1 - hc0, R, dht_p + (t * B + gr0) * R, R, wr_p + hc0, H,
                            dm_p + gr0 * H + hc0, H, false);
          });
          RNN_BARRIER(split);
        }
        guard([&] {
          for (int64_t b = pr0; b < pr1; ++b) {
            if (b + 1 < pr1) prefetch(t, b + 1); else prefetch(t - 1, pr0);
            row(t, b, scr, id);
          }
        });
        RNN_BARRIER(split);
        guard([&] { dh_gemm(t, gr0, gr1, rc0, rc1); });
        RNN_BARRIER(split);
      }
    });
  };
  if (B > 0) {
    if (xw.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  }
  // dW_hh = sum_t dhw_t^T (h_{t-1} rho): one GEMM over all steps instead of T rank-B updates
  auto hprev = at::empty({T, B, R}, opts);
  hprev[0].copy_(h0);
  if (T > 1) hprev.narrow(0, 1, T - 1).copy_(out.narrow(0, 0, T - 1));
  if (rec) hprev.mul_(*recurrent_mask);
  auto dw = gemm_new(dhw.view({T * B, G}).t(), hprev.view({T * B, R}));
  Tensor dbias = has(bias) ? acc_b.sum(0) : Tensor();
  Tensor dwc, dbc, dw_hr;
  if (cell_norm) {
    dwc = acc_wc.sum(0);
    dbc = acc_bc.sum(0);
  }
  if (proj) dw_hr = gemm_new(dht_all.view({T * B, R}).t(), m_all.view({T * B, H}));
  return {dxw, dh, dc, dw, acc_g.sum(0), dbias, acc_gi.sum(0), dwc, dbc, dw_hr};
}

// ----------------------------------------------------------------------------------------------
// GRU. G = 3H: r, u (nn.GRU's z), n; the LNs run over [0, 2H) and [2H, 3H) apart.
// ----------------------------------------------------------------------------------------------

// The contract's forward. Saved: hw_hat (T,B,3H), gates r, u, n (T,B,3H), stats (T,B,6) = rstd_hh_ru,
// rstd_hh_n, mean_ih_ru, rstd_ih_ru, mean_ih_n, rstd_ih_n; zeros on steps past a row's length.
std::vector<Tensor> gru_forward(const Tensor& xw, const OptTensor& lengths, const Tensor& h0, const Tensor& w_hh,
                                const Tensor& g_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                                const Tensor& g_ih, const OptTensor& recurrent_mask, const OptTensor& zoneout_h,
                                double eps, bool save) {
  at::NoGradGuard no_grad;  // called from autograd's backward too; nothing here is differentiated
  const int64_t T = xw.size(0), B = xw.size(1), G = xw.size(2), H = G / 3, H2 = 2 * H;
  const bool rec = has(recurrent_mask), zh = has(zoneout_h);
  auto opts = xw.options();
  auto out = empty_big({T, B, H}, opts, 0);
  auto h = h0.contiguous().clone();
  auto hw = at::empty({B, G}, opts);
  const Split split = Split::make(B);
  auto w_hh_c = w_hh.contiguous();
  Tensor wt = split.cols ? Tensor() : at::empty({H, G}, opts);  // W_hh^T, filled in the region (column split: gemv_rows)
  Tensor hin = rec ? h * *recurrent_mask : Tensor();
  // b_ih and b_hh add up everywhere except b_hh's candidate slice, which sits inside r * (.)
  auto bx = at::zeros({G}, opts);
  auto bn = at::zeros({H}, opts);
  if (has(bias_ih)) bx.add_(*bias_ih);
  if (has(bias_hh)) {
    bx.narrow(0, 0, H2).add_(bias_hh->narrow(0, 0, H2));
    bn.copy_(bias_hh->narrow(0, H2, H));
  }
  Tensor hw_hat, gates, stats;
  if (save) {
    hw_hat = empty_big({T, B, G}, opts, 1);
    gates = empty_big({T, B, G}, opts, 2);
    stats = at::empty({T, B, 6}, opts);
  }
  const auto L = lengths_vec(lengths, B, T);
  const auto sl = scratch_layout({G, G});  // hw_hat, gates (inference)
  const int64_t scratch_per_thread = sl.back();
  auto scratch = at::empty({split.nt, scratch_per_thread}, opts);

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_hh.data_ptr<T_>();
    const T_* gi_p = g_ih.data_ptr<T_>();
    const T_* bx_p = bx.data_ptr<T_>();
    const T_* bn_p = bn.data_ptr<T_>();
    const T_* rm_p = ptr_or_null<T_>(recurrent_mask);
    const T_* zh_p = ptr_or_null<T_>(zoneout_h);
    const T_* w_p = w_hh_c.data_ptr<T_>();
    T_* wt_p = wt.defined() ? wt.data_ptr<T_>() : nullptr;
    T_* out_p = out.data_ptr<T_>();
    T_* h_p = h.data_ptr<T_>();
    T_* hw_p = hw.data_ptr<T_>();
    T_* hin_p = rec ? hin.data_ptr<T_>() : nullptr;
    T_* hh_s = save ? hw_hat.data_ptr<T_>() : nullptr;
    T_* ga_s = save ? gates.data_ptr<T_>() : nullptr;
    T_* st_s = save ? stats.data_ptr<T_>() : nullptr;
    const T_* a_p = rec ? hin_p : h_p;

    auto row = [&](int64_t t, int64_t b, T_* scr) {
      const int64_t tb = t * B + b;
      T_* orow = out_p + tb * H;
      if (t >= L[b]) {
        std::memset(orow, 0, H * sizeof(T_));
        if (save) {
          std::memset(hh_s + tb * G, 0, G * sizeof(T_));
          std::memset(ga_s + tb * G, 0, G * sizeof(T_));
          std::memset(st_s + tb * 6, 0, 6 * sizeof(T_));
        }
        return;
      }
      const T_* hwr = hw_p + b * G;
      const T_* xr = xw_p + tb * G;
      T_* hh = save ? hh_s + tb * G : scr + sl[0];
      T_* ga = save ? ga_s + tb * G : scr + sl[1];
      T_ ma, ra, mb, rb, mxa, rxa, mxb, rxb;
      row_stats(hwr, H2, eps, ma, ra);
      row_stats(hwr + H2, H, eps, mb, rb);
      row_stats(xr, H2, eps, mxa, rxa);
      row_stats(xr + H2, H, eps, mxb, rxb);
#pragma omp simd
      for (int64_t k = 0; k < H2; ++k) {
        const T_ xh = (hwr[k] - ma) * ra;
        hh[k] = xh;
        ga[k] = t_sigmoid<T_>(xh * g_p[k] + (xr[k] - mxa) * rxa * gi_p[k] + bx_p[k]);
      }
      T_* hr = h_p + b * H;
      const T_* z = zh ? zh_p + tb * H : nullptr;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const T_ xh = (hwr[H2 + k] - mb) * rb;
        hh[H2 + k] = xh;
        const T_ xn = (xr[H2 + k] - mxb) * rxb * gi_p[H2 + k];
        const T_ n = t_tanh<T_>(xn + bx_p[H2 + k] + ga[k] * (xh * g_p[H2 + k] + bn_p[k]));
        ga[H2 + k] = n;
        const T_ u = ga[H + k];
        orow[k] = u * hr[k] + (T_(1) - u) * n;
      }
      if (zh) {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) orow[k] += z[k] * (hr[k] - orow[k]);
      }
      std::memcpy(hr, orow, H * sizeof(T_));
      if (rec) {
        const T_* rm = rm_p + b * H;
        T_* hi = hin_p + b * H;
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) hi[k] = orow[k] * rm[k];
      }
      if (save) {
        T_* st = st_s + tb * 6;
        st[0] = ra, st[1] = rb, st[2] = mxa, st[3] = rxa, st[4] = mxb, st[5] = rxb;
      }
    };

    run_region(split, [&](int id, const Guard& guard) {
      T_* scr = scratch.data_ptr<T_>() + id * scratch_per_thread;
      int64_t gr0, gr1, pr0, pr1, gc0, gc1;
      split.gemm_rows(id, gr0, gr1);
      split.pass_rows(id, pr0, pr1);
      split.gemm_cols(id, G, gc0, gc1);
      if (!split.cols) {
        guard([&] { transpose_rows(w_p, G, H, G * id / split.nt, G * (id + 1) / split.nt, wt_p); });
#pragma omp barrier
      }
      for (int64_t t = 0; t < T; ++t) {
        guard([&] {
          if (split.cols) {
            thread_gemv<T_>(gr0, gr1, gc0, gc1, H, a_p, H, w_p, hw_p, G);
          } else {
            thread_gemm<T_>(gr1 - gr0, gc1 - gc0, H, a_p + gr0 * H, H, wt_p + gc0, G, hw_p + gr0 * G + gc0, G, false);
          }
        });
        RNN_BARRIER(split);
        guard([&] {
          for (int64_t b = pr0; b < pr1; ++b) row(t, b, scr);
        });
        RNN_BARRIER(split);
      }
    });
  };
  if (B > 0) {
    if (xw.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  }
  if (!save) return {out, h};
  return {out, h, hw_hat, gates, stats};
}

// The contract's backward -> dxw, dh0, dw_hh, dln_hh, dbias_ih, dbias_hh, dln_ih.
std::vector<Tensor> gru_backward(const Tensor& xw, const OptTensor& lengths, const Tensor& h0, const Tensor& w_hh,
                                 const Tensor& g_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                                 const Tensor& g_ih, const OptTensor& recurrent_mask, const OptTensor& zoneout_h,
                                 double eps, const Tensor& out, const Tensor& hw_hat, const Tensor& gates,
                                 const Tensor& stats, const Tensor& dout_in, const Tensor& dh_n) {
  at::NoGradGuard no_grad;  // called from autograd's backward too; nothing here is differentiated
  (void)eps;
  const int64_t T = xw.size(0), B = xw.size(1), G = xw.size(2), H = G / 3, H2 = 2 * H;
  const bool rec = has(recurrent_mask), zh = has(zoneout_h);
  auto opts = xw.options();
  auto dout = dout_in.contiguous();
  auto dxw = empty_big({T, B, G}, opts, 5);
  auto dhw = empty_big({T, B, G}, opts, 6);
  auto dh = dh_n.contiguous().clone();
  auto direct = at::empty({B, H}, opts);
  auto w_hh_c = w_hh.contiguous();                              // (3H, H)
  Tensor sgemm = rec ? at::empty({B, H}, opts) : Tensor();
  auto bn = at::zeros({H}, opts);
  if (has(bias_hh)) bn.copy_(bias_hh->narrow(0, H2, H));
  auto h0_c = h0.contiguous();
  const auto L = lengths_vec(lengths, B, T);
  const Split split = Split::make(B);
  auto acc_g = at::zeros({split.nt, G}, opts);                   // per-thread sums, as in lstm_backward
  auto acc_b = at::zeros({split.nt, G}, opts);                   // d b_ih
  auto acc_bn = at::zeros({split.nt, H}, opts);                  // d b_hh[2H:]
  auto acc_gi = at::zeros({split.nt, G}, opts);
  const auto sl = scratch_layout({G, G, G});
  const int64_t scratch_per_thread = sl.back();
  auto scratch = at::empty({split.nt, scratch_per_thread}, opts);

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_hh.data_ptr<T_>();
    const T_* gi_p = g_ih.data_ptr<T_>();
    const T_* bn_p = bn.data_ptr<T_>();
    const T_* rm_p = ptr_or_null<T_>(recurrent_mask);
    const T_* zh_p = ptr_or_null<T_>(zoneout_h);
    const T_* w_p = w_hh_c.data_ptr<T_>();
    const T_* do_p = dout.data_ptr<T_>();
    const T_* hh_p = hw_hat.data_ptr<T_>();
    const T_* ga_p = gates.data_ptr<T_>();
    const T_* st_p = stats.data_ptr<T_>();
    const T_* out_p = out.data_ptr<T_>();
    const T_* h0_p = h0_c.data_ptr<T_>();
    T_* dxw_p = dxw.data_ptr<T_>();
    T_* dhw_p = dhw.data_ptr<T_>();
    T_* dh_p = dh.data_ptr<T_>();
    T_* dir_p = direct.data_ptr<T_>();
    T_* sg_p = rec ? sgemm.data_ptr<T_>() : nullptr;
    T_* ag_p = acc_g.data_ptr<T_>();
    T_* ab_p = acc_b.data_ptr<T_>();
    T_* abn_p = acc_bn.data_ptr<T_>();
    T_* agi_p = acc_gi.data_ptr<T_>();

    auto row = [&](int64_t t, int64_t b, T_* scr, int id) {
      const int64_t tb = t * B + b;
      T_* dxr = dxw_p + tb * G;
      T_* dhr = dhw_p + tb * G;
      const T_* dhc = dh_p + b * H;
      T_* dir = dir_p + b * H;
      if (t >= L[b]) {
        std::memset(dxr, 0, G * sizeof(T_));
        std::memset(dhr, 0, G * sizeof(T_));
        std::memcpy(dir, dhc, H * sizeof(T_));  // dh passes the frozen state untouched
        return;
      }
      T_* dA = scr + sl[0];   // gate pre-activation gradient (3H)
      T_* dhh = scr + sl[1];  // d hw_hat; then d of the input LN's x_hat (3H)
      T_* xih = scr + sl[2];  // the input LN's x_hat (3H)
      const T_* ga = ga_p + tb * G;
      const T_* hh = hh_p + tb * G;
      const T_* st = st_p + tb * 6;
      const T_* hp = t > 0 ? out_p + (tb - B) * H : h0_p + b * H;
      const T_* dor = do_p + tb * H;
      const T_* z = zh ? zh_p + tb * H : nullptr;
      T_* ag = ag_p + id * G;
      T_* abn = abn_p + id * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const T_ r = ga[k], u = ga[H + k], n = ga[H2 + k];
        const T_ dhv = dor[k] + dhc[k];
        const T_ dht = zh ? dhv * (T_(1) - z[k]) : dhv;        // dL/dh~
        const T_ dnp = dht * (T_(1) - u) * (T_(1) - n * n);    // d of the candidate's pre-activation
        const T_ hn = hh[H2 + k] * g_p[H2 + k] + bn_p[k];
        const T_ dhn = dnp * r;
        dA[k] = dnp * hn * r * (T_(1) - r);                    // d r pre-activation
        dA[H + k] = dht * (hp[k] - n) * u * (T_(1) - u);       // d u pre-activation
        dA[H2 + k] = dnp;
        abn[k] += dhn;
        ag[H2 + k] += dhn * hh[H2 + k];
        dhh[H2 + k] = dhn * g_p[H2 + k];
        dir[k] = dht * u + (zh ? z[k] * dhv : T_(0));          // the part of dh_{t-1} that bypasses W_hh
      }
#pragma omp simd
      for (int64_t k = 0; k < H2; ++k) {
        ag[k] += dA[k] * hh[k];
        dhh[k] = dA[k] * g_p[k];
      }
      ln_backward_row(dhh, hh, H2, st[0], dhr);
      ln_backward_row(dhh + H2, hh + H2, H, st[1], dhr + H2);
      T_* ab = ab_p + id * G;
#pragma omp simd
      for (int64_t k = 0; k < G; ++k) ab[k] += dA[k];
      // back through the input LN, one block (r,u: 2H; n: H) at a time. One loop per block: with the
      // block choice inside the loop (k < 2H ? ...), it ran scalar (docs/rnn_fast.md)
      const T_* xr = xw_p + tb * G;
      T_* agi = agi_p + id * G;
      for (int blk = 0; blk < 2; ++blk) {
        const int64_t k0 = blk == 0 ? 0 : H2, k1 = blk == 0 ? H2 : G;
        const T_ mean = st[2 + 2 * blk], rstd = st[3 + 2 * blk];
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) {
          const T_ xh = (xr[k] - mean) * rstd;
          xih[k] = xh;
          agi[k] += dA[k] * xh;
          dhh[k] = dA[k] * gi_p[k];
        }
      }
      ln_backward_row(dhh, xih, H2, st[3], dxr);
      ln_backward_row(dhh + H2, xih + H2, H, st[5], dxr + H2);
    };

    auto dh_gemm = [&](int64_t t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      recurrent_dh<T_>(r0, r1, c0, c1, G, H, dhw_p + (t * B + r0) * G, w_p, dir_p, rec ? rm_p : nullptr, sg_p, dh_p);
    };

    run_region(split, [&](int id, const Guard& guard) {
      T_* scr = scratch.data_ptr<T_>() + id * scratch_per_thread;
      int64_t gr0, gr1, pr0, pr1, hc0, hc1;
      split.gemm_rows(id, gr0, gr1);
      split.pass_rows(id, pr0, pr1);
      split.gemm_cols(id, H, hc0, hc1);
      for (int64_t t = T - 1; t >= 0; --t) {
        guard([&] {
          for (int64_t b = pr0; b < pr1; ++b) row(t, b, scr, id);
        });
        RNN_BARRIER(split);
        guard([&] { dh_gemm(t, gr0, gr1, hc0, hc1); });
        RNN_BARRIER(split);
      }
    });
  };
  if (B > 0) {
    if (xw.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  }
  auto hprev = at::empty({T, B, H}, opts);
  hprev[0].copy_(h0);
  if (T > 1) hprev.narrow(0, 1, T - 1).copy_(out.narrow(0, 0, T - 1));
  if (rec) hprev.mul_(*recurrent_mask);
  auto dw = gemm_new(dhw.view({T * B, G}).t(), hprev.view({T * B, H}));
  auto dbih = acc_b.sum(0);
  Tensor dbhh;
  if (has(bias_hh)) {
    dbhh = dbih.clone();
    dbhh.narrow(0, H2, H).copy_(acc_bn.sum(0));
  }
  return {dxw, dh, dw, acc_g.sum(0), has(bias_ih) ? dbih : Tensor(), dbhh, acc_gi.sum(0)};
}

}  // namespace

namespace layernorm {

void bind_rnn(pybind11::module& m) {
  m.def("lstm_forward", &lstm_forward, "LN-LSTM recurrence forward (layernorm/rnn/contract.py)");
  m.def("lstm_backward", &lstm_backward, "LN-LSTM recurrence backward");
  m.def("gru_forward", &gru_forward, "LN-GRU recurrence forward");
  m.def("gru_backward", &gru_backward, "LN-GRU recurrence backward");
  m.def("linear_forward", &linear_forward, "x @ w.T through the large-GEMM library");
  m.def("linear_backward", &linear_backward, "(dx, dw) of x @ w.T");
  m.def("gemm_library", []() { return onednn_enabled() ? "onednn" : "aten"; });
  m.def("_set_step_gemm", [](const std::string& name) {
    TORCH_CHECK(name == "brgemm" || name == "blas", "step GEMM must be 'brgemm' or 'blas', but got '", name, "'");
    g_step_gemm = name == "brgemm" ? 0 : 1;
  }, "the per-step float32 GEMM kernel, for A/B measurement");
}

}  // namespace layernorm
