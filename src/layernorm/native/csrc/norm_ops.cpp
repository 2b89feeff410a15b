// The operators of layernorm, registered with the dispatcher, and their Python entry points.
//
//   layernorm::layer_norm, rms_norm, add_layer_norm, add_rms_norm   the public ops: torch's
//       signatures (+ residual, + Hugging Face's offset and rounding for RMSNorm). Autograd kernel:
//       NormBackward below; below autograd (inference mode): the same forward without a graph.
//   layernorm::norm_forward, norm_backward   the two kernels every public op runs on. CPU: the C++
//       kernels (norm_kernels.cpp); Meta: shapes only, so fake tensors, torch.compile and
//       torch.export trace through; CUDA: the Triton kernels, registered from Python
//       (layernorm/ops.py), since Triton is a Python library.
//
// The Python entry points (layernorm._C-style functions added to the extension module) parse their
// arguments with torch's own PythonArgParser: the same accepted types, error messages and
// __torch_function__ handling as torch.nn.functional, at the cost of a torch builtin call.
#include "norm_kernels.h"
#include "output_cache.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/utils/wrap_outputs.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/utils/python_arg_parser.h>
#include <torch/library.h>

#include <cfloat>
#include <sstream>
#include <vector>

namespace layernorm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using SymShape = std::vector<c10::SymInt>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---- argument checks: torch's rules and torch's messages --------------------------------------------

void check_args(const Tensor& input, const OptTensor& residual, c10::SymIntArrayRef normalized_shape,
                const OptTensor& weight, const OptTensor& bias, bool rms) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one ",
              "element, but got normalized_shape = ", normalized_shape);
  TORCH_CHECK(!present(weight) || weight->sym_sizes().equals(normalized_shape),
              "Expected weight to be of same shape as normalized_shape, but got weight of shape ",
              weight->sym_sizes(), " and normalized_shape = ", normalized_shape);
  TORCH_CHECK(!present(bias) || bias->sym_sizes().equals(normalized_shape),
              "Expected bias to be of same shape as normalized_shape, but got bias of shape ", bias->sym_sizes(),
              " and normalized_shape = ", normalized_shape);
  const int64_t ndim = input.dim();
  bool matches = ndim >= k;
  for (int64_t i = 0; matches && i < k; ++i) {
    matches = input.sym_size(ndim - k + i) == normalized_shape[i];
  }
  if (!matches) {
    // torch's two messages, character for character: layer_norm writes "[*, 5]", rms_norm "[*5]".
    std::ostringstream expected;
    for (size_t i = 0; i < normalized_shape.size(); ++i) {
      expected << (i > 0 || !rms ? ", " : "") << normalized_shape[i];
    }
    TORCH_CHECK(false, "Given normalized_shape=", normalized_shape, ", expected input with shape [*",
                expected.str(), "], but got input of size", input.sym_sizes());
  }
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(dtype), rms ? "\"rms_norm\"" : "\"LayerNormKernelImpl\"",
                              " not implemented for '", c10::toString(dtype), "'");
  if (present(residual)) {
    TORCH_CHECK(residual->sym_sizes().equals(input.sym_sizes()) && residual->scalar_type() == dtype,
                "Expected residual of the input's shape ", input.sym_sizes(), " and dtype ", dtype,
                ", but got residual of shape ", residual->sym_sizes(), " and dtype ", residual->scalar_type());
  }
  const char* names[] = {"residual", "weight", "bias"};
  const OptTensor* params[] = {&residual, &weight, &bias};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(!present(*params[i]) || (*params[i])->device() == input.device(), "Tensor on device ",
                (*params[i])->device(), " is not on the expected device ", input.device(), "! (argument ", names[i],
                ")");
  }
  if (rms) {
    TORCH_CHECK(!present(weight) || at::isFloatingType(weight->scalar_type()),
                "Expected weight to have a floating-point dtype, but got weight of dtype ", weight->scalar_type());
    return;
  }
  // LayerNorm: parameters of the input's dtype, or all float32 with bfloat16/float16 input.
  const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool all_same = (!present(weight) || weight->scalar_type() == dtype) &&
                        (!present(bias) || bias->scalar_type() == dtype);
  const bool all_float = (!present(weight) || weight->scalar_type() == at::kFloat) &&
                         (!present(bias) || bias->scalar_type() == at::kFloat);
  TORCH_CHECK(all_same || (low && all_float), "mixed dtype (CPU): expect parameter to have scalar type of Float");
}

