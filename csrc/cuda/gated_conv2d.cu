// CUDA kernels of coordgate_ext::gated_conv2d and gated_conv2d_backward.
//
// Every kernel is an implicit GEMM: a block owns a 64 x 64 tile of its output, stages
// 16-deep slices of both operands in shared memory (fp32, fp64 for float64) and each of its
// 256 threads accumulates a 4 x 4 register tile. What the operands are, and every index and
// per-element formula, comes from csrc/common (conv_geometry.h, coordgate_math.h), the code
// the CPU's implicit-GEMM engine (csrc/cpu/implicit_gemm.cpp) runs and the CPU tests check;
// what is CUDA-only here is the thread mapping and the shared-memory staging.
//
// Forward, block = (group, 64 output pixels) x 64 output channels of the group, the batch
// loop inside: the gate is loaded from the (C, Ho, Wo) map, or evaluated from the encoder
// (hidden layers once per pixel into shared memory, the last layer per output), once per
// block and reused for every image. Epilogue: (acc + bias) * gate, and y = acc + bias when
// backward needs it. With a 1x1 mix (C <= kCudaMaxMixChannels) a block computes every
// channel of its pixels into shared memory and mixes them there.
// Backward: dgate[c, p] = sum_n dout * y and the bias partials, one thread per (c, p), the
// batch summed in order (no atomics); the input gradient as a gather-GEMM over (c, tap)
// with dy = dout * gate formed as it is loaded; the weight gradient as a GEMM over
// (image, pixel) split into fixed chunks whose partial sums are added by ATen in order:
// every result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common/conv_geometry.h"
#include "../common/coordgate_math.h"
#include "../ops.h"
#include "kernels.h"

