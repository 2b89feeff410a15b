// Fused CPU recurrences of the layer-normalized LSTM and GRU (forward and hand-written backward).
//
// The equations are those of layernorm/nn/rnn_reference.py. Per time step the recurrent GEMM goes to
// oneDNN's matmul (else MKL's packed GEMM, with W_hh packed once per call, else ATen's mm), on torch's own OpenMP pool,
// and everything else -- the layer norm of the GEMM result, gate activations, the cell update and
// the cell layer norm -- is ONE pass per batch row over a few kilobytes that stay in L1. The backward runs the time loop in reverse
// with one GEMM per step for dh; dW_hh is one large GEMM after the loop over all steps.
//
// exp/tanh are written out as polynomials (Cephes constants, ~2 ulp) because calls to libm stop gcc
// from vectorizing the row loops and glibc's vector math needs -ffast-math, which we do not want
// (it would also change the NaN and rounding behaviour of the layer-norm statistics). The build
// adds -fno-trapping-math (lets gcc turn the clamps into blends) and -fno-math-errno (inline sqrt);
// without them NO row loop vectorizes (checked with -fopt-info-vec) and the forward is 3x slower.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <sys/mman.h>
#include <string>
#include <string_view>
#include <vector>

// ATen's oneDNN matmul and linear functions; no public header ships them. Weak: where torch lacks
// them the pointers are null (gemm_lib(), onednn_packed_weight() below).
namespace at { namespace native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
at::Tensor mkldnn_linear_pointwise(const at::Tensor& input_t, const at::Tensor& weight_t,
                                   const std::optional<at::Tensor>& bias_opt, std::string_view attr,
                                   c10::List<std::optional<at::Scalar>> scalars,
                                   std::optional<std::string_view> algorithm) __attribute__((weak));
at::Tensor mkldnn_linear_pointwise_binary(const at::Tensor& input_t, const at::Tensor& other_t,
                                          const at::Tensor& weight_t, const std::optional<at::Tensor>& bias_opt,
                                          std::string_view attr) __attribute__((weak));
}}  // namespace at::native

namespace {

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

// Mean and 1/sqrt(biased var + eps) of v[0:n], two passes (no E[x^2]-E[x]^2 cancellation).
template <typename T>
inline void row_stats(const T* v, int64_t n, double eps, T& mean, T& rstd) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += v[k];
  const T m = s / T(n);
  T q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t k = 0; k < n; ++k) {
    const T d = v[k] - m;
    q += d * d;
  }
  mean = m;
  rstd = T(1) / std::sqrt(q / T(n) + T(eps));
}

// dx of y = x_hat * 1 given dy_hat = d(x_hat): rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
template <typename T>
inline void ln_backward_row(const T* g, const T* xhat, int64_t n, T rstd, T* dx) {
  T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t k = 0; k < n; ++k) {
    s1 += g[k];
    s2 += g[k] * xhat[k];
  }
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
at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t hi = lo + t.nbytes();
  const uintptr_t a = (lo + kHuge - 1) & ~(kHuge - 1), b = hi & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#endif
  return t;
}

inline int64_t grain_for(int64_t B, int64_t H) {
  // rows are ~5H flops*10 each; only split when a chunk is worth a thread wake-up (~ a few us)
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1));
}

std::vector<int64_t> lengths_vec(const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  std::vector<int64_t> L(B, T);
  if (lengths.has_value() && lengths->defined()) {
    auto l = lengths->to(at::kLong).contiguous();
    const int64_t* p = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) L[b] = std::min<int64_t>(std::max<int64_t>(p[b], 0), T);
  }
  return L;
}


// ----------------------------------------------------------------------------------------------
// The per-step recurrent GEMM
// ----------------------------------------------------------------------------------------------

// oneDNN's matmul, as ATen's own mkldnn_matmul (exported by libtorch_cpu when torch is built with
// oneDNN, which the x86 and Arm wheels are). Declared weak: where it is absent the pointer is null
// and the GEMMs below use MKL or ATen. Measured on the 2-core AMD EPYC (Zen 4) of the CI box, fp32,
// 2 threads, every GEMM of an LSTM at H = 256 ran 12-30% faster through oneDNN than through
// at::mm (MKL): the step GEMM h W_hh^T at B = 32 109 against 139 us (MKL packed: ~129), the backward's
// dhw W_hh 95 against 107 us, and the (T*B x 4H) GEMMs of the weight gradients 194 against 170 GFLOP/s.
// nn.LSTM's CPU kernel is oneDNN's too, so this puts both on the same GEMMs.

// LAYERNORM_RNN_GEMM: "onednn" / "mkl" force one library (for A/B measurement); unset or "auto" takes
// oneDNN where it is there and enabled (torch.backends.mkldnn.enabled).
enum class GemmLib { kOneDnn, kMkl };
GemmLib gemm_lib() {
  const char* e = std::getenv("LAYERNORM_RNN_GEMM");
  const bool have = &at::native::mkldnn_matmul != nullptr;
  const std::string v = e == nullptr ? "" : e;
  TORCH_CHECK(v.empty() || v == "auto" || v == "onednn" || v == "mkl",
              "LAYERNORM_RNN_GEMM must be one of auto, onednn, mkl, but got '", v, "'");
  if (v == "mkl") return GemmLib::kMkl;
  if (v == "onednn") {
    TORCH_CHECK(have, "LAYERNORM_RNN_GEMM=onednn, but this torch build does not export oneDNN's matmul");
    return GemmLib::kOneDnn;
  }
  return have && at::globalContext().userEnabledMkldnn() ? GemmLib::kOneDnn : GemmLib::kMkl;
}