double default_rms_eps(const Tensor& input) {
  // torch 2.13: the machine epsilon of the type the op computes in (float32 for bf16/fp16 input).
  return input.scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON;
}

// ---- the two kernel ops, called through the dispatcher ------------------------------------------------

using ForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, c10::SymIntArrayRef,
                                                             const OptTensor&, const OptTensor&, double, bool,
                                                             double, bool);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, c10::SymIntArrayRef,
                                                      const OptTensor&, const OptTensor&, bool, double, bool,
                                                      std::array<bool, 3>);

std::tuple<Tensor, Tensor, Tensor, Tensor> call_forward(const Tensor& input, const OptTensor& residual,
                                                        c10::SymIntArrayRef shape, const OptTensor& weight,
                                                        const OptTensor& bias, double eps, bool rms, double offset,
                                                        bool round_normalized) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("layernorm::norm_forward", "").typed<ForwardFn>();
  return op.call(input, residual, shape, weight, bias, eps, rms, offset, round_normalized);
}

std::tuple<Tensor, Tensor, Tensor> call_backward(const Tensor& grad_out, const OptTensor& grad_sum,
                                                 const Tensor& input, const Tensor& mean, const Tensor& rstd,
                                                 c10::SymIntArrayRef shape, const OptTensor& weight,
                                                 const OptTensor& bias, bool rms, double offset,
                                                 bool round_normalized, std::array<bool, 3> mask) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("layernorm::norm_backward", "").typed<BackwardFn>();
  return op.call(grad_out, grad_sum, input, mean, rstd, shape, weight, bias, rms, offset, round_normalized, mask);
}

