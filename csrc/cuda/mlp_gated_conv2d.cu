// CUDA kernels of coordgate_ext::mlp_gated_conv2d and its backward: the gated convolution
// with the MLP encoder inside the op.
//
// Forward evaluates the gate inside the convolution kernel (gated_conv2d.cu) when the
// encoder fits on chip and its cost per output value is small next to the convolution's;
// otherwise it computes the (C, Ho, Wo) map first (mlp_gate.cu) and runs the map kernel.
// Backward computes the map (the encoder is tiny), runs the gated backward, and takes the
// encoder's gradients from the gate's gradient. Nothing of size (C, Ho, Wo) is kept between
// forward and backward.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace coordgate {
namespace {

// Whether the forward kernel should evaluate the encoder itself. It can when the encoder is
// float32, has at most kMaxEncoderLayers layers with hidden widths <= kCudaMaxHiddenWidth,
// the input is not float64 and there is no mix. It should when the encoder's multiply-adds
// per output value (the hidden layers once per pixel, shared by the block's 64 channels and
// its N images; the last layer once per channel and pixel, shared by the N images), times 4
// for their activations and the serial per-pixel schedule, stay below the convolution's
// N * Cin/groups * kh * kw. A rule reasoned from the kernel's structure, not yet measured on
// a GPU.
bool encoder_in_kernel(const at::Tensor& input, const at::Tensor& weight,
                       at::TensorList encoder_weights, bool has_mix, int64_t groups) {
  if (has_mix || input.scalar_type() == at::kDouble ||
      encoder_weights[0].scalar_type() != at::kFloat ||
      static_cast<int64_t>(encoder_weights.size()) > kMaxEncoderLayers) {
    return false;
  }
  int64_t hidden_macs = 0, fan_in = 2;
  for (size_t l = 0; l + 1 < encoder_weights.size(); ++l) {
    const int64_t width = encoder_weights[l].size(0);
    if (width > kCudaMaxHiddenWidth) return false;
    hidden_macs += width * fan_in;
    fan_in = width;
  }
  const int64_t batch = std::max<int64_t>(1, input.size(0));
  const double per_value =
      (static_cast<double>(hidden_macs) / 64.0 + static_cast<double>(fan_in)) / batch;
  const double conv_per_value =
      static_cast<double>(input.size(1) / groups * weight.size(2) * weight.size(3));
  return 4.0 * per_value <= conv_per_value;
}

std::tuple<at::Tensor, at::Tensor> mlp_gated_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::TensorList encoder_weights, at::TensorList encoder_biases,
    c10::string_view hidden_activation, c10::string_view gate_activation,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    bool save_conv) {
  const auto [out_h, out_w] = mlp_gated_conv2d_grid(input, weight, stride, padding, dilation);
  check_mlp_gated_conv2d_args(input, weight, bias, encoder_weights, encoder_biases, out_h, out_w,
                              stride, padding, dilation, groups, mix_weight, mix_bias);
  const c10::cuda::CUDAGuard guard(input.device());
  if (encoder_in_kernel(input, weight, encoder_weights, mix_weight.has_value(), groups)) {
    const EncoderSpec enc = encoder_spec(encoder_weights, encoder_biases, hidden_activation,
                                         gate_activation, at::kFloat);
    return gated_conv2d_encoder_cuda(input, weight, bias, enc, stride, padding, dilation, groups,
                                     save_conv);
  }
  const auto gate = mlp_gate_cuda(encoder_weights, encoder_biases, out_h, out_w,
                                  hidden_activation, gate_activation);
  return gated_conv2d_cuda(input, weight, bias, gate.to(input.scalar_type()), stride, padding,
                           dilation, groups, mix_weight, mix_bias, save_conv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
mlp_gated_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::TensorList encoder_weights,
    at::TensorList encoder_biases, c10::string_view hidden_activation,
    c10::string_view gate_activation, const at::Tensor& conv_out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask) {
  return mlp_gated_conv2d_backward_with(&mlp_gate_cuda, &gated_conv2d_backward_cuda,
                                        &mlp_gate_backward_cuda, grad_out, input, weight,
                                        bias, encoder_weights, encoder_biases, hidden_activation,
                                        gate_activation, conv_out, stride, padding, dilation,
                                        groups, mix_weight, mix_bias, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(coordgate_ext, CUDA, m) {
  m.impl("mlp_gated_conv2d", &mlp_gated_conv2d_cuda);
  m.impl("mlp_gated_conv2d_backward", &mlp_gated_conv2d_backward_cuda);
}

}  // namespace coordgate
