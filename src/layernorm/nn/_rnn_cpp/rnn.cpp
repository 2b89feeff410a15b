// Fused CPU recurrences of the layer-normalized LSTM and GRU (forward and hand-written backward).
//
// The equations are those of layernorm/nn/rnn_reference.py. Per time step the recurrent GEMM goes to
// ATen (at::mm_out / at::addmm_out, MKL on torch's own OpenMP pool) and everything else -- the layer
// norm of the GEMM result, gate activations, the cell update and the cell layer norm -- is ONE pass
// per batch row over a few kilobytes that stay in L1. The backward runs the time loop in reverse
// with one GEMM per step for dh; dW_hh is one large GEMM after the loop over all steps.
//
// exp/tanh are written out as polynomials (Cephes constants, ~2 ulp) because calls to libm stop gcc
// from vectorizing the row loops and glibc's vector math needs -ffast-math, which we do not want
// (it would also change the NaN and rounding behaviour of the layer-norm statistics). The build
// adds -fno-trapping-math (lets gcc turn the clamps into blends) and -fno-math-errno (inline sqrt);
// without them NO row loop vectorizes (checked with -fopt-info-vec) and the forward is 3x slower.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
// LSTM
// ----------------------------------------------------------------------------------------------

// Saved for backward (per step, per row): hw_hat (4H), gates after activation (4H), c (H),
// rstd of the recurrent LN, mean and rstd of the cell LN. h_{t-1} is read back from `out`.
std::vector<at::Tensor> lstm_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& lengths,
                                     const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                                     const at::Tensor& g_hh, const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& wc, const c10::optional<at::Tensor>& bc,
                                     double eps, bool cell_norm, bool save) {
  const int64_t T = xw.size(0), B = xw.size(1), H4 = xw.size(2), H = H4 / 4;
  auto opts = xw.options();
  auto out = at::empty({T, B, H}, opts);
  auto h = h0.contiguous().clone();
  auto c = c0.contiguous().clone();
  auto hw = at::empty({B, H4}, opts);
  at::Tensor hw_hat, gates, cs, rstd1, mean2, rstd2;
  if (save) {
    hw_hat = at::empty({T, B, H4}, opts);
    gates = at::empty({T, B, H4}, opts);
    cs = at::empty({T, B, H}, opts);
    rstd1 = at::empty({T, B}, opts);
    mean2 = at::empty({T, B}, opts);
    rstd2 = at::empty({T, B}, opts);
  } else {  // inference: only a one-step scratch
    hw_hat = at::empty({1, B, H4}, opts);
    gates = at::empty({1, B, H4}, opts);
  }
  const auto L = lengths_vec(lengths, B, T);
  // one contiguous copy of W_hh^T per call: the per-step GEMV on a transposed view ran ~1.5x slower
  const auto wt = w_hh.t().contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor bias_c = has_bias ? bias->contiguous() : at::zeros({H4}, opts);  // no branch in the row loop
  at::Tensor wc_c = cell_norm ? wc->contiguous() : at::Tensor();
  at::Tensor bc_c = cell_norm ? bc->contiguous() : at::Tensor();
  auto g_c = g_hh.contiguous();

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* b_p = bias_c.data_ptr<T_>();
    const T_* wc_p = cell_norm ? wc_c.data_ptr<T_>() : nullptr;
    const T_* bc_p = cell_norm ? bc_c.data_ptr<T_>() : nullptr;
    T_* out_p = out.data_ptr<T_>();
    T_* h_p = h.data_ptr<T_>();
    T_* c_p = c.data_ptr<T_>();
    const T_* hw_p = hw.data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      at::mm_out(hw, h, wt);  // (B, 4H)
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
            }
            continue;
          }
          const T_* hwr = hw_p + b * H4;
          const T_* xr = xw_p + (t * B + b) * H4;
          T_* hh = hh_t + b * H4;
          T_* ga = ga_t + b * H4;
          T_ m1, r1;
          row_stats(hwr, H4, eps, m1, r1);
