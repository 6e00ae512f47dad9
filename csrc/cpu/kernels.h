// The CPU kernels' entry points, for the ops that compose them (mlp_gated_conv2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
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

// Whether a forward (backward) runs the implicit GEMM. kAuto takes it for float64 only (oneDNN
// has no float64 kernels; ATen's float64 convolution is a slow im2col anyway). In float32 the
// ATen engine's banded convolution was faster on every shape measured (under glibc's default
// allocator; not re-measured under a heap allocator), including the small
// reductions (K = Cin/groups * kh * kw <= 64) where the implicit GEMM used to win over the
// unbanded one: paired ratio to the bare F.conv2d, training forward / eval forward, implicit
// GEMM vs banded ATen: 4, 4->32, 256x256: 0.92-0.96 / 0.75-0.80 vs 0.39-0.41 / 0.28-0.29;
// 2, 3->64, 512x512: 0.61-0.62 / 0.39-0.40 vs 0.51-0.52 / 0.27-0.28; 8, 1->64, 128x128:
// 0.58-0.60 / 0.36 vs 0.30-0.31 / 0.22-0.23; 2, 7->16, 256x256: 6.5-6.7 / 5.6 vs 2.0 / 1.4.
bool implicit_gemm_forward_for(at::ScalarType compute_dtype);
bool implicit_gemm_backward_for(at::ScalarType compute_dtype);

// Output bytes per band of the ATen engine's banded convolution (see gated_conv2d.cpp);
// default kDefaultBandBytes. Set with coordgate_ext.set_cpu_band_bytes (>= 1; 1 makes every
// band one output row of one sample, which the tests use to cover the row bands).
constexpr int64_t kDefaultBandBytes = 2 << 20;
void set_cpu_band_bytes(int64_t bytes);
int64_t cpu_band_bytes();

// Output bytes from which the ATen engine's forward gate pass writes its outputs with
// non-temporal stores (see gated_conv2d.cpp); default kDefaultStreamBytes. Set with
// coordgate_ext.set_cpu_stream_bytes (>= 0; 0 streams every output, which the tests use).
constexpr int64_t kDefaultStreamBytes = int64_t{128} << 20;
void set_cpu_stream_bytes(int64_t bytes);
int64_t cpu_stream_bytes();

// Where the implicit GEMM's backward writes; an undefined tensor is a gradient not asked
// for. input: like the input (zero padding needs no initialisation: every element is
// written); weight_parts (implicit_gemm_tiles, C/groups, K) and bias_parts
// (implicit_gemm_tiles, C/groups): per-tile partial sums, tile-major within each group;
// gate (C, Ho * Wo) contiguous.
struct ImplicitGemmGrads {
  at::Tensor input, weight_parts, bias_parts, gate;
};

// dst[c * dst_ld + r] = src[r * src_ld + c] for r < rows, c < cols (dst = src^T), in tiles
// that stay in L1. One side of a gate transpose strides by a whole grid (often a power of two
// of bytes apart), so its lines share a cache set: a tile takes 8 of them (fewer than a set's
// ways) and 64 contiguous elements of the other side, and the tiles run along the strided
// side first, while the other side's lines are still in cache. A whole-row loop on the
// strided side took 85% of a channels_last encoder backward (2, 3->64, 512x512).
template <typename T>
void transpose_tiled(const T* src, int64_t src_ld, int64_t rows, int64_t cols, T* dst,
                     int64_t dst_ld) {
  constexpr int64_t kNarrow = 8, kWide = 64;
  auto tile = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* d = dst + c * dst_ld;
      for (int64_t r = r0; r < r1; ++r) d[r] = src[r * src_ld + c];
    }
  };
  if (dst_ld >= src_ld) {
    for (int64_t r0 = 0; r0 < rows; r0 += kWide) {
      for (int64_t c0 = 0; c0 < cols; c0 += kNarrow) {
        tile(r0, std::min(rows, r0 + kWide), c0, std::min(cols, c0 + kNarrow));
      }
    }
  } else {
    for (int64_t c0 = 0; c0 < cols; c0 += kWide) {
      for (int64_t r0 = 0; r0 < rows; r0 += kNarrow) {
        tile(r0, std::min(rows, r0 + kNarrow), c0, std::min(cols, c0 + kWide));
      }
    }
  }
}

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

// mlp_gate_cpu with the gate's memory pixel-major, (height, width, C), when pixel_major.
at::Tensor mlp_gate_cpu_in(at::TensorList weights, at::TensorList biases, int64_t height,
                           int64_t width, c10::string_view hidden_activation,
                           c10::string_view gate_activation, bool pixel_major);

// Reads a pixel-major grad_gate in place for two-layer encoders with a relu (or no) hidden
// activation; any other layout or encoder is made contiguous first.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_gate_backward_cpu(
    const at::Tensor& grad_gate, at::TensorList weights, at::TensorList biases, int64_t height,
    int64_t width, c10::string_view hidden_activation, c10::string_view gate_activation);

std::tuple<at::Tensor, at::Tensor> gated_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& mix_weight,
    const std::optional<at::Tensor>& mix_bias, bool save_conv);

// Whether a (C, Ho, Wo) gate's memory is pixel-major, (Ho, Wo, C): the layout the ATen
// engine reads for a channels_last input. A channels_last call given such a gate reads it in
// place; any other gate it transposes, once per call (and the gate gradient back).
bool pixel_major(const at::Tensor& gate);

// gated_conv2d_backward_cpu with the gate gradient as the kernels write it: pixel-major for
// a channels_last input on the ATen engine (what mlp_gate_backward_cpu reads in place),
// contiguous otherwise. The operator's gradient is always contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cpu_pixel_major(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& gate, const at::Tensor& conv_out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask);

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
