// Host-side helpers shared by every backend's kernels: argument checks and parsing of the
// string arguments of the operator schemas defined in ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

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

// The gradient of the gated output and the saved convolution given to a backward kernel:
// both (N, C, Ho, Wo), conv_out possibly empty (recompute).
void check_gated_backward_shapes(const at::Tensor& grad_out, const at::Tensor& conv_out,
                                 const at::Tensor& input, const at::Tensor& weight,
                                 int64_t out_h, int64_t out_w);

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

// Validates the optional 1x1 mix of the gated ops: mix_weight (Cout, channels, 1, 1) and
// mix_bias (Cout), in the input's dtype and on its device; a bias needs a weight.
void check_mix_args(const std::optional<at::Tensor>& mix_weight,
                    const std::optional<at::Tensor>& mix_bias, const at::Tensor& input,
                    int64_t channels);

// conv2d(gated, mix_weight, mix_bias) in gated's memory format: the mix where a backend does
// not fuse it (ATen's GEMM, on any device).
at::Tensor apply_mix(const at::Tensor& gated, const at::Tensor& mix_weight,
                     const std::optional<at::Tensor>& mix_bias);

// Backward of out = conv2d(gate * conv, mix_weight, mix_bias): the gradient of the gated
// output and of the mix's weight and bias (undefined where not asked for). ATen ops only,
// on any device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_backward(
    const at::Tensor& grad_out, const at::Tensor& conv, const at::Tensor& gate,
    const at::Tensor& mix_weight, bool need_gated, bool need_weight, bool need_bias);

// gated_conv2d_backward for a backend whose kernels know no mix: the mix's part by
// mix_backward, then core(grad of the gated output, conv_out, mask of input / weight / bias /
// gate) for the rest. recompute_conv() gives the ungated convolution where conv_out is empty
// and the mix's weight gradient needs it. Gradients not asked for come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_backward_with_mix(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& conv_out,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask,
    const std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, std::array<bool, 4>)>& core,
    const std::function<at::Tensor()>& recompute_conv);

// The host-side description of an MLP encoder for kernels that evaluate the gate
// themselves: parameters in the compute dtype, contiguous, on the kernel's device.
struct EncoderSpec {
  std::vector<at::Tensor> weight, bias;
  Activation hidden, gate;
};

// The output grid (Ho, Wo) of mlp_gated_conv2d, after the checks that computing it needs.
std::pair<int64_t, int64_t> mlp_gated_conv2d_grid(const at::Tensor& input, const at::Tensor& weight,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation);

// The encoder's parameters live on the input's device.
void check_encoder_device(at::TensorList encoder_weights, const at::Tensor& input);

// The rest of mlp_gated_conv2d's checks, for kernels that evaluate the encoder themselves:
// the encoder (check_mlp_args, on the input's device, one gate per output channel), the
// convolution's arguments (check_gated_conv2d_args with a stand-in gate of no memory) and the
// mix.
void check_mlp_gated_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::TensorList encoder_weights, at::TensorList encoder_biases, int64_t out_h, int64_t out_w,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias);

// The encoder as an EncoderSpec, parameters made contiguous, in dtype when given (else their
// own), on their device.
EncoderSpec encoder_spec(at::TensorList encoder_weights, at::TensorList encoder_biases,
                         c10::string_view hidden_activation, c10::string_view gate_activation,
                         std::optional<at::ScalarType> dtype = std::nullopt);

// The encoder as the kernels read it: pointers into the spec's tensors, which must be of
// dtype T and outlive the result.
template <typename T>
EncoderParams<T> encoder_params(const EncoderSpec& spec) {
  TORCH_CHECK(static_cast<int64_t>(spec.weight.size()) <= kMaxEncoderLayers,
              "the kernels take at most ", kMaxEncoderLayers, " encoder layers, got ",
              spec.weight.size());
  EncoderParams<T> e{};
  e.layers = static_cast<int>(spec.weight.size());
  e.hidden = spec.hidden;
  e.gate = spec.gate;
  for (int l = 0; l < e.layers; ++l) {
    e.weight[l] = spec.weight[l].data_ptr<T>();
    e.bias[l] = spec.bias[l].data_ptr<T>();
    e.width[l] = spec.weight[l].size(0);
  }
  return e;
}

// A backend's kernels, as mlp_gated_conv2d_backward composes them.
using MlpGateFn = std::function<at::Tensor(at::TensorList, at::TensorList, int64_t, int64_t,
                                           c10::string_view, c10::string_view)>;
using EncoderGrads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;
using MlpGateBackwardFn =
    std::function<EncoderGrads(const at::Tensor&, at::TensorList, at::TensorList, int64_t,
                               int64_t, c10::string_view, c10::string_view)>;
using GatedGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GatedBackwardFn = std::function<GatedGrads(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
    int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    std::array<bool, 6>)>;

// mlp_gated_conv2d_backward from a backend's kernels: the gate map evaluated again (the
// encoder is tiny), the gated backward with it, and the encoder's gradients from the gate's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
mlp_gated_conv2d_backward_with(
    const MlpGateFn& mlp_gate, const GatedBackwardFn& gated_backward,
    const MlpGateBackwardFn& mlp_gate_backward,
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::TensorList encoder_weights,
    at::TensorList encoder_biases, c10::string_view hidden_activation,
    c10::string_view gate_activation, const at::Tensor& conv_out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask);


// float16 / bfloat16 are computed in float32; float32 and float64 in themselves.
at::ScalarType compute_dtype(at::ScalarType dtype);

}  // namespace coordgate