int64_t concrete_cols(c10::SymIntArrayRef shape) {
  int64_t n = 1;
  for (const auto& s : shape) n *= s.expect_int();
  return n;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward_cpu_op(const Tensor& input, const OptTensor& residual,
                                                               c10::SymIntArrayRef shape, const OptTensor& weight,
                                                               const OptTensor& bias, double eps, bool rms,
                                                               double offset, bool round_normalized) {
  check_args(input, residual, shape, weight, bias, rms);
  return norm_forward_cpu(input, residual, concrete_cols(shape), weight, bias, eps, rms, offset, round_normalized);
}

std::tuple<Tensor, Tensor, Tensor> norm_backward_cpu_op(const Tensor& grad_out, const OptTensor& grad_sum,
                                                        const Tensor& input, const Tensor& mean, const Tensor& rstd,
                                                        c10::SymIntArrayRef shape, const OptTensor& weight,
                                                        const OptTensor& bias, bool rms, double offset,
                                                        bool round_normalized, std::array<bool, 3> mask) {
  TORCH_CHECK(grad_out.sizes().equals(input.sizes()), "norm_backward: grad_out of shape ", grad_out.sizes(),
              " does not match input of shape ", input.sizes());
  TORCH_CHECK(!present(grad_sum) || grad_sum->sizes().equals(input.sizes()), "norm_backward: grad_sum of shape ",
              grad_sum->sizes(), " does not match input of shape ", input.sizes());
  return norm_backward_cpu(grad_out, grad_sum, input, mean, rstd, weight, bias, concrete_cols(shape), rms, offset,
                           round_normalized, mask);
}

c10::SymInt leading_rows(const Tensor& input, size_t k) {
  c10::SymInt m = 1;
  for (int64_t d = 0; d < input.dim() - static_cast<int64_t>(k); ++d) m = m * input.sym_size(d);
  return m;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward_meta(const Tensor& input, const OptTensor& residual,
                                                             c10::SymIntArrayRef shape, const OptTensor& weight,
                                                             const OptTensor& bias, double eps, bool rms,
                                                             double offset, bool round_normalized) {
  check_args(input, residual, shape, weight, bias, rms);
  const auto acc = input.options().dtype(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const c10::SymInt m = leading_rows(input, shape.size());
  Tensor y = at::empty_symint(input.sym_sizes(), input.options());
  Tensor z = present(residual) ? at::empty_symint(input.sym_sizes(), input.options())
                               : at::empty({0}, input.options());
  Tensor mean = rms ? at::empty({0}, acc) : at::empty_symint({m}, acc);
  Tensor rstd = at::empty_symint({m}, acc);
  return {y, z, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_backward_meta(const Tensor& grad_out, const OptTensor& grad_sum,
                                                      const Tensor& input, const Tensor& mean, const Tensor& rstd,
                                                      c10::SymIntArrayRef shape, const OptTensor& weight,
                                                      const OptTensor& bias, bool rms, double offset,
                                                      bool round_normalized, std::array<bool, 3> mask) {
  const auto empty = [&]() { return at::empty({0}, input.options()); };
  Tensor dx = mask[0] ? at::empty_symint(input.sym_sizes(), input.options()) : empty();
  Tensor dw = mask[1] && present(weight) ? at::empty_symint(weight->sym_sizes(), weight->options()) : empty();
  Tensor db = mask[2] && present(bias) ? at::empty_symint(bias->sym_sizes(), bias->options()) : empty();
  return {dx, dw, db};
}

// ---- autograd ---------------------------------------------------------------------------------------

std::vector<int64_t> normalized_dims(int64_t k) {
  std::vector<int64_t> dims;
  for (int64_t d = -k; d < 0; ++d) dims.push_back(d);
  return dims;
}

// The backward as differentiable ATen ops (create_graph=True, e.g. double backward): the formulas of
// reference.backward, with mean and rstd recomputed from the input so they are differentiable too.
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& dy, const Tensor& dz, const Tensor& h,
                                                           const Tensor& weight, int64_t k, double eps, bool rms,
                                                           double offset, bool round_normalized, bool want_w,
                                                           bool want_b, at::ScalarType bias_dtype) {
  const at::ScalarType acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto dims = normalized_dims(k);
  Tensor hf = h.to(acc);
  Tensor centered = rms ? hf : hf - hf.mean(dims, /*keepdim=*/true);
  Tensor rstd = at::rsqrt(centered.square().mean(dims, /*keepdim=*/true) + eps);
  Tensor xhat = centered * rstd;
  Tensor g = dy.to(acc);
  Tensor dxhat = weight.defined() ? g * (weight.to(acc) + offset) : g;
  Tensor dh = dxhat - xhat * (dxhat * xhat).mean(dims, /*keepdim=*/true);
  if (!rms) dh = dh - dxhat.mean(dims, /*keepdim=*/true);
  dh = dh * rstd;
  if (dz.defined()) dh = dh + dz.to(acc);
  std::vector<int64_t> leading;
  for (int64_t d = 0; d < h.dim() - k; ++d) leading.push_back(d);
  auto sum_rows = [&](const Tensor& t) { return leading.empty() ? t : t.sum(leading); };
  Tensor dw, db;
  if (want_w) {
    Tensor xr = round_normalized ? xhat.to(h.scalar_type()).to(acc) : xhat;
    dw = sum_rows(g * xr).to(weight.scalar_type());
  }
  if (want_b) db = sum_rows(g).to(bias_dtype);
  return {dh.to(h.scalar_type()), dw, db};
}

// The backward node every public op records when a gradient can flow: a torch::autograd::Node with
// its state in plain fields, as torch's own generated nodes keep theirs (a custom Function's
// dictionary of saved values costs several microseconds per call, most of a 1x768 LayerNorm).
// Edges: input, residual, weight, bias (invalid edges for the absent ones).
struct NormBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable normalized, mean, rstd, weight, bias;
  SymShape shape;
  double eps = 0.0, offset = 0.0;
  bool rms = false, round_normalized = false;

  std::string name() const override { return "layernorm::NormBackward"; }

  void release_variables() override {
    normalized.reset_data();
    mean.reset_data();
    rstd.reset_data();
    weight.reset_data();
    bias.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const bool want_x = task_should_compute_output(0) || task_should_compute_output(1);
    const bool want_w = task_should_compute_output(2), want_b = task_should_compute_output(3);
    const Tensor h = normalized.unpack(getptr());
    const Tensor w = weight.unpack(), b = bias.unpack();
    const Tensor& dy = grads[0];
    const Tensor dz = grads.size() > 1 ? grads[1] : Tensor();
    Tensor dx, dw, db;
    if (!dy.defined()) {  // only the sum (input + residual) reached the loss
      dx = dz;
    } else if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      std::tie(dx, dw, db) =
          differentiable_backward(dy, dz, h, w, static_cast<int64_t>(shape.size()), eps, rms, offset,
                                  round_normalized, want_w, want_b, b.defined() ? b.scalar_type() : h.scalar_type());
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dw, db) = call_backward(dy, dz.defined() ? OptTensor(dz) : OptTensor(), h, mean.unpack(),
                                           rstd.unpack(), shape, w.defined() ? OptTensor(w) : OptTensor(),
                                           b.defined() ? OptTensor(b) : OptTensor(), rms, offset, round_normalized,
                                           {want_x, want_w, want_b});
    }
    return {want_x ? dx : Tensor(), want_x ? dx : Tensor(), want_w ? dw : Tensor(), want_b ? db : Tensor()};
  }
};

// y (and z) of a public op, recording NormBackward when a gradient can flow.
torch::autograd::variable_list apply_norm(const Tensor& input, const OptTensor& residual, c10::SymIntArrayRef shape,
                                          const OptTensor& weight, const OptTensor& bias, double eps, bool rms,
                                          double offset, bool round_normalized) {
  check_args(input, residual, shape, weight, bias, rms);
  c10::intrusive_ptr<NormBackward> node;
  if (torch::autograd::compute_requires_grad(input, residual, weight, bias)) {
    node = c10::make_intrusive<NormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, residual, weight, bias));
  }
  Tensor y, z, mean, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, z, mean, rstd) = call_forward(input, residual, shape, weight, bias, eps, rms, offset, round_normalized);
  }
  const bool has_residual = present(residual);
  if (node) {
    torch::autograd::set_history(y, node);
    if (has_residual) torch::autograd::set_history(z, node);
    node->normalized = torch::autograd::SavedVariable(has_residual ? z : input, /*is_output=*/has_residual);
    node->mean = torch::autograd::SavedVariable(mean, false);
    node->rstd = torch::autograd::SavedVariable(rstd, false);
    node->weight = torch::autograd::SavedVariable(weight, false);
    node->bias = torch::autograd::SavedVariable(bias, false);
    node->shape = shape.vec();
    node->eps = eps;
    node->offset = offset;
    node->rms = rms;
    node->round_normalized = round_normalized;
  }
  if (has_residual) return {y, z};
  return {y};
}

