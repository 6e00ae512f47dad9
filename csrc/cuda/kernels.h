// The CUDA kernels' host entry points, for the ops that compose them
// (mlp_gated_conv2d.cu) and the launch constants the composition must respect.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../ops.h"

namespace coordgate {

// Widest hidden encoder layer the forward kernel evaluates on chip (two (width, 64-pixel)
// fp32 buffers in shared memory); wider encoders have their gate computed as a map first.
constexpr int64_t kCudaMaxHiddenWidth = 64;
// Most gated channels the forward kernel mixes on chip (a (C, 64-pixel) tile in shared
// memory); with more, the mix is ATen's GEMM after the gated convolution.
constexpr int64_t kCudaMaxMixChannels = 64;

at::Tensor mlp_gate_cuda(at::TensorList weights, at::TensorList biases, int64_t height,
                         int64_t width, c10::string_view hidden_activation,
                         c10::string_view gate_activation);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_gate_backward_cuda(
    const at::Tensor& grad_gate, at::TensorList weights, at::TensorList biases, int64_t height,
    int64_t width, c10::string_view hidden_activation, c10::string_view gate_activation);

std::tuple<at::Tensor, at::Tensor> gated_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& mix_weight,
    const std::optional<at::Tensor>& mix_bias, bool save_conv);

// The gated convolution with the gate evaluated inside the kernel from the encoder (float32
// parameters, its maths in float32; at most kMaxEncoderLayers layers, hidden widths <=
// kCudaMaxHiddenWidth; no mix). Arguments checked by the caller.
std::tuple<at::Tensor, at::Tensor> gated_conv2d_encoder_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const EncoderSpec& encoder, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool save_conv);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& gate, const at::Tensor& conv_out,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups,
                           const std::optional<at::Tensor>& mix_weight,
                           const std::optional<at::Tensor>& mix_bias,
                           std::array<bool, 6> output_mask);

}  // namespace coordgate