// out = a @ b (+ out when accumulate); out contiguous. float32 may go to oneDNN; float64 (gradcheck)
// always goes to ATen. oneDNN's matmul takes transposed views without a copy.
void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate, GemmLib lib) {
  if (lib == GemmLib::kOneDnn && a.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0) {
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

// A new (rows x N) product. empty_big (huge pages): the input projection at B = 128 is 52 MB, mapped
// fresh at every call, and its page faults made the B = 128 forward 13% slower (99 against 86 ms).
at::Tensor gemm_new(const at::Tensor& a, const at::Tensor& b, GemmLib lib) {
  auto out = empty_big({a.size(0), b.size(1)}, a.options());
  gemm(a, b, out, false, lib);
  return out;
}

// MKL's packed-GEMM API, exported by torch's MKL-enabled x86 builds. Declared weak: where torch has
// no MKL (Arm, macOS, some source builds) the pointers are null and StepGemm falls back to ATen.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

// LAYERNORM_RNN_PACKED_GEMM=0 switches off packing W once per call, MKL's and oneDNN's (A/B measurement).
bool packing_allowed() {
  const char* e = std::getenv("LAYERNORM_RNN_PACKED_GEMM");
  return !(e != nullptr && e[0] == '0');
}

bool packed_gemm_enabled() {
  if (cblas_sgemm_pack_get_size == nullptr || cblas_sgemm_pack == nullptr || cblas_sgemm_compute == nullptr)
    return false;
  return packing_allowed();
}

// W as oneDNN's matmul wants it for `rows` rows (its blocked layout, an opaque MKLDNN tensor), through
// the op torch.compile's CPU backend uses (mkldnn::_reorder_linear_weight); undefined where that op
// or the exported linear functions are missing, or the reorder fails.
at::Tensor onednn_packed_weight(const at::Tensor& w_out_in, int64_t rows) {
  if (&at::native::mkldnn_linear_pointwise == nullptr || &at::native::mkldnn_linear_pointwise_binary == nullptr)
    return {};
  if (!packing_allowed()) return {};
  try {
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (!op.has_value()) return {};
    return op->typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>().call(w_out_in.contiguous(), rows);
  } catch (const std::exception&) {
    return {};
  }
}

// out = a @ op(W) (+ out when accumulating) at every step, with W fixed for the whole loop.
// A (B x K) by (K x N) product with small B spends much of its time re-packing all of W into the
// GEMM's blocked layout at every call; packing W once per call and reusing it at every step removes
// that, with the same result bits at every step. In order of preference:
//  - oneDNN (see gemm() above), B >= 2 (B = 1 too when W exceeds 2 MiB): W reordered once (onednn_packed_weight), then
//    mkldnn_linear_pointwise(_binary) per step. Per step at H = 256, 2 threads: 86 against 103 us
//    for the plain oneDNN matmul forward at B = 32, 18 against 32 us at B = 2; H = 512, B = 32:
//    310 against 370 us. The result is a new tensor, which run() returns.
//  - oneDNN's plain matmul on a contiguous op(W) (packing unavailable or switched off).
//  - MKL (float32, no oneDNN, or B = 1 with a small W: a GEMV, where MKL was 1.4-2.5x faster than oneDNN's matmul):
//    with `pack`, cblas_sgemm_pack once and cblas_sgemm_compute per step (7% faster forward
//    h W_hh^T at B = 32, 10% at B = 1; the backward's dhw W_hh was 2-5% slower packed, so it is not).
//  - ATen's mm (float64; or no MKL).
// LAYERNORM_RNN_PACKED_GEMM=0 switches both kinds of packing off (for A/B measurement).
class StepGemm {
 public:
  // forward: op(W) = W^T with W (N x K) = W_hh (4H x H);  backward: op(W) = W = W_hh (K x N).
  StepGemm(const at::Tensor& w, bool transpose, int64_t m, bool pack) : m_(m), lib_(gemm_lib()) {
    k_ = transpose ? w.size(1) : w.size(0);
    n_ = transpose ? w.size(0) : w.size(1);
    const bool fits = m < (1 << 30) && k_ < (1 << 30) && n_ < (1 << 30);
    const bool f32 = w.scalar_type() == at::kFloat;
    // One row is a GEMV: there MKL beat oneDNN's plain matmul 1.4-2.5x, and its packed one only once
    // W outgrows the L2 cache (H = 512: 45 against 71 us forward, 57 against 85 backward; H = 256:
    // 21 against 18 us), hence the size limit (2 MiB of float32 weights).
    const bool small_gemv = m < 2 && k_ * n_ <= (int64_t(1) << 19);
    if (lib_ == GemmLib::kOneDnn && f32 && m > 0 && !small_gemv) {
      // linear's weight is (out, in) = op(W)^T: W_hh itself forward, W_hh^T backward
      dnn_packed_ = onednn_packed_weight(transpose ? w : w.t(), m);
    }
    if (dnn_packed_.defined()) return;
    if (m < 2) lib_ = GemmLib::kMkl;
    const bool onednn = lib_ == GemmLib::kOneDnn && f32;
    if (!onednn && pack && f32 && m > 0 && fits && packed_gemm_enabled()) {
      auto wc = w.contiguous();
      const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(m), int(n_), int(k_));
      packed_ = at::empty({int64_t(bytes / sizeof(float)) + 16}, w.options());
      cblas_sgemm_pack(kRowMajor, kBMatrix, transpose ? kTrans : kNoTrans, int(m), int(n_), int(k_), 1.0f,
                       wc.data_ptr<float>(), int(wc.size(1)), packed_.data_ptr<float>());
    } else {
      w_ = transpose ? w.t().contiguous() : w.contiguous();  // (K, N): a transposed view ran ~1.5x slower
    }
  }
  // a (m x K) @ op(W), plus out's previous value when accumulate. Returns the tensor holding the
  // result: `out`, or (packed oneDNN, not accumulating) a new (m x N) tensor; read the result from it.
  at::Tensor run(const at::Tensor& a, at::Tensor& out, bool accumulate) const {
    if (dnn_packed_.defined()) {
      if (!accumulate) {
        return at::native::mkldnn_linear_pointwise(a, dnn_packed_, std::nullopt, "none",
                                                   c10::List<std::optional<at::Scalar>>(), std::nullopt);
      }
      out.copy_(at::native::mkldnn_linear_pointwise_binary(a, out, dnn_packed_, std::nullopt, "add"));
    } else if (packed_.defined()) {
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m_), int(n_), int(k_), a.data_ptr<float>(),
                          int(a.stride(0)), packed_.data_ptr<float>(), int(n_), accumulate ? 1.0f : 0.0f,
                          out.data_ptr<float>(), int(out.stride(0)));
    } else {
      gemm(a, w_, out, accumulate, lib_);
    }
    return out;
  }

 private:
  int64_t m_, k_ = 0, n_ = 0;
  GemmLib lib_;
  at::Tensor dnn_packed_, packed_, w_;
};