// ---- the public ops ----------------------------------------------------------------------------------
//
// Below autograd: on CPU a direct kernel that skips the statistics (inference); elsewhere (Meta,
// CUDA) the output of norm_forward. The autograd kernel records NormBackward only when a gradient can
// flow, else it goes straight below autograd: eager inference pays no autograd bookkeeping.

Tensor layer_norm_composite(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                            const OptTensor& bias, double eps) {
  check_args(input, std::nullopt, shape, weight, bias, false);
  return std::get<0>(call_forward(input, std::nullopt, shape, weight, bias, eps, false, 0.0, false));
}

Tensor rms_norm_composite(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                          std::optional<double> eps, double offset, bool round_normalized) {
  check_args(input, std::nullopt, shape, weight, std::nullopt, true);
  return std::get<0>(call_forward(input, std::nullopt, shape, weight, std::nullopt,
                                  eps.value_or(default_rms_eps(input)), true, offset, round_normalized));
}

std::tuple<Tensor, Tensor> add_layer_norm_composite(const Tensor& input, const Tensor& residual,
                                                    c10::SymIntArrayRef shape, const OptTensor& weight,
                                                    const OptTensor& bias, double eps) {
  check_args(input, residual, shape, weight, bias, false);
  auto out = call_forward(input, residual, shape, weight, bias, eps, false, 0.0, false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<Tensor, Tensor> add_rms_norm_composite(const Tensor& input, const Tensor& residual,
                                                  c10::SymIntArrayRef shape, const OptTensor& weight,
                                                  std::optional<double> eps, double offset, bool round_normalized) {
  check_args(input, residual, shape, weight, std::nullopt, true);
  auto out = call_forward(input, residual, shape, weight, std::nullopt, eps.value_or(default_rms_eps(input)), true,
                          offset, round_normalized);
  return {std::get<0>(out), std::get<1>(out)};
}

Tensor layer_norm_cpu(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight, const OptTensor& bias,
                      double eps) {
  check_args(input, std::nullopt, shape, weight, bias, false);
  return std::get<0>(norm_forward_cpu(input, std::nullopt, concrete_cols(shape), weight, bias, eps, false, 0.0,
                                      false, /*want_stats=*/false));
}

Tensor rms_norm_cpu(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                    std::optional<double> eps, double offset, bool round_normalized) {
  check_args(input, std::nullopt, shape, weight, std::nullopt, true);
  return std::get<0>(norm_forward_cpu(input, std::nullopt, concrete_cols(shape), weight, std::nullopt,
                                      eps.value_or(default_rms_eps(input)), true, offset, round_normalized,
                                      /*want_stats=*/false));
}

std::tuple<Tensor, Tensor> add_layer_norm_cpu(const Tensor& input, const Tensor& residual, c10::SymIntArrayRef shape,
                                              const OptTensor& weight, const OptTensor& bias, double eps) {
  check_args(input, residual, shape, weight, bias, false);
  auto out = norm_forward_cpu(input, residual, concrete_cols(shape), weight, bias, eps, false, 0.0, false,
                              /*want_stats=*/false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<Tensor, Tensor> add_rms_norm_cpu(const Tensor& input, const Tensor& residual, c10::SymIntArrayRef shape,
                                            const OptTensor& weight, std::optional<double> eps, double offset,
                                            bool round_normalized) {
  check_args(input, residual, shape, weight, std::nullopt, true);
  auto out = norm_forward_cpu(input, residual, concrete_cols(shape), weight, std::nullopt,
                              eps.value_or(default_rms_eps(input)), true, offset, round_normalized,
                              /*want_stats=*/false);
  return {std::get<0>(out), std::get<1>(out)};
}

const auto& layer_norm_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("layernorm::layer_norm", "")
                       .typed<decltype(layer_norm_composite)>();
  return op;
}
const auto& rms_norm_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("layernorm::rms_norm", "")
                       .typed<decltype(rms_norm_composite)>();
  return op;
}
const auto& add_layer_norm_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("layernorm::add_layer_norm", "")
                       .typed<decltype(add_layer_norm_composite)>();
  return op;
}
const auto& add_rms_norm_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("layernorm::add_rms_norm", "")
                       .typed<decltype(add_rms_norm_composite)>();
  return op;
}

