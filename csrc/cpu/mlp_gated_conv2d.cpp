// CPU kernels of coordgate_ext::mlp_gated_conv2d and its backward: the gated convolution
// with the MLP encoder inside the op. The gate is evaluated in forward and evaluated again
// in backward (it is cheap next to the convolution), so nothing of size (C, Ho, Wo) is kept
// between the two.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace coordgate {
namespace {

// Whether the gate is made pixel-major: for a channels_last input on the ATen engine, which
// reads it so (and writes the gate gradient so, which mlp_gate_backward_cpu reads in place).
bool pixel_major_gate_for(const at::Tensor& input, bool implicit_gemm) {
  return !implicit_gemm && input.dim() == 4 &&
         output_memory_format(input) == at::MemoryFormat::ChannelsLast;
}

std::tuple<at::Tensor, at::Tensor> mlp_gated_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::TensorList encoder_weights, at::TensorList encoder_biases,
    c10::string_view hidden_activation, c10::string_view gate_activation,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    bool save_conv) {
  const auto [out_h, out_w] = mlp_gated_conv2d_grid(input, weight, stride, padding, dilation);
  const auto cdtype = compute_dtype(input.scalar_type());
  // The gate per tile from the shared per-pixel encoder (the CUDA kernel's in-kernel gate)
  // when the implicit GEMM is asked for, or for float64; otherwise the map (for two-layer
  // relu encoders far cheaper, see mlp_gate.cpp), whichever engine convolves. float16 /
  // bfloat16 inputs take the map, rounded to their dtype as backward sees it.
  const bool encoder_per_tile = cpu_engine() == CpuEngine::kImplicitGemm ||
                                (cpu_engine() == CpuEngine::kAuto && cdtype == at::kDouble);
  if (encoder_per_tile && cdtype == input.scalar_type() &&
      encoder_weights.size() == encoder_biases.size() &&
      !encoder_weights.empty() && encoder_weights[0].scalar_type() == cdtype &&
      static_cast<int64_t>(encoder_weights.size()) <= kMaxEncoderLayers) {
    // The gate evaluated per tile, as the CUDA kernel's in-kernel encoder does.
    check_mlp_gated_conv2d_args(input, weight, bias, encoder_weights, encoder_biases, out_h, out_w,
                                stride, padding, dilation, groups, mix_weight, mix_bias);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const EncoderSpec enc =
        encoder_spec(encoder_weights, encoder_biases, hidden_activation, gate_activation);
    const auto geo = conv_geometry(input, weight, stride, padding, dilation, groups);
    const auto fmt = output_memory_format(input);
    const std::vector<int64_t> shape{geo.batch, geo.channels, out_h, out_w};
    auto out = at::empty(shape, input.options().dtype(cdtype)).contiguous(fmt);
    auto y = save_conv ? at::empty_like(out) : at::Tensor();
    const auto b = bias ? std::optional<at::Tensor>(bias->to(cdtype)) : std::nullopt;
    implicit_gemm_forward(geo, input.to(cdtype), weight.to(cdtype), b, at::Tensor(), &enc, out,
                          save_conv ? &y : nullptr);
    const auto dtype = input.scalar_type();
    if (mix_weight) {
      out = apply_mix(out, mix_weight->to(cdtype),
                      mix_bias ? std::optional<at::Tensor>(mix_bias->to(cdtype)) : std::nullopt);
    }
    return {out.to(dtype), save_conv ? y.to(dtype) : at::empty({0}, input.options())};
  }
  const bool pixel_major = pixel_major_gate_for(input, implicit_gemm_forward_for(cdtype));
  const auto gate = mlp_gate_cpu_in(encoder_weights, encoder_biases, out_h, out_w,
                                    hidden_activation, gate_activation, pixel_major);
  return gated_conv2d_cpu(input, weight, bias, gate.to(input.scalar_type()), stride, padding,
                          dilation, groups, mix_weight, mix_bias, save_conv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
mlp_gated_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::TensorList encoder_weights,
    at::TensorList encoder_biases, c10::string_view hidden_activation,
    c10::string_view gate_activation, const at::Tensor& conv_out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask) {
  const bool pixel_major = pixel_major_gate_for(
      input, implicit_gemm_backward_for(compute_dtype(input.scalar_type())));
  auto mlp_gate = [pixel_major](at::TensorList weights, at::TensorList biases, int64_t height,
                                int64_t width, c10::string_view hidden,
                                c10::string_view gate_act) {
    return mlp_gate_cpu_in(weights, biases, height, width, hidden, gate_act, pixel_major);
  };
  return mlp_gated_conv2d_backward_with(mlp_gate, &gated_conv2d_backward_cpu_pixel_major,
                                        &mlp_gate_backward_cpu, grad_out, input, weight,
                                        bias, encoder_weights, encoder_biases, hidden_activation,
                                        gate_activation, conv_out, stride, padding, dilation,
                                        groups, mix_weight, mix_bias, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(coordgate_ext, CPU, m) {
  m.impl("mlp_gated_conv2d", &mlp_gated_conv2d_cpu);
  m.impl("mlp_gated_conv2d_backward", &mlp_gated_conv2d_backward_cpu);
}

}  // namespace coordgate