#pragma omp simd
          for (int64_t k = 0; k < H4; ++k) {
            const T_ xh = (hwr[k] - m1) * r1;
            hh[k] = xh;
            ga[k] = xh * g_p[k] + xr[k] + b_p[k];
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
  return {out, h, c, hw_hat, gates, cs, rstd1, mean2, rstd2};
}

// Returns dxw, dh0, dc0, dw_hh, dg_hh, dbias, dwc, dbc.
std::vector<at::Tensor> lstm_backward(const at::Tensor& dout_in, const at::Tensor& dhn, const at::Tensor& dcn,
                                      const c10::optional<at::Tensor>& lengths, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& g_hh,
                                      const c10::optional<at::Tensor>& wc, const c10::optional<at::Tensor>& bc,
                                      const at::Tensor& out, const at::Tensor& hw_hat, const at::Tensor& gates,
                                      const at::Tensor& cs, const at::Tensor& rstd1, const at::Tensor& mean2,
                                      const at::Tensor& rstd2, bool cell_norm) {
  const int64_t T = gates.size(0), B = gates.size(1), H4 = gates.size(2), H = H4 / 4;
  auto opts = gates.options();
  auto dout = dout_in.contiguous();
  auto dxw = at::empty({T, B, H4}, opts);
  auto dhw = at::empty({T, B, H4}, opts);
  auto dh = dhn.contiguous().clone();  // carried dL/dh_t
  auto dc = dcn.contiguous().clone();  // carried dL/dc_t
  auto direct = at::empty({B, H}, opts);  // the part of dh_{t-1} that bypasses the GEMM
  auto acc_g = at::zeros({B, H4}, opts);  // per-row partial sums: deterministic for any split
  auto acc_wc = at::zeros({B, H}, opts);
  auto acc_bc = at::zeros({B, H}, opts);
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
    T_* dir_p = direct.data_ptr<T_>();
    T_* ag_p = acc_g.data_ptr<T_>();
    T_* awc_p = acc_wc.data_ptr<T_>();
    T_* abc_p = acc_bc.data_ptr<T_>();
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, grain_for(B, H), [&](int64_t b0, int64_t b1) {
        std::vector<T_> buf(H4 + 2 * H);
        T_* dA = nullptr;
        T_* dch = buf.data();      // d c_hat (H)
        T_* dov = dch + H;         // d o after activation (H)
        T_* dhh = dov + H;         // d hw_hat (4H)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t tb = t * B + b;
          T_* dxr = dxw_p + tb * H4;
          T_* dhr = dhw_p + tb * H4;
          T_* dhc = dh_p + b * H;
          T_* dcc = dc_p + b * H;
          T_* dir = dir_p + b * H;
          if (t >= L[b]) {  // padding step: gradients pass through the frozen state untouched
            std::memset(dxr, 0, H4 * sizeof(T_));
            std::memset(dhr, 0, H4 * sizeof(T_));
            std::memcpy(dir, dhc, H * sizeof(T_));
            continue;
          }
          dA = dxr;
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
#pragma omp simd reduction(+ : s1, s2)
            for (int64_t k = 0; k < H; ++k) {
              const T_ chat = (cr[k] - m2) * r2;
              const T_ tc = t_tanh<T_>(chat * wc_p[k] + bc_p[k]);
              const T_ dhv = dor[k] + dhc[k];
              dov[k] = dhv * tc;
              const T_ dcn = dhv * go[k] * (T_(1) - tc * tc);
              awc[k] += dcn * chat;
              abc[k] += dcn;
              const T_ d = dcn * wc_p[k];
              dch[k] = d;
              s1 += d;
              s2 += d * chat;
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
            dir[k] = T_(0);
          }
          T_* ag = ag_p + b * H4;
#pragma omp simd
          for (int64_t k = 0; k < H4; ++k) {
            ag[k] += dA[k] * hh[k];
            dhh[k] = dA[k] * g_p[k];
          }
          ln_backward_row(dhh, hh, H4, r1_p[tb], dhr);
        }
      });
      // dh_{t-1} = dhw_t @ W_hh + direct  (direct: the carried dh of rows already past their end)
      at::addmm_out(dh, direct, dhw[t], w_hh);
    }
  };
  if (gates.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  // dW_hh = sum_t dhw_t^T h_{t-1}: one GEMM over all steps instead of T rank-B updates
  auto hprev = at::empty({T, B, H}, opts);
  hprev[0].copy_(h0);
  if (T > 1) hprev.narrow(0, 1, T - 1).copy_(out.narrow(0, 0, T - 1));
  auto dw = at::mm(dhw.view({T * B, H4}).t(), hprev.view({T * B, H}));
  auto dg = acc_g.sum(0);
  auto dbias = dxw.view({T * B, H4}).sum(0);
  at::Tensor dwc, dbc;
  if (cell_norm) {
    dwc = acc_wc.sum(0);
    dbc = acc_bc.sum(0);
  }
  return {dxw, dh, dc, dw, dg, dbias, dwc, dbc};
}