bool grad_can_flow(const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias) {
  if (!at::GradMode::is_enabled()) return false;
  for (const OptTensor* p : {&residual, &weight, &bias}) {
    if (present(*p) && (*p)->requires_grad()) return true;
  }
  return input.requires_grad();
}

Tensor layer_norm_autograd(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  if (!grad_can_flow(input, std::nullopt, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_norm_op().call(input, shape, weight, bias, eps);
  }
  return apply_norm(input, std::nullopt, shape, weight, bias, eps, false, 0.0, false)[0];
}

Tensor rms_norm_autograd(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                         std::optional<double> eps, double offset, bool round_normalized) {
  if (!grad_can_flow(input, std::nullopt, weight, std::nullopt)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return rms_norm_op().call(input, shape, weight, eps, offset, round_normalized);
  }
  return apply_norm(input, std::nullopt, shape, weight, std::nullopt, eps.value_or(default_rms_eps(input)), true,
                    offset, round_normalized)[0];
}

std::tuple<Tensor, Tensor> add_layer_norm_autograd(const Tensor& input, const Tensor& residual,
                                                   c10::SymIntArrayRef shape, const OptTensor& weight,
                                                   const OptTensor& bias, double eps) {
  if (!grad_can_flow(input, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return add_layer_norm_op().call(input, residual, shape, weight, bias, eps);
  }
  auto out = apply_norm(input, residual, shape, weight, bias, eps, false, 0.0, false);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> add_rms_norm_autograd(const Tensor& input, const Tensor& residual,
                                                 c10::SymIntArrayRef shape, const OptTensor& weight,
                                                 std::optional<double> eps, double offset, bool round_normalized) {
  if (!grad_can_flow(input, residual, weight, std::nullopt)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return add_rms_norm_op().call(input, residual, shape, weight, eps, offset, round_normalized);
  }
  auto out = apply_norm(input, residual, shape, weight, std::nullopt, eps.value_or(default_rms_eps(input)), true,
                        offset, round_normalized);
  return {out[0], out[1]};
}

// ---- autocast ------------------------------------------------------------------------------------------
//
// torch's CUDA autocast runs layer_norm and rms_norm in float32 (AT_FORALL_FP32 in ATen/autocast_mode.h):
// float32 outputs for half inputs. Our ops follow the same policy on CUDA. CPU autocast leaves torch's
// norms in the input's dtype, and ours too (no CPU registration).

template <typename T>
T to_float32(const T& arg) {
  return at::autocast::cached_cast(at::kFloat, arg, c10::DeviceType::CUDA);
}

Tensor layer_norm_autocast(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                           const OptTensor& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return layer_norm_op().call(to_float32(input), shape, to_float32(weight), to_float32(bias), eps);
}

Tensor rms_norm_autocast(const Tensor& input, c10::SymIntArrayRef shape, const OptTensor& weight,
                         std::optional<double> eps, double offset, bool round_normalized) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return rms_norm_op().call(to_float32(input), shape, to_float32(weight), eps, offset, round_normalized);
}

std::tuple<Tensor, Tensor> add_layer_norm_autocast(const Tensor& input, const Tensor& residual,
                                                   c10::SymIntArrayRef shape, const OptTensor& weight,
                                                   const OptTensor& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return add_layer_norm_op().call(to_float32(input), to_float32(residual), shape, to_float32(weight),
                                  to_float32(bias), eps);
}

std::tuple<Tensor, Tensor> add_rms_norm_autocast(const Tensor& input, const Tensor& residual,
                                                 c10::SymIntArrayRef shape, const OptTensor& weight,
                                                 std::optional<double> eps, double offset, bool round_normalized) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  return add_rms_norm_op().call(to_float32(input), to_float32(residual), shape, to_float32(weight), eps, offset,
                                round_normalized);
}

}  // namespace