// x (rows x K) @ W^T, dy @ W and dy^T @ x with the GEMM library above: the layer's input projection
// and its backward, so that the module's largest GEMMs run on the same library as the recurrence.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w) {
  return gemm_new(x, w.t(), gemm_lib());
}

std::vector<at::Tensor> linear_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                        bool need_dx, bool need_dw) {
  const GemmLib lib = gemm_lib();
  at::Tensor dx, dw;
  if (need_dx) dx = gemm_new(dy, w, lib);
  if (need_dw) dw = gemm_new(dy.t(), x, lib);
  return {dx, dw};
}

// ----------------------------------------------------------------------------------------------
// LSTM
// ----------------------------------------------------------------------------------------------

// Saved for backward (per step, per row): hw_hat (4H), gates after activation (4H), c (H),
// rstd of the recurrent LN, mean and rstd of the cell LN, and with g_ih the mean and rstd of the
// input LN. h_{t-1} is read back from `out`.
//
// g_ih (4H) given: xw is the raw input projection W_ih x and its layer norm (gain g_ih, no shift)
// is computed here, in the row pass that reads xw anyway, instead of by a separate layer_norm over
// the whole (T, B, 4H) tensor before the loop (and its backward after it): two fewer passes over
// T*B*4H values each way, and no normalized copy of xw in memory.
std::vector<at::Tensor> lstm_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& lengths,
                                     const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                                     const at::Tensor& g_hh, const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& wc, const c10::optional<at::Tensor>& bc,
                                     double eps, bool cell_norm, bool save, const c10::optional<at::Tensor>& g_ih) {
  const int64_t T = xw.size(0), B = xw.size(1), H4 = xw.size(2), H = H4 / 4;
  auto opts = xw.options();
  auto out = empty_big({T, B, H}, opts);
  auto h = h0.contiguous().clone();
  auto c = c0.contiguous().clone();
  auto hw = at::empty({B, H4}, opts);
  const bool ln_ih = g_ih.has_value() && g_ih->defined();
  at::Tensor hw_hat, gates, cs, rstd1, mean2, rstd2, mean_ih, rstd_ih;
  if (save) {
    hw_hat = empty_big({T, B, H4}, opts);
    gates = empty_big({T, B, H4}, opts);
    cs = empty_big({T, B, H}, opts);
    rstd1 = at::empty({T, B}, opts);
    mean2 = at::empty({T, B}, opts);
    rstd2 = at::empty({T, B}, opts);
    if (ln_ih) {
      mean_ih = at::empty({T, B}, opts);
      rstd_ih = at::empty({T, B}, opts);
    }
  } else {  // inference: only a one-step scratch
    hw_hat = at::empty({1, B, H4}, opts);
    gates = at::empty({1, B, H4}, opts);
  }
  const auto L = lengths_vec(lengths, B, T);
  const StepGemm gemm(w_hh, /*transpose=*/true, B, /*pack=*/true);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor bias_c = has_bias ? bias->contiguous() : at::zeros({H4}, opts);  // no branch in the row loop
  // without g_ih the row loop runs the same code with mean 0, rstd 1 and gain 1: x - 0 and x * 1 are exact
  at::Tensor gih_c = ln_ih ? g_ih->contiguous() : at::ones({H4}, opts);
  at::Tensor wc_c = cell_norm ? wc->contiguous() : at::Tensor();
  at::Tensor bc_c = cell_norm ? bc->contiguous() : at::Tensor();
  auto g_c = g_hh.contiguous();

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* b_p = bias_c.data_ptr<T_>();
    const T_* gi_p = gih_c.data_ptr<T_>();
    const T_* wc_p = cell_norm ? wc_c.data_ptr<T_>() : nullptr;
    const T_* bc_p = cell_norm ? bc_c.data_ptr<T_>() : nullptr;
    T_* out_p = out.data_ptr<T_>();
    T_* h_p = h.data_ptr<T_>();
    T_* c_p = c.data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor hw_t = gemm.run(h, hw, false);  // (B, 4H) = h W_hh^T
      const T_* hw_p = hw_t.data_ptr<T_>();
      const int64_t ts = save ? t : 0;
      T_* hh_t = hw_hat.data_ptr<T_>() + ts * B * H4;
      T_* ga_t = gates.data_ptr<T_>() + ts * B * H4;
      at::parallel_for(0, B, grain_for(B, H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          T_* o_row = out_p + (t * B + b) * H;
          if (t >= L[b]) {  // past the end: state frozen, output zero
            std::memset(o_row, 0, H * sizeof(T_));
            if (save) {
              std::memset(hh_t + b * H4, 0, H4 * sizeof(T_));
              std::memset(ga_t + b * H4, 0, H4 * sizeof(T_));
              std::memcpy(cs.data_ptr<T_>() + (t * B + b) * H, c_p + b * H, H * sizeof(T_));
              rstd1.data_ptr<T_>()[t * B + b] = 0;
              mean2.data_ptr<T_>()[t * B + b] = 0;
              rstd2.data_ptr<T_>()[t * B + b] = 0;
              if (ln_ih) {
                mean_ih.data_ptr<T_>()[t * B + b] = 0;
                rstd_ih.data_ptr<T_>()[t * B + b] = 0;
              }
            }
            continue;
          }
          const T_* hwr = hw_p + b * H4;
          const T_* xr = xw_p + (t * B + b) * H4;
          T_* hh = hh_t + b * H4;
          T_* ga = ga_t + b * H4;
          T_ m1, r1, mx = 0, rx = 1;
          row_stats(hwr, H4, eps, m1, r1);
          if (ln_ih) {
            row_stats(xr, H4, eps, mx, rx);
            if (save) {
              mean_ih.data_ptr<T_>()[t * B + b] = mx;
              rstd_ih.data_ptr<T_>()[t * B + b] = rx;
            }
          }
#pragma omp simd
          for (int64_t k = 0; k < H4; ++k) {
            const T_ xh = (hwr[k] - m1) * r1;
            hh[k] = xh;
            ga[k] = xh * g_p[k] + (xr[k] - mx) * rx * gi_p[k] + b_p[k];
          }
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {  // activations i, f, o sigmoid; g tanh
            ga[k] = t_sigmoid<T_>(ga[k]);
            ga[H + k] = t_sigmoid<T_>(ga[H + k]);
            ga[2 * H + k] = t_tanh<T_>(ga[2 * H + k]);
            ga[3 * H + k] = t_sigmoid<T_>(ga[3 * H + k]);
          }
          T_* cr = c_p + b * H;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) cr[k] = ga[H + k] * cr[k] + ga[k] * ga[2 * H + k];
          T_* hr = h_p + b * H;
          if (cell_norm) {
            T_ m2, r2;
            row_stats(cr, H, eps, m2, r2);
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) {
              const T_ v = ga[3 * H + k] * t_tanh<T_>((cr[k] - m2) * r2 * wc_p[k] + bc_p[k]);
              hr[k] = v;
              o_row[k] = v;
            }
            if (save) {
              mean2.data_ptr<T_>()[t * B + b] = m2;
              rstd2.data_ptr<T_>()[t * B + b] = r2;
            }
          } else {
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) {
              const T_ v = ga[3 * H + k] * t_tanh<T_>(cr[k]);
              hr[k] = v;
              o_row[k] = v;
            }
          }
          if (save) {
            rstd1.data_ptr<T_>()[t * B + b] = r1;
            std::memcpy(cs.data_ptr<T_>() + (t * B + b) * H, cr, H * sizeof(T_));
          }
        }
      });
    }
  };
  if (xw.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  if (!save) return {out, h, c};
  return {out, h, c, hw_hat, gates, cs, rstd1, mean2, rstd2, mean_ih, rstd_ih};
}