// ----------------------------------------------------------------------------------------------
// GRU
// ----------------------------------------------------------------------------------------------

// Saved: hw_hat (3H, normalized per block), gates r, u, n after activation (3H), rstd of both blocks.
std::vector<at::Tensor> gru_forward(const at::Tensor& xw, const c10::optional<at::Tensor>& lengths,
                                    const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& g_hh,
                                    const c10::optional<at::Tensor>& bias_ih,
                                    const c10::optional<at::Tensor>& bias_hh, double eps, bool save) {
  const int64_t T = xw.size(0), B = xw.size(1), H3 = xw.size(2), H = H3 / 3, H2 = 2 * H;
  auto opts = xw.options();
  auto out = at::empty({T, B, H}, opts);
  auto h = h0.contiguous().clone();
  auto hw = at::empty({B, H3}, opts);
  at::Tensor hw_hat, gates, rstd;
  if (save) {
    hw_hat = at::empty({T, B, H3}, opts);
    gates = at::empty({T, B, H3}, opts);
    rstd = at::empty({T, B, 2}, opts);
  } else {
    hw_hat = at::empty({1, B, H3}, opts);
    gates = at::empty({1, B, H3}, opts);
  }
  const auto L = lengths_vec(lengths, B, T);
  // one contiguous copy of W_hh^T per call: the per-step GEMV on a transposed view ran ~1.5x slower
  const auto wt = w_hh.t().contiguous();
  // b_ih and b_hh add up everywhere except b_hh's candidate slice, which sits inside r * (.)
  auto bx = at::zeros({H3}, opts);
  auto bn = at::zeros({H}, opts);
  if (bias_ih.has_value() && bias_ih->defined()) bx.add_(*bias_ih);
  if (bias_hh.has_value() && bias_hh->defined()) {
    bx.narrow(0, 0, H2).add_(bias_hh->narrow(0, 0, H2));
    bn.copy_(bias_hh->narrow(0, H2, H));
  }
  auto g_c = g_hh.contiguous();

  auto body = [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xw_p = xw.data_ptr<T_>();
    const T_* g_p = g_c.data_ptr<T_>();
    const T_* bx_p = bx.data_ptr<T_>();
    const T_* bn_p = bn.data_ptr<T_>();
    T_* out_p = out.data_ptr<T_>();
    T_* h_p = h.data_ptr<T_>();
    const T_* hw_p = hw.data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      at::mm_out(hw, h, wt);  // (B, 3H)
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
            }
            continue;
          }
          const T_* hwr = hw_p + b * H3;
          const T_* xr = xw_p + (t * B + b) * H3;
          T_ ma, ra, mb, rb;
          row_stats(hwr, H2, eps, ma, ra);
          row_stats(hwr + H2, H, eps, mb, rb);