namespace coordgate {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 16;  // the block's threads as a 16 x 16 grid (tx, ty)
constexpr int kMicro = 4;   // each thread: rows ty + 16 i, columns tx + 16 j, i, j < 4
constexpr int kTileM = kLanes * kMicro;
constexpr int kTileN = kLanes * kMicro;
constexpr int kTileK = 16;
static_assert(kLanes * kLanes == kThreads, "one thread per (tx, ty)");
// A thread loads the same operand-B column at every step: its column can be precomputed.
static_assert(kThreads % kTileN == 0, "fixed B column per thread");
// Reduction length of one weight-gradient chunk is at least this many (image, pixel) pairs.
constexpr int64_t kMinChunk = 1024;
// Blocks the weight gradient aims for, independent of the device so that its chunking (and
// so its rounding) is too.
constexpr int64_t kWeightGradBlocks = 512;

C10_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename acc_t>
struct GemmTile {
  acc_t a[kTileK][kTileM];
  acc_t b[kTileK][kTileN];
};

template <typename acc_t>
__device__ __forceinline__ void zero_tile(acc_t (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  }
}

// acc[i][j] += sum_{k < K} A(ty + 16 i, k) * B(k, tx + 16 j), A and B read through
// load_a(row, k) and load_b(k, column) (zero outside the operands: the loaders mask rows and
// columns, this function masks k). Every thread of the block must call it.
template <typename acc_t, typename LoadA, typename LoadB>
__device__ __forceinline__ void gemm_tile(int64_t K, const LoadA& load_a, const LoadB& load_b,
                                          GemmTile<acc_t>& s, acc_t (&acc)[kMicro][kMicro]) {
  const int tid = threadIdx.x, tx = tid % kLanes, ty = tid / kLanes;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
#pragma unroll
    for (int r = 0; r < kTileM * kTileK / kThreads; ++r) {
      const int idx = tid + r * kThreads;
      const int m = idx % kTileM, kk = idx / kTileM;
      s.a[kk][m] = k0 + kk < K ? load_a(m, k0 + kk) : acc_t(0);
    }
#pragma unroll
    for (int r = 0; r < kTileN * kTileK / kThreads; ++r) {
      const int idx = tid + r * kThreads;
      const int col = idx % kTileN, kk = idx / kTileN;
      s.b[kk][col] = k0 + kk < K ? load_b(k0 + kk, col) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = s.a[kk][ty + kLanes * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b[j] = s.b[kk][tx + kLanes * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }
}

template <typename scalar_t>
struct ConvArgs {
  ConvGeometry g;
  const scalar_t* x;
  Strides4 xs;
  const scalar_t* w;     // (C, K) contiguous
  const scalar_t* bias;  // (C) or nullptr
  const scalar_t* gate;  // (C, Ho * Wo) contiguous; nullptr: ungated (gate 1)
  scalar_t* out;
  Strides4 os;
  scalar_t* y;  // y = conv + bias, or nullptr
  Strides4 ys;
};

// The convolution of image n at the block's pixel tile for channels c0 .. c0 + 63 of the
// group (acc zeroed here). (oh, ow) is the pixel this thread gathers for: p0 + tid % 64.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void conv_tile(const ConvArgs<scalar_t>& args, int64_t n,
                                          int64_t group, int64_t c0, bool pixel_ok, int64_t oh,
                                          int64_t ow, GemmTile<acc_t>& s,
                                          acc_t (&acc)[kMicro][kMicro]) {
  const ConvGeometry& g = args.g;
  const int64_t K = g.reduction(), cg = g.out_per_group();
  zero_tile(acc);
  gemm_tile<acc_t>(
      K,
      [&](int m, int64_t k) -> acc_t {
        const int64_t c = c0 + m;
        return c < cg ? static_cast<acc_t>(args.w[(group * cg + c) * K + k]) : acc_t(0);
      },
      [&](int64_t k, int) -> acc_t {
        if (!pixel_ok) return acc_t(0);
        const int64_t off = conv_gather_offset(g, args.xs, n, group, k, oh, ow);
        return off < 0 ? acc_t(0) : static_cast<acc_t>(args.x[off]);
      },
      s, acc);
}

// grid.x = groups * pixel tiles, grid.y = channel tiles of a group. One block per SM is
// enough to bound the registers: the 4 x 4 gate tile held across the batch loop beside the
// accumulators needs more than the 128 ptxas allows itself when aiming at two blocks.
template <typename scalar_t, bool kEncoder>
__global__ void __launch_bounds__(kThreads, 1)
    gated_conv2d_fwd_kernel(ConvArgs<scalar_t> args, EncoderParams<float> enc) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ GemmTile<acc_t> tile;
  const ConvGeometry& g = args.g;
  const int64_t P = g.pixels(), cg = g.out_per_group();
  const int64_t pixel_tiles = ceil_div(P, kTileN);
  const int64_t group = static_cast<int64_t>(blockIdx.x) / pixel_tiles;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) % pixel_tiles) * kTileN;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t p_load = p0 + threadIdx.x % kTileN;

  acc_t gate[kMicro][kMicro];
  if constexpr (kEncoder) {
    __shared__ float hidden[2][kCudaMaxHiddenWidth * kTileN];
    if (threadIdx.x < kTileN) {
      const int64_t p = min(p0 + threadIdx.x, P - 1);
      encoder_hidden(enc, grid_coordinate<float>(p / g.out_w, g.out_h),
                     grid_coordinate<float>(p % g.out_w, g.out_w), hidden[0] + threadIdx.x,
                     hidden[1] + threadIdx.x, kTileN);
    }
    __syncthreads();
    const float* h = encoder_hidden_result(enc.layers, hidden[0], hidden[1]);
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int col = tx + kLanes * j;
      const int64_t p = min(p0 + col, P - 1);
      const float r = grid_coordinate<float>(p / g.out_w, g.out_h);
      const float q = grid_coordinate<float>(p % g.out_w, g.out_w);
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const int64_t c = min(c0 + ty + kLanes * i, cg - 1);
        // Rounded to the input's dtype, as the map backward recomputes it.
        gate[i][j] = static_cast<acc_t>(static_cast<scalar_t>(
            encoder_gate(enc, group * cg + c, h == nullptr ? h : h + col, kTileN, r, q)));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t c = c0 + ty + kLanes * i, p = p0 + tx + kLanes * j;
        gate[i][j] = args.gate != nullptr && c < cg && p < P
                         ? static_cast<acc_t>(args.gate[(group * cg + c) * P + p])
                         : acc_t(1);
      }
    }
  }

  for (int64_t n = 0; n < g.batch; ++n) {
    acc_t acc[kMicro][kMicro];
    conv_tile(args, n, group, c0, p_load < P, p_load / g.out_w, p_load % g.out_w, tile, acc);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t c = c0 + ty + kLanes * i;
      if (c >= cg) continue;
      const int64_t ch = group * cg + c;
      const acc_t b = args.bias != nullptr ? static_cast<acc_t>(args.bias[ch]) : acc_t(0);
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t p = p0 + tx + kLanes * j;
        if (p >= P) continue;
        const int64_t oh = p / g.out_w, ow = p % g.out_w;
        args.out[args.os.offset(n, ch, oh, ow)] =
            static_cast<scalar_t>(gated_output(acc[i][j], b, gate[i][j]));
        if (args.y != nullptr) {
          args.y[args.ys.offset(n, ch, oh, ow)] = static_cast<scalar_t>(acc[i][j] + b);
        }
      }
    }
  }
}

