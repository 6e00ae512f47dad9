// The CPU kernels' entry points, for the ops that compose them (mlp_gated_conv2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/conv_geometry.h"
#include "../common/coordgate_math.h"
#include "../ops.h"

namespace coordgate {

// How the CPU kernels convolve: ATen's convolution (oneDNN) with the gate applied around it,
// or the implicit-GEMM engine of implicit_gemm.cpp, which runs the CUDA kernels' per-element
// maths. Set with coordgate_ext.set_cpu_engine; kAuto decides per call (see below).
enum class CpuEngine : int { kAuto = 0, kAten = 1, kImplicitGemm = 2 };

void set_cpu_engine(CpuEngine engine);
CpuEngine cpu_engine();

// Whether a forward (backward) runs the implicit GEMM. kAuto takes it for float64 (oneDNN
// has no float64 kernels; ATen's float64 convolution is a slow im2col anyway) and, for the
// forward, where the reduction K = Cin/groups * kh * kw is at most kImplicitGemmMaxK and a
// group has at least kImplicitGemmMinChannels output channels: there oneDNN's direct
// convolution is memory-bound and the implicit GEMM, writing the gated output tile by tile
// while it is in cache, is faster. Measured here, float32, the gated op with the ungated
// convolution saved, over the bare F.conv2d: C >= 32: K = 3, 9, 27, 36 at 0.4-0.7x (ATen
// engine 1.1x), K = 72 at 0.73x, K = 144 at 0.96x, K = 288 at 1.7x; C = 16: K = 9 at 0.72x,
// K = 27 at 1.04x (ATen engine 1.16-1.17x); C = 8, K = 27: 1.44x (ATen engine 1.09x).
constexpr int64_t kImplicitGemmMaxK = 64;
constexpr int64_t kImplicitGemmMinChannels = 16;
bool implicit_gemm_forward_for(at::ScalarType compute_dtype, const ConvGeometry& g);
bool implicit_gemm_backward_for(at::ScalarType compute_dtype);

// Output bytes per band of the ATen engine's banded convolution (see gated_conv2d.cpp);
// default kDefaultBandBytes. Set with coordgate_ext.set_cpu_band_bytes (>= 1; 1 makes every
// band one output row of one sample, which the tests use to cover the row bands).
constexpr int64_t kDefaultBandBytes = 2 << 20;
void set_cpu_band_bytes(int64_t bytes);
int64_t cpu_band_bytes();

// Where the implicit GEMM's backward writes; an undefined tensor is a gradient not asked
// for. input: like the input (zero padding needs no initialisation: every element is
// written); weight_parts (implicit_gemm_tiles, C/groups, K) and bias_parts
// (implicit_gemm_tiles, C/groups): per-tile partial sums, tile-major within each group;
// gate (C, Ho * Wo) contiguous.
struct ImplicitGemmGrads {
  at::Tensor input, weight_parts, bias_parts, gate;
};

int64_t implicit_gemm_tiles(const ConvGeometry& g);

// out (and y = conv + bias, when y is given) for the gate map (C, Ho, Wo) or, when encoder
// is given (gate undefined), the gate evaluated per tile. Every tensor in the compute dtype.
void implicit_gemm_forward(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& gate,
                           const EncoderSpec* encoder, at::Tensor& out, at::Tensor* y);

// Gradients of out = gate * (conv + bias) given dout; y undefined means recompute it.
void implicit_gemm_backward(const ConvGeometry& g, const at::Tensor& dout, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& gate, const at::Tensor& y,
                            const ImplicitGemmGrads& grads);

at::Tensor mlp_gate_cpu(at::TensorList weights, at::TensorList biases, int64_t height,
                        int64_t width, c10::string_view hidden_activation,
                        c10::string_view gate_activation);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_gate_backward_cpu(
    const at::Tensor& grad_gate, at::TensorList weights, at::TensorList biases, int64_t height,
    int64_t width, c10::string_view hidden_activation, c10::string_view gate_activation);

std::tuple<at::Tensor, at::Tensor> gated_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& mix_weight,
    const std::optional<at::Tensor>& mix_bias, bool save_conv);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& gate, const at::Tensor& conv_out,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups,
                          const std::optional<at::Tensor>& mix_weight,
                          const std::optional<at::Tensor>& mix_bias,
                          std::array<bool, 6> output_mask);

}  // namespace coordgate