#pragma omp simd
          for (int64_t k = 0; k < H2; ++k) {
            const T_ xh = (hwr[k] - ma) * ra;
            hh[k] = xh;
            ga[k] = t_sigmoid<T_>(xh * g_p[k] + xr[k] + bx_p[k]);
          }
          T_* hr = h_p + b * H;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            const T_ xh = (hwr[H2 + k] - mb) * rb;
            hh[H2 + k] = xh;
            const T_ n = t_tanh<T_>(xr[H2 + k] + bx_p[H2 + k] + ga[k] * (xh * g_p[H2 + k] + bn_p[k]));
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
  return {out, h, hw_hat, gates, rstd};
}

// Returns dxw, dh0, dw_hh, dg_hh, dbias_ih, dbias_hh.
std::vector<at::Tensor> gru_backward(const at::Tensor& dout_in, const at::Tensor& dhn,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& h0,
                                     const at::Tensor& w_hh, const at::Tensor& g_hh,
                                     const c10::optional<at::Tensor>& bias_hh, const at::Tensor& out,
                                     const at::Tensor& hw_hat, const at::Tensor& gates, const at::Tensor& rstd) {
  const int64_t T = gates.size(0), B = gates.size(1), H3 = gates.size(2), H = H3 / 3, H2 = 2 * H;
  auto opts = gates.options();
  auto dout = dout_in.contiguous();
  auto dxw = at::empty({T, B, H3}, opts);
  auto dhw = at::empty({T, B, H3}, opts);
  auto dh = dhn.contiguous().clone();
  auto direct = at::empty({B, H}, opts);
  auto acc_g = at::zeros({B, H3}, opts);
  auto acc_bn = at::zeros({B, H}, opts);  // d b_hh[2H:]
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
    T_* dir_p = direct.data_ptr<T_>();
    T_* ag_p = acc_g.data_ptr<T_>();
    T_* abn_p = acc_bn.data_ptr<T_>();
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, grain_for(B, H), [&](int64_t b0, int64_t b1) {
        std::vector<T_> buf(H3);
        T_* dhh = buf.data();
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t tb = t * B + b;
          T_* dxr = dxw_p + tb * H3;
          T_* dhr = dhw_p + tb * H3;
          T_* dhc = dh_p + b * H;
          T_* dir = dir_p + b * H;
          if (t >= L[b]) {
            std::memset(dxr, 0, H3 * sizeof(T_));
            std::memset(dhr, 0, H3 * sizeof(T_));
            std::memcpy(dir, dhc, H * sizeof(T_));
            continue;
          }
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
            dxr[k] = dnp * hn * r * (T_(1) - r);                   // d r pre-activation
            dxr[H + k] = dhv * (hp[k] - n) * u * (T_(1) - u);      // d u pre-activation
            dxr[H2 + k] = dnp;
            abn[k] += dhn;
            ag[H2 + k] += dhn * hh[H2 + k];
            dhh[H2 + k] = dhn * g_p[H2 + k];
            dir[k] = dhv * u;
          }
#pragma omp simd
          for (int64_t k = 0; k < H2; ++k) {
            ag[k] += dxr[k] * hh[k];
            dhh[k] = dxr[k] * g_p[k];
          }
          ln_backward_row(dhh, hh, H2, rs_p[tb * 2], dhr);
          ln_backward_row(dhh + H2, hh + H2, H, rs_p[tb * 2 + 1], dhr + H2);
        }
      });
      at::addmm_out(dh, direct, dhw[t], w_hh);
    }
  };
  if (gates.scalar_type() == at::kDouble) body(double(0)); else body(float(0));
  auto dw = at::mm(dhw.view({T * B, H3}).t(), hprev.view({T * B, H}));
  auto dg = acc_g.sum(0);
  auto dbih = dxw.view({T * B, H3}).sum(0);
  auto dbhh = dbih.clone();
  dbhh.narrow(0, H2, H).copy_(acc_bn.sum(0));
  return {dxw, dh, dw, dg, dbih, dbhh};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
}