template <typename scalar_t>
struct MixArgs {
  const scalar_t* weight;  // (Cout, C) contiguous
  const scalar_t* bias;    // (Cout) or nullptr
  int64_t out_channels;
};

// The forward with the 1x1 mix on chip: grid.x = pixel tiles; a block computes every gated
// channel (all groups) of its pixels into shared memory, then out = M gated + mix bias.
// args.out is the mixed output (N, Cout, Ho, Wo).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gated_conv2d_mix_fwd_kernel(ConvArgs<scalar_t> args, MixArgs<scalar_t> mix) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ GemmTile<acc_t> tile;
  __shared__ acc_t gated[kCudaMaxMixChannels * kTileN];
  const ConvGeometry& g = args.g;
  const int64_t P = g.pixels(), cg = g.out_per_group(), C = g.channels;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t p_load = p0 + threadIdx.x % kTileN;

  for (int64_t n = 0; n < g.batch; ++n) {
    for (int64_t group = 0; group < g.groups; ++group) {
      for (int64_t c0 = 0; c0 < cg; c0 += kTileM) {
        acc_t acc[kMicro][kMicro];
        conv_tile(args, n, group, c0, p_load < P, p_load / g.out_w, p_load % g.out_w, tile,
                  acc);
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
          const int64_t c = c0 + ty + kLanes * i;
          if (c >= cg) continue;
          const int64_t ch = group * cg + c;
          const acc_t b = args.bias != nullptr ? static_cast<acc_t>(args.bias[ch]) : acc_t(0);
#pragma unroll
          for (int j = 0; j < kMicro; ++j) {
            const int col = tx + kLanes * j;
            const int64_t p = p0 + col;
            if (p >= P) continue;
            gated[ch * kTileN + col] =
                gated_output(acc[i][j], b, static_cast<acc_t>(args.gate[ch * P + p]));
            if (args.y != nullptr) {
              args.y[args.ys.offset(n, ch, p / g.out_w, p % g.out_w)] =
                  static_cast<scalar_t>(acc[i][j] + b);
            }
          }
        }
      }
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < mix.out_channels * kTileN; idx += kThreads) {
      const int64_t o = idx / kTileN;
      const int col = static_cast<int>(idx % kTileN);
      const int64_t p = p0 + col;
      if (p >= P) continue;
      const acc_t b = mix.bias != nullptr ? static_cast<acc_t>(mix.bias[o]) : acc_t(0);
      args.out[args.os.offset(n, o, p / g.out_w, p % g.out_w)] = static_cast<scalar_t>(
          dense_unit(mix.weight + o * C, 1, b, gated + col, kTileN, C));
    }
    __syncthreads();
  }
}

