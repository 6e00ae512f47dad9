// Host-side helpers shared by every backend's kernels: argument checks and parsing of the
// string arguments of the operator schemas defined in ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include "common/conv_geometry.h"
#include "common/coordgate_math.h"

namespace coordgate {

// "none" | "relu" | "sigmoid" | "tanh" | "silu" | "gelu" | "softplus"; raises on anything else.
Activation parse_activation(c10::string_view name);

// Validates the encoder parameters of coordgate_ext::mlp_gate: L >= 1 linear layers
// 2 -> ... -> C with nn.Linear's (out, in) weight layout, one dtype and device.
void check_mlp_args(at::TensorList weights, at::TensorList biases, int64_t height, int64_t width);

// Validates the arguments of coordgate_ext::gated_conv2d and returns (Ho, Wo).
std::pair<int64_t, int64_t> check_gated_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups);

// (Ho, Wo) of the convolution of a 4-D input by a 4-D weight; raises if it would be empty.
std::pair<int64_t, int64_t> conv_output_grid(const at::Tensor& input, const at::Tensor& weight,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation);

// The geometry of a checked convolution (check_gated_conv2d_args or conv_output_grid first).
ConvGeometry conv_geometry(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups);

// The memory format every output of the gated convolution takes: channels_last when the
// input is channels_last (and not also plain contiguous), contiguous otherwise. The fake
// kernels in coordgate_ext/ops follow the same rule.
at::MemoryFormat output_memory_format(const at::Tensor& input);

// float16 / bfloat16 are computed in float32; float32 and float64 in themselves.
at::ScalarType compute_dtype(at::ScalarType dtype);

}  // namespace coordgate