// ---- registration -----------------------------------------------------------------------------------

TORCH_LIBRARY(layernorm, m) {
  m.def("layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
        "float eps=1e-05) -> Tensor");
  m.def("rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None, "
        "float offset=0., bool round_normalized=False) -> Tensor");
  m.def("add_layer_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight=None, "
        "Tensor? bias=None, float eps=1e-05) -> (Tensor, Tensor)");
  m.def("add_rms_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight=None, "
        "float? eps=None, float offset=0., bool round_normalized=False) -> (Tensor, Tensor)");
  m.def("norm_forward(Tensor input, Tensor? residual, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
        "float eps, bool rms, float offset, bool round_normalized) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_backward(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor mean, Tensor rstd, "
        "SymInt[] normalized_shape, Tensor? weight, Tensor? bias, bool rms, float offset, bool round_normalized, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(layernorm, Autograd, m) {
  m.impl("layer_norm", layer_norm_autograd);
  m.impl("rms_norm", rms_norm_autograd);
  m.impl("add_layer_norm", add_layer_norm_autograd);
  m.impl("add_rms_norm", add_rms_norm_autograd);
}

TORCH_LIBRARY_IMPL(layernorm, CompositeExplicitAutograd, m) {
  m.impl("layer_norm", layer_norm_composite);
  m.impl("rms_norm", rms_norm_composite);
  m.impl("add_layer_norm", add_layer_norm_composite);
  m.impl("add_rms_norm", add_rms_norm_composite);
}

TORCH_LIBRARY_IMPL(layernorm, CPU, m) {
  m.impl("layer_norm", layer_norm_cpu);
  m.impl("rms_norm", rms_norm_cpu);
  m.impl("add_layer_norm", add_layer_norm_cpu);
  m.impl("add_rms_norm", add_rms_norm_cpu);
  m.impl("norm_forward", norm_forward_cpu_op);
  m.impl("norm_backward", norm_backward_cpu_op);
}

TORCH_LIBRARY_IMPL(layernorm, AutocastCUDA, m) {
  m.impl("layer_norm", layer_norm_autocast);
  m.impl("rms_norm", rms_norm_autocast);
  m.impl("add_layer_norm", add_layer_norm_autocast);
  m.impl("add_rms_norm", add_rms_norm_autocast);
  m.impl("norm_forward", torch::CppFunction::makeFallthrough());
  m.impl("norm_backward", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(layernorm, Meta, m) {
  m.impl("norm_forward", norm_forward_meta);
  m.impl("norm_backward", norm_backward_meta);
}

// ---- Python entry points ----------------------------------------------------------------------------

namespace {

// The Python object whose attributes are the functions __torch_function__ overrides receive
// (layernorm.functional); set once by layernorm.functional at import.
PyObject* torch_function_api = nullptr;

template <typename Fn>
PyObject* run_without_gil(Fn&& fn) {
  decltype(fn()) out;
  {
    pybind11::gil_scoped_release no_gil;
    out = fn();
  }
  return torch::autograd::utils::wrap(std::move(out));
}

PyObject* handle_override(torch::PythonArgs& r, const char* name, PyObject* args, PyObject* kwargs) {
  TORCH_CHECK(torch_function_api != nullptr, "layernorm: __torch_function__ API module not set");
  auto api = pybind11::reinterpret_borrow<pybind11::object>(torch_function_api).attr(name);
  return torch::handle_torch_function_no_python_arg_parser(r.overloaded_args, args, kwargs, name, api.ptr(),
                                                           "layernorm.functional");
}

// One entry point per public op, from one template: (residual?, RMSNorm?) pick the signature and the op.
template <bool kResidual, bool kRms>
PyObject* py_norm(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* const names[2][2] = {{"layer_norm", "rms_norm"}, {"add_layer_norm", "add_rms_norm"}};
  const char* name = names[kResidual][kRms];
  static torch::PythonArgParser parser({
      std::string(name) + "(Tensor input, " + (kResidual ? "Tensor residual, " : "") +
      "SymIntArrayRef normalized_shape, Tensor? weight=None, " +
      (kRms ? "double? eps=None, *, double offset=0.0, bool round_normalized=False)"
            : "Tensor? bias=None, double eps=1e-05)"),
  });
  torch::ParsedArgs<7> parsed;
  auto r = parser.parse(args, kwargs, parsed);
  if (r.has_torch_function()) return handle_override(r, name, args, kwargs);
  // Every argument is read while the GIL is held; the op runs without it.
  int i = 0;
  const Tensor input = r.tensor(i++);
  const Tensor residual = kResidual ? r.tensor(i++) : Tensor();
  const auto shape = r.symintlist(i++);
  const OptTensor weight = r.optionalTensor(i++);
  if constexpr (kRms) {
    const auto eps = r.toDoubleOptional(i++);
    const double offset = r.toDouble(i++);
    const bool round_normalized = r.toBool(i++);
    if constexpr (kResidual) {
      return run_without_gil(
          [&] { return add_rms_norm_op().call(input, residual, shape, weight, eps, offset, round_normalized); });
    } else {
      return run_without_gil([&] { return rms_norm_op().call(input, shape, weight, eps, offset, round_normalized); });
    }
  } else {
    const OptTensor bias = r.optionalTensor(i++);
    const double eps = r.toDouble(i++);
    if constexpr (kResidual) {
      return run_without_gil([&] { return add_layer_norm_op().call(input, residual, shape, weight, bias, eps); });
    } else {
      return run_without_gil([&] { return layer_norm_op().call(input, shape, weight, bias, eps); });
    }
  }
  END_HANDLE_TH_ERRORS
}

template <bool kResidual, bool kRms>
PyCFunction entry() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_norm<kResidual, kRms>));
}

PyMethodDef norm_methods[] = {
    {"layer_norm", entry<false, false>(), METH_VARARGS | METH_KEYWORDS, "layernorm::layer_norm through the dispatcher"},
    {"rms_norm", entry<false, true>(), METH_VARARGS | METH_KEYWORDS, "layernorm::rms_norm through the dispatcher"},
    {"add_layer_norm", entry<true, false>(), METH_VARARGS | METH_KEYWORDS,
     "layernorm::add_layer_norm through the dispatcher"},
    {"add_rms_norm", entry<true, true>(), METH_VARARGS | METH_KEYWORDS, "layernorm::add_rms_norm through the dispatcher"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void bind_norm(pybind11::module& m) {
  TORCH_CHECK(PyModule_AddFunctions(m.ptr(), norm_methods) == 0, "layernorm: could not add the norm functions");
  m.def(
      "check_args",
      [](const Tensor& input, const OptTensor& residual, std::vector<int64_t> normalized_shape,
         const OptTensor& weight, const OptTensor& bias, bool rms) {
        check_args(input, residual, c10::fromIntArrayRefSlow(normalized_shape), weight, bias, rms);
      },
      "The operators' argument checks (torch's rules and messages), for the backends that bypass them.");
  m.def(
      "output_cache_stats",
      []() {
        const OutputCacheStats s = output_cache_stats();
        return pybind11::dict(pybind11::arg("cached_bytes") = s.cached_bytes,
                              pybind11::arg("cached_blocks") = s.cached_blocks, pybind11::arg("cap_bytes") = s.cap_bytes,
                              pybind11::arg("min_bytes") = s.min_bytes);
      },
      "Memory held for reuse by large outputs (see output_cache.h).");
  m.def("release_output_cache", &release_output_cache, "Return the memory held for large outputs to the system.");
  m.def("set_torch_function_api", [](pybind11::object api) {
    Py_XDECREF(torch_function_api);
    torch_function_api = api.release().ptr();
  });
}

}  // namespace layernorm
