// CUDA kernels of coordgate_ext::mlp_gate and mlp_gate_backward.
//
// The encoder is evaluated layer by layer over a slab of at most kSlab pixels: one thread per
// (unit, pixel) computes the unit's pre-activation and activation with the functions of
// csrc/common/coordgate_math.h (encoder_input_unit, dense_unit, activate), activations
// feature-major (units, slab) so that neighbouring threads read neighbouring pixels.
// Backward recomputes a slab's forward, propagates the gradient with dense_unit over the
// transposed weight and backprop_activation, and adds each layer's weight gradient (a GEMM over
// the slab's pixels, ATen's) slab by slab in order: deterministic, and the memory is
// bounded by the slab, not the grid.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../common/coordgate_math.h"
#include "../ops.h"
#include "kernels.h"

namespace coordgate {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSlab = int64_t(1) << 18;
constexpr int64_t kMaxBlocks = 65535;

int64_t blocks_for(int64_t n) { return std::max<int64_t>(1, std::min(kMaxBlocks, (n + kThreads - 1) / kThreads)); }

// One layer over pixels p0 .. p0 + count of the height x width grid: pre (optional) and act,
// (units, count); in is the previous layer's activations (fan_in, count), unused for layer 0,
// which reads the coordinates.
template <typename T>
__global__ void __launch_bounds__(kThreads) encoder_layer_fwd_kernel(
    EncoderParams<T> e, int layer, int64_t height, int64_t width, int64_t p0, int64_t count,
    const T* in, T* pre, T* act) {
  const int64_t units = e.width[layer];
  const int64_t fan_in = layer == 0 ? 2 : e.width[layer - 1];
  const Activation fn = layer + 1 == e.layers ? e.gate : e.hidden;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < units * count; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t o = idx / count, i = idx % count, p = p0 + i;
    const T a = layer == 0
                    ? encoder_input_unit<T>(e.weight[0], e.bias[0], o,
                                            grid_coordinate<T>(p / width, height),
                                            grid_coordinate<T>(p % width, width))
                    : dense_unit(e.weight[layer] + o * fan_in, 1, e.bias[layer][o], in + i,
                                 count, fan_in);
    if (pre != nullptr) pre[idx] = a;
    act[idx] = activate(fn, a);
  }
}

// The grid's coordinates for pixels p0 .. p0 + count: rows r then q, (2, count).
template <typename T>
__global__ void __launch_bounds__(kThreads) grid_coordinates_kernel(int64_t height,
                                                                    int64_t width, int64_t p0,
                                                                    int64_t count, T* coords) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t p = p0 + i;
    coords[i] = grid_coordinate<T>(p / width, height);
    coords[count + i] = grid_coordinate<T>(p % width, width);
  }
}

// delta[c, i] = grad_gate[c, p0 + i] * psi'(pre[c, i]) for the last layer.
template <typename T>
__global__ void __launch_bounds__(kThreads) encoder_output_delta_kernel(
    const T* grad_gate, int64_t pixels, int64_t p0, int64_t count, int64_t channels,
    const T* pre, Activation fn, T* delta) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < channels * count; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = idx / count, i = idx % count;
    delta[idx] = backprop_activation(fn, grad_gate[c * pixels + p0 + i], pre[idx]);
  }
}

// delta_prev[u, i] = (sum_o W[o, u] delta[o, i]) * phi'(pre_prev[u, i]).
template <typename T>
__global__ void __launch_bounds__(kThreads) encoder_layer_bwd_kernel(
    const T* weight, int64_t units, int64_t fan_in, int64_t count, const T* delta,
    const T* pre_prev, Activation fn, T* delta_prev) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < fan_in * count; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t u = idx / count, i = idx % count;
    delta_prev[idx] = backprop_activation(
        fn, dense_unit(weight + u, fan_in, T(0), delta + i, count, units), pre_prev[idx]);
  }
}

EncoderSpec make_encoder(at::TensorList weights, at::TensorList biases, at::ScalarType cdtype,
                         c10::string_view hidden_activation, c10::string_view gate_activation) {
  TORCH_CHECK(weights[0].is_cuda(), "mlp_gate: expected CUDA encoder parameters, got ",
              weights[0].device());
  return encoder_spec(weights, biases, hidden_activation, gate_activation, cdtype);
}