// Returns dxw, dh0, dc0, dw_hh, dg_hh, dbias, dwc, dbc, dg_ih (undefined without g_ih). With g_ih,
// xw is the raw projection the forward was given, and dxw is its gradient (through the input LN).
std::vector<at::Tensor> lstm_backward(const at::Tensor& dout_in, const at::Tensor& dhn, const at::Tensor& dcn,
                                      const c10::optional<at::Tensor>& lengths, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& g_hh,
                                      const c10::optional<at::Tensor>& wc, const c10::optional<at::Tensor>& bc,
                                      const at::Tensor& out, const at::Tensor& hw_hat, const at::Tensor& gates,
                                      const at::Tensor& cs, const at::Tensor& rstd1, const at::Tensor& mean2,
                                      const at::Tensor& rstd2, bool cell_norm, const c10::optional<at::Tensor>& xw,
                                      const c10::optional<at::Tensor>& g_ih,
                                      const c10::optional<at::Tensor>& mean_ih,
                                      const c10::optional<at::Tensor>& rstd_ih) {
  const int64_t T = gates.size(0), B = gates.size(1), H4 = gates.size(2), H = H4 / 4;
  const bool ln_ih = g_ih.has_value() && g_ih->defined();
  auto opts = gates.options();
  auto dout = dout_in.contiguous();
  auto dxw = empty_big({T, B, H4}, opts);
  auto dhw = empty_big({T, B, H4}, opts);
  auto dh = dhn.contiguous().clone();  // carried dL/dh_t
  auto dc = dcn.contiguous().clone();  // carried dL/dc_t
  // The row pass overwrites each row of dh with the part of dh_{t-1} that bypasses the GEMM (the
  // GRU's u*dh, or the unchanged dh of a row past its length), after its last read of that row;
  // the GEMM then adds dhw_t W_hh in place.
  const StepGemm gemm(w_hh, /*transpose=*/false, B, /*pack=*/false);
  auto acc_g = at::zeros({B, H4}, opts);  // per-row partial sums: deterministic for any split
  auto acc_b = at::zeros({B, H4}, opts);
  auto acc_wc = at::zeros({B, H}, opts);
  auto acc_bc = at::zeros({B, H}, opts);
  at::Tensor acc_gih, xw_c, gih_c, mih_c, rih_c;
  if (ln_ih) {
    acc_gih = at::zeros({B, H4}, opts);
    xw_c = xw->contiguous();
    gih_c = g_ih->contiguous();
    mih_c = mean_ih->contiguous();
    rih_c = rstd_ih->contiguous();
  }
  const auto L = lengths_vec(lengths, B, T);
  auto g_c = g_hh.contiguous();
  auto c0_c = c0.contiguous();
  at::Tensor wc_c = cell_norm ? wc->contiguous() : at::Tensor();
  at::Tensor bc_c = cell_norm ? bc->contiguous() : at::Tensor();

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* wc_p = cell_norm ? wc_c.data_ptr<T_>() : nullptr;
    const T_* bc_p = cell_norm ? bc_c.data_ptr<T_>() : nullptr;
    const T_* do_p = dout.data_ptr<T_>();
    const T_* hh_p = hw_hat.data_ptr<T_>();
    const T_* ga_p = gates.data_ptr<T_>();
    const T_* cs_p = cs.data_ptr<T_>();
    const T_* c0_p = c0_c.data_ptr<T_>();
    const T_* r1_p = rstd1.data_ptr<T_>();
    const T_* m2_p = cell_norm ? mean2.data_ptr<T_>() : nullptr;
    const T_* r2_p = cell_norm ? rstd2.data_ptr<T_>() : nullptr;
    T_* dxw_p = dxw.data_ptr<T_>();
    T_* dhw_p = dhw.data_ptr<T_>();
    T_* dh_p = dh.data_ptr<T_>();
    T_* dc_p = dc.data_ptr<T_>();
    T_* ag_p = acc_g.data_ptr<T_>();
    T_* ab_p = acc_b.data_ptr<T_>();
    T_* awc_p = acc_wc.data_ptr<T_>();
    T_* abc_p = acc_bc.data_ptr<T_>();
    const T_* xw_p = ln_ih ? xw_c.data_ptr<T_>() : nullptr;
    const T_* gih_p = ln_ih ? gih_c.data_ptr<T_>() : nullptr;
    const T_* mih_p = ln_ih ? mih_c.data_ptr<T_>() : nullptr;
    const T_* rih_p = ln_ih ? rih_c.data_ptr<T_>() : nullptr;
    T_* agi_p = ln_ih ? acc_gih.data_ptr<T_>() : nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, grain_for(B, H), [&](int64_t b0, int64_t b1) {
        std::vector<T_> buf(3 * H + H4 + (ln_ih ? 2 * H4 : 0));
        T_* dch = buf.data();      // d c_hat (H)
        T_* dov = dch + H;         // d o after activation (H)
        T_* dhh = dov + H;         // d hw_hat (4H); then d of the input LN's x_hat
        T_* dAb = dhh + H4;        // with g_ih: the gate gradient dA (4H) ...
        T_* xih = dAb + H4;        // ... and the input LN's x_hat (4H)
        T_* tcb = buf.data() + 2 * H + H4 + (ln_ih ? 2 * H4 : 0);  // tanh(LN(c_t)) (H)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t tb = t * B + b;
          T_* dxr = dxw_p + tb * H4;
          T_* dhr = dhw_p + tb * H4;
          T_* dhc = dh_p + b * H;
          T_* dcc = dc_p + b * H;
          if (t >= L[b]) {  // padding step: gradients pass through the frozen state untouched
            std::memset(dxr, 0, H4 * sizeof(T_));
            std::memset(dhr, 0, H4 * sizeof(T_));
            // dh stays as it is: it is this row's `direct`
            continue;
          }
          T_* dA = ln_ih ? dAb : dxr;  // without the input LN, dA is dxw itself
          const T_* ga = ga_p + tb * H4;
          const T_* hh = hh_p + tb * H4;
          const T_* cr = cs_p + tb * H;
          const T_* cp = t > 0 ? cs_p + (tb - B) * H : c0_p + b * H;
          const T_* dor = do_p + tb * H;
          const T_* gi = ga;
          const T_* gf = ga + H;
          const T_* gg = ga + 2 * H;
          const T_* go = ga + 3 * H;
          if (cell_norm) {
            const T_ m2 = m2_p[tb], r2 = r2_p[tb];
            T_* awc = awc_p + b * H;
            T_* abc = abc_p + b * H;
            T_ s1 = 0, s2 = 0;
            // Three loops where one would do: written as one `simd reduction` loop that also stored
            // four arrays and called tanh, gcc reported it vectorized, yet the scalar version is what
            // ran (vdivss/vmulss in perf annotate): a third of the backward row pass. As a tanh loop, an
            // elementwise loop and a plain two-sum reduction, all three run vectorized (checked the
            // same way); the LSTM B=32 forward+backward is ~12% faster.
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) tcb[k] = t_tanh<T_>((cr[k] - m2) * r2 * wc_p[k] + bc_p[k]);
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) {
              const T_ chat = (cr[k] - m2) * r2;
              const T_ tc = tcb[k];
              const T_ dhv = dor[k] + dhc[k];
              dov[k] = dhv * tc;
              const T_ dcn = dhv * go[k] * (T_(1) - tc * tc);
              awc[k] += dcn * chat;
              abc[k] += dcn;
              dch[k] = dcn * wc_p[k];
            }
#pragma omp simd reduction(+ : s1, s2)
            for (int64_t k = 0; k < H; ++k) {
              s1 += dch[k];
              s2 += dch[k] * ((cr[k] - m2) * r2);
            }
            const T_ m1 = s1 / T_(H), mm2 = s2 / T_(H);
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) {
              const T_ chat = (cr[k] - m2) * r2;
              dch[k] = r2 * (dch[k] - m1 - chat * mm2) + dcc[k];  // now the full dL/dc_t
            }
          } else {
#pragma omp simd
            for (int64_t k = 0; k < H; ++k) {
              const T_ tc = t_tanh<T_>(cr[k]);
              const T_ dhv = dor[k] + dhc[k];
              dov[k] = dhv * tc;
              dch[k] = dhv * go[k] * (T_(1) - tc * tc) + dcc[k];
            }
          }
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const T_ dcv = dch[k];
            dA[k] = dcv * gg[k] * gi[k] * (T_(1) - gi[k]);
            dA[H + k] = dcv * cp[k] * gf[k] * (T_(1) - gf[k]);
            dA[2 * H + k] = dcv * gi[k] * (T_(1) - gg[k] * gg[k]);
            dA[3 * H + k] = dov[k] * go[k] * (T_(1) - go[k]);
            dcc[k] = dcv * gf[k];
            dhc[k] = T_(0);  // dh_{t-1} of this row: only the GEMM's part
          }
          T_* ag = ag_p + b * H4;
          T_* ab = ab_p + b * H4;