// dgate[c, p] = sum_n dout * y and bias_parts[c, p] = sum_n dout * gate (each when not
// nullptr): one thread per (c, p), the images summed in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gated_conv2d_bwd_gate_kernel(
    ConvGeometry g, const scalar_t* dout, Strides4 ds, const scalar_t* y, Strides4 ys,
    const scalar_t* gate, at::opmath_type<scalar_t>* dgate,
    at::opmath_type<scalar_t>* bias_parts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.pixels(), total = g.channels * P;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = idx / P, p = idx % P, oh = p / g.out_w, ow = p % g.out_w;
    const acc_t gv = static_cast<acc_t>(gate[idx]);
    acc_t dg = acc_t(0), db = acc_t(0);
    for (int64_t n = 0; n < g.batch; ++n) {
      const acc_t d = static_cast<acc_t>(dout[ds.offset(n, c, oh, ow)]);
      if (dgate != nullptr) dg += gate_grad_term(d, static_cast<acc_t>(y[ys.offset(n, c, oh, ow)]));
      if (bias_parts != nullptr) db += conv_grad_term(d, gv);
    }
    if (dgate != nullptr) dgate[idx] = dg;
    if (bias_parts != nullptr) bias_parts[idx] = db;
  }
}

// dx[n, group, ci, q] = sum_{c, tap} W[c, ci, tap] * dout[n, c, o(q, tap)] * gate[c, o(q, tap)]
// over the output pixels o that read input pixel q through the tap. grid.x = groups * N *
// input-pixel tiles, grid.y = input-channel tiles of a group.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gated_conv2d_bwd_input_kernel(
    ConvGeometry g, const scalar_t* dout, Strides4 ds, const scalar_t* gate, const scalar_t* w,
    scalar_t* dx, Strides4 dxs) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ GemmTile<acc_t> tile;
  const int64_t in_pixels = g.height * g.width, P = g.pixels();
  const int64_t cg = g.out_per_group(), cin_g = g.in_per_group(), taps = g.taps();
  const int64_t tiles = ceil_div(in_pixels, kTileN);
  const int64_t q0 = (static_cast<int64_t>(blockIdx.x) % tiles) * kTileN;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) / tiles) % g.batch;
  const int64_t group = static_cast<int64_t>(blockIdx.x) / (tiles * g.batch);
  const int64_t ci0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t q_load = q0 + threadIdx.x % kTileN;
  const int64_t ih = q_load / g.width, iw = q_load % g.width;

  acc_t acc[kMicro][kMicro];
  zero_tile(acc);
  gemm_tile<acc_t>(
      cg * taps,
      [&](int m, int64_t k) -> acc_t {
        const int64_t ci = ci0 + m;
        if (ci >= cin_g) return acc_t(0);
        const int64_t cl = k / taps, t = k % taps;
        return static_cast<acc_t>(w[((group * cg + cl) * cin_g + ci) * taps + t]);
      },
      [&](int64_t k, int) -> acc_t {
        if (q_load >= in_pixels) return acc_t(0);
        const int64_t c = group * cg + k / taps, t = k % taps;
        int64_t pixel;
        const int64_t off =
            conv_scatter_offset(g, ds, n, c, t / g.kernel_w, t % g.kernel_w, ih, iw, &pixel);
        return off < 0 ? acc_t(0)
                       : conv_grad_term(static_cast<acc_t>(dout[off]),
                                        static_cast<acc_t>(gate[c * P + pixel]));
      },
      tile, acc);
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t ci = ci0 + ty + kLanes * i;
    if (ci >= cin_g) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t q = q0 + tx + kLanes * j;
      if (q >= in_pixels) continue;
      dx[dxs.offset(n, group * cin_g + ci, q / g.width, q % g.width)] =
          static_cast<scalar_t>(acc[i][j]);
    }
  }
}