// Forward of one slab: every layer's activations (and pre-activations when pre is given).
template <typename T>
void slab_forward(const EncoderParams<T>& e, int64_t height, int64_t width, int64_t p0,
                  int64_t count, std::vector<at::Tensor>& act, std::vector<at::Tensor>* pre) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int l = 0; l < e.layers; ++l) {
    encoder_layer_fwd_kernel<T><<<blocks_for(e.width[l] * count), kThreads, 0, stream>>>(
        e, l, height, width, p0, count, l == 0 ? nullptr : act[l - 1].data_ptr<T>(),
        pre != nullptr ? (*pre)[l].data_ptr<T>() : nullptr, act[l].data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor mlp_gate_cuda(at::TensorList weights, at::TensorList biases, int64_t height,
                         int64_t width, c10::string_view hidden_activation,
                         c10::string_view gate_activation) {
  check_mlp_args(weights, biases, height, width);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const EncoderSpec enc = make_encoder(weights, biases, cdtype, hidden_activation, gate_activation);
  const int64_t pixels = height * width, channels = weights.back().size(0);
  auto gate = at::empty({channels, pixels}, enc.weight[0].options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_cuda", [&] {
    const auto e = encoder_params<scalar_t>(enc);
    std::vector<at::Tensor> act;
    for (int64_t p0 = 0; p0 < pixels; p0 += kSlab) {
      const int64_t count = std::min(kSlab, pixels - p0);
      act.clear();
      for (int l = 0; l < e.layers; ++l) act.push_back(at::empty({e.width[l], count}, gate.options()));
      slab_forward(e, height, width, p0, count, act, nullptr);
      gate.narrow(1, p0, count).copy_(act.back());
    }
  });
  return gate.view({channels, height, width}).to(dtype);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_gate_backward_cuda(
    const at::Tensor& grad_gate, at::TensorList weights, at::TensorList biases, int64_t height,
    int64_t width, c10::string_view hidden_activation, c10::string_view gate_activation) {
  check_mlp_args(weights, biases, height, width);
  const int64_t channels = weights.back().size(0), pixels = height * width;
  TORCH_CHECK(grad_gate.dim() == 3 && grad_gate.size(0) == channels &&
                  grad_gate.size(1) == height && grad_gate.size(2) == width,
              "mlp_gate_backward: expected grad_gate of shape (", channels, ", ", height, ", ",
              width, "), got ", grad_gate.sizes());
  TORCH_CHECK(grad_gate.device() == weights[0].device(),
              "mlp_gate_backward: grad_gate must be on the parameters' device (",
              weights[0].device(), "), got ", grad_gate.device());
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const EncoderSpec enc = make_encoder(weights, biases, cdtype, hidden_activation, gate_activation);
  const auto gg = grad_gate.to(cdtype).contiguous();
  const auto options = enc.weight[0].options();
  const int L = static_cast<int>(weights.size());
  std::vector<at::Tensor> grad_w, grad_b;
  for (int l = 0; l < L; ++l) {
    grad_w.push_back(at::zeros_like(enc.weight[l]));
    grad_b.push_back(at::zeros_like(enc.bias[l]));
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_backward_cuda", [&] {
    const auto e = encoder_params<scalar_t>(enc);
    std::vector<at::Tensor> act, pre;
    for (int64_t p0 = 0; p0 < pixels; p0 += kSlab) {
      const int64_t count = std::min(kSlab, pixels - p0);
      act.clear();
      pre.clear();
      for (int l = 0; l < L; ++l) {
        act.push_back(at::empty({e.width[l], count}, options));
        pre.push_back(at::empty({e.width[l], count}, options));
      }
      slab_forward(e, height, width, p0, count, act, &pre);
      auto coords = at::empty({2, count}, options);
      grid_coordinates_kernel<scalar_t><<<blocks_for(count), kThreads, 0, stream>>>(
          height, width, p0, count, coords.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto delta = at::empty({channels, count}, options);
      encoder_output_delta_kernel<scalar_t><<<blocks_for(channels * count), kThreads, 0, stream>>>(
          gg.data_ptr<scalar_t>(), pixels, p0, count, channels, pre[L - 1].data_ptr<scalar_t>(),
          e.gate, delta.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (int l = L - 1; l >= 0; --l) {
        const auto& input = l == 0 ? coords : act[l - 1];
        grad_w[l].addmm_(delta, input.t());
        grad_b[l].add_(delta.sum(1));
        if (l == 0) break;
        const int64_t fan_in = input.size(0);
        auto delta_prev = at::empty({fan_in, count}, options);
        encoder_layer_bwd_kernel<scalar_t><<<blocks_for(fan_in * count), kThreads, 0, stream>>>(
            enc.weight[l].data_ptr<scalar_t>(), e.width[l], fan_in, count,
            delta.data_ptr<scalar_t>(), pre[l - 1].data_ptr<scalar_t>(), e.hidden,
            delta_prev.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        delta = delta_prev;
      }
    }
  });
  for (int l = 0; l < L; ++l) {
    grad_w[l] = grad_w[l].to(dtype);
    grad_b[l] = grad_b[l].to(dtype);
  }
  return {grad_w, grad_b};
}

TORCH_LIBRARY_IMPL(coordgate_ext, CUDA, m) {
  m.impl("mlp_gate", &mlp_gate_cuda);
  m.impl("mlp_gate_backward", &mlp_gate_backward_cuda);
}

}  // namespace coordgate