#pragma omp simd
          for (int64_t k = 0; k < H4; ++k) {
            ag[k] += dA[k] * hh[k];
            ab[k] += dA[k];
            dhh[k] = dA[k] * g_p[k];
          }
          ln_backward_row(dhh, hh, H4, r1_p[tb], dhr);
          if (ln_ih) {  // dA is the gradient of LN(xw) g_ih: back through the input LN
            const T_* xr = xw_p + tb * H4;
            const T_ mx = mih_p[tb], rx = rih_p[tb];
            T_* agi = agi_p + b * H4;
#pragma omp simd
            for (int64_t k = 0; k < H4; ++k) {
              const T_ xh = (xr[k] - mx) * rx;
              xih[k] = xh;
              agi[k] += dA[k] * xh;
              dhh[k] = dA[k] * gih_p[k];
            }
            ln_backward_row(dhh, xih, H4, rx, dxr);
          }
        }
      });
      // dh_{t-1} = direct + dhw_t @ W_hh  (direct, already in dh: 0, or the dh of rows past their end)
      auto dhw_t = dhw[t];
      gemm.run(dhw_t, dh, true);
    }
  };
  if (gates.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  // dW_hh = sum_t dhw_t^T h_{t-1}: one GEMM over all steps instead of T rank-B updates
  auto hprev = at::empty({T, B, H}, opts);
  hprev[0].copy_(h0);
  if (T > 1) hprev.narrow(0, 1, T - 1).copy_(out.narrow(0, 0, T - 1));
  auto dw = gemm_new(dhw.view({T * B, H4}).t(), hprev.view({T * B, H}), gemm_lib());
  auto dg = acc_g.sum(0);
  auto dbias = acc_b.sum(0);
  at::Tensor dwc, dbc, dg_ih;
  if (cell_norm) {
    dwc = acc_wc.sum(0);
    dbc = acc_bc.sum(0);
  }
  if (ln_ih) dg_ih = acc_gih.sum(0);
  return {dxw, dh, dc, dw, dg, dbias, dwc, dbc, dg_ih};
}