// parts[chunk, c, k] = sum over (n, p) of the chunk of dout[n, c, p] * gate[c, p] * X[n, k, p],
// X the gathered input. grid.x = groups * chunks * reduction tiles, grid.y = channel tiles
// of a group.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gated_conv2d_bwd_weight_kernel(
    ConvGeometry g, const scalar_t* dout, Strides4 ds, const scalar_t* gate, const scalar_t* x,
    Strides4 xs, int64_t chunks, int64_t chunk_len, at::opmath_type<scalar_t>* parts) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ GemmTile<acc_t> tile;
  const int64_t P = g.pixels(), K = g.reduction(), cg = g.out_per_group();
  const int64_t R = g.batch * P;
  const int64_t k_tiles = ceil_div(K, kTileN);
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) % k_tiles) * kTileN;
  const int64_t chunk = (static_cast<int64_t>(blockIdx.x) / k_tiles) % chunks;
  const int64_t group = static_cast<int64_t>(blockIdx.x) / (k_tiles * chunks);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t r0 = chunk * chunk_len;
  const int64_t len = max(int64_t(0), min(R, r0 + chunk_len) - r0);
  const int tx = threadIdx.x % kLanes, ty = threadIdx.x / kLanes;
  const int64_t k_load = k0 + threadIdx.x % kTileN;

  acc_t acc[kMicro][kMicro];
  zero_tile(acc);
  gemm_tile<acc_t>(
      len,
      [&](int m, int64_t rr) -> acc_t {
        const int64_t c = c0 + m;
        if (c >= cg) return acc_t(0);
        const int64_t r = r0 + rr, n = r / P, p = r % P, ch = group * cg + c;
        return conv_grad_term(static_cast<acc_t>(dout[ds.offset(n, ch, p / g.out_w, p % g.out_w)]),
                              static_cast<acc_t>(gate[ch * P + p]));
      },
      [&](int64_t rr, int) -> acc_t {
        if (k_load >= K) return acc_t(0);
        const int64_t r = r0 + rr, n = r / P, p = r % P;
        const int64_t off = conv_gather_offset(g, xs, n, group, k_load, p / g.out_w, p % g.out_w);
        return off < 0 ? acc_t(0) : static_cast<acc_t>(x[off]);
      },
      tile, acc);
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t c = c0 + ty + kLanes * i;
    if (c >= cg) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t k = k0 + tx + kLanes * j;
      if (k >= K) continue;
      parts[(chunk * g.channels + group * cg + c) * K + k] = acc[i][j];
    }
  }
}

// Blocks along grid.x are counted in int64 here and must fit the hardware's 2^31 - 1.
void check_grid(int64_t blocks_x) {
  TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max(),
              "gated_conv2d: the problem needs ", blocks_x,
              " blocks along one grid dimension, more than CUDA allows");
}

