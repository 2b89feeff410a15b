// CPU kernels of LayerNorm and RMSNorm (with the optional fused residual add), forward and backward.
//
// The maths is docs/math.md; the spec is layernorm/backends/reference.py, which these kernels follow
// line by line. Inputs arrive checked (norm_ops.cpp); every tensor is viewed as M rows of N columns.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace layernorm {

// (out, sum, mean, rstd): sum = input + residual (an empty tensor without residual), mean an empty
// tensor for RMSNorm; mean and rstd have M elements, in float32 (float64 for float64 input). Without
// want_stats (inference), mean and rstd are not stored and come back as undefined tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, int64_t N,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, bool rms,
    double offset, bool round_normalized, bool want_stats = true);

// (grad_input, grad_weight, grad_bias), each an empty tensor where output_mask says so or the
// parameter is absent. grad_input includes grad_sum (the gradient reaching input + residual).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t N, bool rms, double offset, bool round_normalized,
    std::array<bool, 3> output_mask);

}  // namespace layernorm