// ----------------------------------------------------------------------------------------------
// GRU
// ----------------------------------------------------------------------------------------------

// Saved: hw_hat (3H, normalized per block), gates r, u, n after activation (3H), rstd of both blocks,
// and with g_ih (3H; see lstm_forward) the input LN's (mean, rstd) of both blocks, (T, B, 4).
std::vector<at::Tensor> gru_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& lengths,
                                    const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& g_hh,
                                    const c10::optional<at::Tensor>& bias_ih,
                                    const c10::optional<at::Tensor>& bias_hh, double eps, bool save,
                                    const c10::optional<at::Tensor>& g_ih) {
  const int64_t T = xw.size(0), B = xw.size(1), H3 = xw.size(2), H = H3 / 3, H2 = 2 * H;
  auto opts = xw.options();
  auto out = empty_big({T, B, H}, opts);
  auto h = h0.contiguous().clone();
  auto hw = at::empty({B, H3}, opts);
  const bool ln_ih = g_ih.has_value() && g_ih->defined();
  at::Tensor hw_hat, gates, rstd, stats_ih;
  if (save) {
    hw_hat = empty_big({T, B, H3}, opts);
    gates = empty_big({T, B, H3}, opts);
    rstd = at::empty({T, B, 2}, opts);
    if (ln_ih) stats_ih = at::empty({T, B, 4}, opts);
  } else {
    hw_hat = at::empty({1, B, H3}, opts);
    gates = at::empty({1, B, H3}, opts);
  }
  const auto L = lengths_vec(lengths, B, T);
  const StepGemm gemm(w_hh, /*transpose=*/true, B, /*pack=*/true);
  // b_ih and b_hh add up everywhere except b_hh's candidate slice, which sits inside r * (.)
  auto bx = at::zeros({H3}, opts);
  auto bn = at::zeros({H}, opts);
  if (bias_ih.has_value() && bias_ih->defined()) bx.add_(*bias_ih);
  if (bias_hh.has_value() && bias_hh->defined()) {
    bx.narrow(0, 0, H2).add_(bias_hh->narrow(0, 0, H2));
    bn.copy_(bias_hh->narrow(0, H2, H));
  }
  auto g_c = g_hh.contiguous();
  at::Tensor gih_c = ln_ih ? g_ih->contiguous() : at::ones({H3}, opts);  // as lstm_forward

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* gi_p = gih_c.data_ptr<T_>();
    const T_* bx_p = bx.data_ptr<T_>();
    const T_* bn_p = bn.data_ptr<T_>();
    T_* out_p = out.data_ptr<T_>();
    T_* h_p = h.data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor hw_t = gemm.run(h, hw, false);  // (B, 3H) = h W_hh^T
      const T_* hw_p = hw_t.data_ptr<T_>();
      const int64_t ts = save ? t : 0;
      T_* hh_t = hw_hat.data_ptr<T_>() + ts * B * H3;
      T_* ga_t = gates.data_ptr<T_>() + ts * B * H3;
      at::parallel_for(0, B, grain_for(B, H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          T_* o_row = out_p + (t * B + b) * H;
          T_* hh = hh_t + b * H3;
          T_* ga = ga_t + b * H3;
          if (t >= L[b]) {
            std::memset(o_row, 0, H * sizeof(T_));
            if (save) {
              std::memset(hh, 0, H3 * sizeof(T_));
              std::memset(ga, 0, H3 * sizeof(T_));
              rstd.data_ptr<T_>()[(t * B + b) * 2] = 0;
              rstd.data_ptr<T_>()[(t * B + b) * 2 + 1] = 0;
              if (ln_ih) std::memset(stats_ih.data_ptr<T_>() + (t * B + b) * 4, 0, 4 * sizeof(T_));
            }
            continue;
          }
          const T_* hwr = hw_p + b * H3;
          const T_* xr = xw_p + (t * B + b) * H3;
          T_ ma, ra, mb, rb, mxa = 0, rxa = 1, mxb = 0, rxb = 1;
          row_stats(hwr, H2, eps, ma, ra);
          row_stats(hwr + H2, H, eps, mb, rb);
          if (ln_ih) {
            row_stats(xr, H2, eps, mxa, rxa);
            row_stats(xr + H2, H, eps, mxb, rxb);
            if (save) {
              T_* st = stats_ih.data_ptr<T_>() + (t * B + b) * 4;
              st[0] = mxa, st[1] = rxa, st[2] = mxb, st[3] = rxb;
            }
          }
#pragma omp simd
          for (int64_t k = 0; k < H2; ++k) {
            const T_ xh = (hwr[k] - ma) * ra;
            hh[k] = xh;
            ga[k] = t_sigmoid<T_>(xh * g_p[k] + (xr[k] - mxa) * rxa * gi_p[k] + bx_p[k]);
          }
          T_* hr = h_p + b * H;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const T_ xh = (hwr[H2 + k] - mb) * rb;
            hh[H2 + k] = xh;
            const T_ xn = (xr[H2 + k] - mxb) * rxb * gi_p[H2 + k];
            const T_ n = t_tanh<T_>(xn + bx_p[H2 + k] + ga[k] * (xh * g_p[H2 + k] + bn_p[k]));
            ga[H2 + k] = n;
            const T_ u = ga[H + k];
            const T_ v = u * hr[k] + (T_(1) - u) * n;
            hr[k] = v;
            o_row[k] = v;
          }
          if (save) {
            rstd.data_ptr<T_>()[(t * B + b) * 2] = ra;
            rstd.data_ptr<T_>()[(t * B + b) * 2 + 1] = rb;
          }
        }
      });
    }
  };
  if (xw.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  if (!save) return {out, h};
  return {out, h, hw_hat, gates, rstd, stats_ih};
}