// The in-kernel encoder serves float32 / float16 / bfloat16 inputs (float64 takes the gate
// map, see encoder_in_kernel in mlp_gated_conv2d.cu): no float64 instance is compiled.
template <typename scalar_t>
void launch_encoder_kernel(dim3 grid, cudaStream_t stream, const ConvArgs<scalar_t>& args,
                           const EncoderParams<float>& enc) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    TORCH_CHECK(false, "gated_conv2d: the in-kernel encoder does not take float64 inputs");
  } else {
    gated_conv2d_fwd_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(args, enc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Launches the forward: the encoder's gate when encoder is given, else the gate map (an
// undefined gate: ungated, out = conv + bias), mixed on chip when mix_weight is given.
void launch_forward(const ConvGeometry& geo, const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& gate,
                    const EncoderSpec* encoder, const std::optional<at::Tensor>& mix_weight,
                    const std::optional<at::Tensor>& mix_bias, at::Tensor& out, at::Tensor* y) {
  // Nothing to write (no image or no channel): no launch (a zero grid is an error). Without
  // input channels K is 0 and the kernels write the gated bias.
  if (out.numel() == 0) return;
  const auto w = weight.contiguous();
  const auto b = bias ? bias->contiguous() : at::Tensor();
  const auto gmap = gate.defined() ? gate.contiguous() : at::Tensor();
  const auto mw = mix_weight ? mix_weight->contiguous() : at::Tensor();
  const auto mb = mix_bias ? mix_bias->contiguous() : at::Tensor();
  const EncoderParams<float> enc =
      encoder != nullptr ? encoder_params<float>(*encoder) : EncoderParams<float>{};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_conv2d_cuda", [&] {
    ConvArgs<scalar_t> args{geo,
                            x.data_ptr<scalar_t>(),
                            strides_of(x),
                            w.data_ptr<scalar_t>(),
                            b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                            gmap.defined() ? gmap.data_ptr<scalar_t>() : nullptr,
                            out.data_ptr<scalar_t>(),
                            strides_of(out),
                            y != nullptr ? y->data_ptr<scalar_t>() : nullptr,
                            y != nullptr ? strides_of(*y) : Strides4{}};
    const int64_t pixel_tiles = ceil_div(geo.pixels(), kTileN);
    check_grid(geo.groups * pixel_tiles);
    if (mw.defined()) {
      MixArgs<scalar_t> mix{mw.data_ptr<scalar_t>(),
                            mb.defined() ? mb.data_ptr<scalar_t>() : nullptr, mw.size(0)};
      gated_conv2d_mix_fwd_kernel<scalar_t>
          <<<dim3(pixel_tiles), kThreads, 0, stream>>>(args, mix);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const dim3 grid(geo.groups * pixel_tiles, ceil_div(geo.out_per_group(), kTileM));
    if (encoder != nullptr) {
      launch_encoder_kernel(grid, stream, args, enc);
    } else {
      gated_conv2d_fwd_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(args, enc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor empty_output(const ConvGeometry& geo, int64_t channels, const at::Tensor& input) {
  return at::empty({geo.batch, channels, geo.out_h, geo.out_w},
                   input.options().memory_format(output_memory_format(input)));
}

// The ungated convolution y = conv + bias (the recompute of backward).
at::Tensor conv_plus_bias(const ConvGeometry& geo, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  auto y = empty_output(geo, geo.channels, input);
  launch_forward(geo, input, weight, bias, at::Tensor(), nullptr, std::nullopt, std::nullopt, y,
                 nullptr);
  return y;
}

// gated_conv2d_backward without a mix: grad_out is the gated output's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& gate, const at::Tensor& conv_out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> mask) {
  const auto geo = conv_geometry(input, weight, stride, padding, dilation, groups);
  check_gated_backward_shapes(grad_out, conv_out, input, weight, geo.out_h, geo.out_w);
  const auto dtype = input.scalar_type();
  const auto acc_dtype = compute_dtype(dtype);
  const auto fmt = output_memory_format(input);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool need_bias = mask[2] && bias.has_value();
  const int64_t P = geo.pixels(), K = geo.reduction();
  const auto g = gate.contiguous();
  auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = empty(), grad_weight = empty(), grad_bias = empty(),
             grad_gate = empty();

  at::Tensor y, dgate, bias_parts;
  if (mask[3]) {
    y = conv_out.numel() > 0 ? conv_out : conv_plus_bias(geo, input, weight, bias);
    dgate = at::empty({geo.channels, P}, input.options().dtype(acc_dtype));
  }
  if (need_bias) bias_parts = at::empty({geo.channels, P}, input.options().dtype(acc_dtype));
  if (mask[0]) grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
  const int64_t chunks_target = std::max<int64_t>(
      1, kWeightGradBlocks / std::max<int64_t>(1, groups * ceil_div(K, kTileN) *
                                                      ceil_div(geo.out_per_group(), kTileM)));
  const int64_t R = geo.batch * P;
  const int64_t chunks =
      std::max<int64_t>(1, std::min(chunks_target, ceil_div(R, kMinChunk)));
  const int64_t chunk_len = std::max<int64_t>(1, ceil_div(R, chunks));
  at::Tensor weight_parts;
  if (mask[1]) {
    weight_parts = at::empty({chunks, geo.channels, K}, input.options().dtype(acc_dtype));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gated_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* dp = grad_out.data_ptr<scalar_t>();
    const Strides4 ds = strides_of(grad_out);
    if ((dgate.defined() || bias_parts.defined()) && geo.channels * P > 0) {
      const int64_t blocks = std::min<int64_t>(ceil_div(geo.channels * P, kThreads), 65535);
      gated_conv2d_bwd_gate_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          geo, dp, ds, y.defined() ? y.data_ptr<scalar_t>() : nullptr,
          y.defined() ? strides_of(y) : Strides4{}, gp,
          dgate.defined() ? dgate.data_ptr<acc_t>() : nullptr,
          bias_parts.defined() ? bias_parts.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (mask[0] && grad_input.numel() > 0) {
      const auto w = weight.contiguous();
      check_grid(groups * geo.batch * ceil_div(geo.height * geo.width, kTileN));
      const dim3 grid(groups * geo.batch * ceil_div(geo.height * geo.width, kTileN),
                      ceil_div(geo.in_per_group(), kTileM));
      gated_conv2d_bwd_input_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          geo, dp, ds, gp, w.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(),
          strides_of(grad_input));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (mask[1] && weight_parts.numel() > 0) {
      check_grid(groups * chunks * ceil_div(K, kTileN));
      const dim3 grid(groups * chunks * ceil_div(K, kTileN),
                      ceil_div(geo.out_per_group(), kTileM));
      gated_conv2d_bwd_weight_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          geo, dp, ds, gp, input.data_ptr<scalar_t>(), strides_of(input), chunks, chunk_len,
          weight_parts.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // Launched for every non-empty gradient: the kernels write zeros where there is nothing
  // to sum (no image, no channel, K = 0).
  if (mask[1]) grad_weight = weight_parts.sum(0).view(weight.sizes()).to(dtype);
  if (need_bias) grad_bias = bias_parts.sum(1).to(dtype);
  if (mask[3]) grad_gate = dgate.view({geo.channels, geo.out_h, geo.out_w}).to(dtype);
  return {grad_input, grad_weight, grad_bias, grad_gate};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& mix_weight,
    const std::optional<at::Tensor>& mix_bias, bool save_conv) {
  check_gated_conv2d_args(input, weight, bias, gate, stride, padding, dilation, groups);
  check_mix_args(mix_weight, mix_bias, input, weight.size(0));
  const c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto geo = conv_geometry(input, weight, stride, padding, dilation, groups);
  auto y = save_conv ? empty_output(geo, geo.channels, input) : at::empty({0}, input.options());
  at::Tensor* y_out = save_conv ? &y : nullptr;
  if (mix_weight && geo.channels <= kCudaMaxMixChannels) {
    auto out = empty_output(geo, mix_weight->size(0), input);
    launch_forward(geo, input, weight, bias, gate, nullptr, mix_weight, mix_bias, out, y_out);
    return {out, y};
  }
  auto out = empty_output(geo, geo.channels, input);
  launch_forward(geo, input, weight, bias, gate, nullptr, std::nullopt, std::nullopt, out, y_out);
  if (mix_weight) out = apply_mix(out, *mix_weight, mix_bias);
  return {out, y};
}

std::tuple<at::Tensor, at::Tensor> gated_conv2d_encoder_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const EncoderSpec& encoder, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool save_conv) {
  const c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto geo = conv_geometry(input, weight, stride, padding, dilation, groups);
  auto y = save_conv ? empty_output(geo, geo.channels, input) : at::empty({0}, input.options());
  auto out = empty_output(geo, geo.channels, input);
  launch_forward(geo, input, weight, bias, at::Tensor(), &encoder, std::nullopt, std::nullopt,
                 out, save_conv ? &y : nullptr);
  return {out, y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& gate, const at::Tensor& conv_out,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups,
                           const std::optional<at::Tensor>& mix_weight,
                           const std::optional<at::Tensor>& mix_bias,
                           std::array<bool, 6> output_mask) {
  check_gated_conv2d_args(input, weight, bias, gate, stride, padding, dilation, groups);
  check_mix_args(mix_weight, mix_bias, input, weight.size(0));
  TORCH_CHECK(grad_out.device() == input.device() && conv_out.device() == input.device(),
              "gated_conv2d_backward: grad_out and conv_out must be on the input's device (",
              input.device(), "); got ", grad_out.device(), " and ", conv_out.device());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(),
              "gated_conv2d_backward: grad_out must have the input's dtype (",
              input.scalar_type(), "); got ", grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return gated_backward_with_mix(
      grad_out, gate, conv_out, mix_weight, mix_bias, output_mask,
      [&](const at::Tensor& grad_gated, const at::Tensor& conv, std::array<bool, 4> mask) {
        return gated_backward(grad_gated, input, weight, bias, gate, conv, stride, padding,
                              dilation, groups, mask);
      },
      [&] {
        return conv_plus_bias(conv_geometry(input, weight, stride, padding, dilation, groups),
                              input, weight, bias);
      });
}

TORCH_LIBRARY_IMPL(coordgate_ext, CUDA, m) {
  m.impl("gated_conv2d", &gated_conv2d_cuda);
  m.impl("gated_conv2d_backward", &gated_conv2d_backward_cuda);
}

}  // namespace coordgate