// Returns dxw, dh0, dw_hh, dg_hh, dbias_ih, dbias_hh, dg_ih (undefined without g_ih; see lstm_backward).
std::vector<at::Tensor> gru_backward(const at::Tensor& dout_in, const at::Tensor& dhn,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& h0,
                                     const at::Tensor& w_hh, const at::Tensor& g_hh,
                                     const c10::optional<at::Tensor>& bias_hh, const at::Tensor& out,
                                     const at::Tensor& hw_hat, const at::Tensor& gates, const at::Tensor& rstd,
                                     const c10::optional<at::Tensor>& xw, const c10::optional<at::Tensor>& g_ih,
                                     const c10::optional<at::Tensor>& stats_ih) {
  const int64_t T = gates.size(0), B = gates.size(1), H3 = gates.size(2), H = H3 / 3, H2 = 2 * H;
  const bool ln_ih = g_ih.has_value() && g_ih->defined();
  auto opts = gates.options();
  auto dout = dout_in.contiguous();
  auto dxw = empty_big({T, B, H3}, opts);
  auto dhw = empty_big({T, B, H3}, opts);
  auto dh = dhn.contiguous().clone();
  const StepGemm gemm(w_hh, /*transpose=*/false, B, /*pack=*/false);  // dh_{t-1} = direct + dhw_t W_hh, as the LSTM
  auto acc_g = at::zeros({B, H3}, opts);
  auto acc_b = at::zeros({B, H3}, opts);   // d b_ih
  auto acc_bn = at::zeros({B, H}, opts);  // d b_hh[2H:]
  at::Tensor acc_gih, xw_c, gih_c, sih_c;
  if (ln_ih) {
    acc_gih = at::zeros({B, H3}, opts);
    xw_c = xw->contiguous();
    gih_c = g_ih->contiguous();
    sih_c = stats_ih->contiguous();
  }
  const auto L = lengths_vec(lengths, B, T);
  auto g_c = g_hh.contiguous();
  auto bn = at::zeros({H}, opts);
  if (bias_hh.has_value() && bias_hh->defined()) bn.copy_(bias_hh->narrow(0, H2, H));
  auto hprev = at::empty({T, B, H}, opts);
  hprev[0].copy_(h0);
  if (T > 1) hprev.narrow(0, 1, T - 1).copy_(out.narrow(0, 0, T - 1));

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* bn_p = bn.data_ptr<T_>();
    const T_* do_p = dout.data_ptr<T_>();
    const T_* hh_p = hw_hat.data_ptr<T_>();
    const T_* ga_p = gates.data_ptr<T_>();
    const T_* hp_p = hprev.data_ptr<T_>();
    const T_* rs_p = rstd.data_ptr<T_>();
    T_* dxw_p = dxw.data_ptr<T_>();
    T_* dhw_p = dhw.data_ptr<T_>();
    T_* dh_p = dh.data_ptr<T_>();
    T_* ag_p = acc_g.data_ptr<T_>();
    T_* ab_p = acc_b.data_ptr<T_>();
    T_* abn_p = acc_bn.data_ptr<T_>();
    const T_* xw_p = ln_ih ? xw_c.data_ptr<T_>() : nullptr;
    const T_* gih_p = ln_ih ? gih_c.data_ptr<T_>() : nullptr;
    const T_* sih_p = ln_ih ? sih_c.data_ptr<T_>() : nullptr;
    T_* agi_p = ln_ih ? acc_gih.data_ptr<T_>() : nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, grain_for(B, H), [&](int64_t b0, int64_t b1) {
        std::vector<T_> buf(H3 + (ln_ih ? 2 * H3 : 0));
        T_* dhh = buf.data();  // d hw_hat (3H); then d of the input LN's x_hat
        T_* dAb = dhh + H3;    // with g_ih: the gradient of LN(xw) g_ih (3H) ...
        T_* xih = dAb + H3;    // ... and the input LN's x_hat (3H)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t tb = t * B + b;
          T_* dxr = dxw_p + tb * H3;
          T_* dhr = dhw_p + tb * H3;
          T_* dhc = dh_p + b * H;
          if (t >= L[b]) {
            std::memset(dxr, 0, H3 * sizeof(T_));
            std::memset(dhr, 0, H3 * sizeof(T_));
            // dh stays as it is: it is this row's `direct`
            continue;
          }
          T_* dA = ln_ih ? dAb : dxr;  // without the input LN, dA is dxw itself
          const T_* ga = ga_p + tb * H3;
          const T_* hh = hh_p + tb * H3;
          const T_* hp = hp_p + tb * H;
          const T_* dor = do_p + tb * H;
          T_* ag = ag_p + b * H3;
          T_* abn = abn_p + b * H;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const T_ r = ga[k], u = ga[H + k], n = ga[H2 + k];
            const T_ dhv = dor[k] + dhc[k];
            const T_ dnp = dhv * (T_(1) - u) * (T_(1) - n * n);  // d of the candidate's pre-activation
            const T_ hn = hh[H2 + k] * g_p[H2 + k] + bn_p[k];
            const T_ dhn = dnp * r;
            dA[k] = dnp * hn * r * (T_(1) - r);                    // d r pre-activation
            dA[H + k] = dhv * (hp[k] - n) * u * (T_(1) - u);       // d u pre-activation
            dA[H2 + k] = dnp;
            abn[k] += dhn;
            ag[H2 + k] += dhn * hh[H2 + k];
            dhh[H2 + k] = dhn * g_p[H2 + k];
            dhc[k] = dhv * u;  // the part of dh_{t-1} that bypasses the GEMM
          }
#pragma omp simd
          for (int64_t k = 0; k < H2; ++k) {
            ag[k] += dA[k] * hh[k];
            dhh[k] = dA[k] * g_p[k];
          }
          ln_backward_row(dhh, hh, H2, rs_p[tb * 2], dhr);
          ln_backward_row(dhh + H2, hh + H2, H, rs_p[tb * 2 + 1], dhr + H2);
          T_* ab = ab_p + b * H3;
#pragma omp simd
          for (int64_t k = 0; k < H3; ++k) ab[k] += dA[k];
          if (ln_ih) {  // back through the input LN, one block (r,u: 2H; n: H) at a time
            const T_* xr = xw_p + tb * H3;
            const T_* st = sih_p + tb * 4;
            T_* agi = agi_p + b * H3;
            // one loop per block: with the block choice inside the loop (k < 2H ? ...), this loop ran
            // scalar (a fifth of the GRU backward's row pass in perf annotate)
            for (int blk = 0; blk < 2; ++blk) {
              const int64_t k0 = blk == 0 ? 0 : H2, k1 = blk == 0 ? H2 : H3;
              const T_ mean = st[2 * blk], rstd = st[2 * blk + 1];
#pragma omp simd
              for (int64_t k = k0; k < k1; ++k) {
                const T_ xh = (xr[k] - mean) * rstd;
                xih[k] = xh;
                agi[k] += dA[k] * xh;
                dhh[k] = dA[k] * gih_p[k];
              }
            }
            ln_backward_row(dhh, xih, H2, st[1], dxr);
            ln_backward_row(dhh + H2, xih + H2, H, st[3], dxr + H2);
          }
        }
      });
      auto dhw_t = dhw[t];
      gemm.run(dhw_t, dh, true);
    }
  };
  if (gates.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  auto dw = gemm_new(dhw.view({T * B, H3}).t(), hprev.view({T * B, H}), gemm_lib());
  auto dg = acc_g.sum(0);
  auto dbih = acc_b.sum(0);
  auto dbhh = dbih.clone();
  dbhh.narrow(0, H2, H).copy_(acc_bn.sum(0));
  at::Tensor dg_ih = ln_ih ? acc_gih.sum(0) : at::Tensor();
  return {dxw, dh, dw, dg, dbih, dbhh, dg_ih};
}

}  // namespace

namespace layernorm {

void bind_rnn(pybind11::module& m) {
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("linear_forward", &linear_forward);
  m.def("linear_backward", &linear_backward);
  m.def("gemm_library", []() { return gemm_lib() == GemmLib::kOneDnn ? "onednn" : "mkl"; });
}

}  // namespace layernorm
