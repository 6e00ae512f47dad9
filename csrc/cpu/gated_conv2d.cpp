// CPU kernels of coordgate_ext::gated_conv2d and gated_conv2d_backward.
//
// The convolution itself is ATen's (oneDNN / the CPU's best GEMM): on the CPU the bound is
// the bare convolution, and the fused work is what surrounds it. Forward: the gate (bias
// included, which the convolution has already added) is applied in one pass, in place when
// the ungated output is not needed by backward. Backward: one pass over grad_out forms
// dy = grad_out * gate and the gate gradient dg = sum_n grad_out * y together, then ATen's
// convolution backward takes dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <array>

#include "../ops.h"
#include "kernels.h"
#include "output_cache.h"

namespace coordgate {
namespace {

// Pixels per work item of the NCHW passes: large enough to amortise scheduling, small
// enough to balance two cores on a few channels.
constexpr int64_t kPixelBlock = 4096;

// out[n, c, p] = y[n, c, p] * gate[c, p]; y and out are (N, C, P) contiguous (NCHW) or
// (N, P, C) contiguous (channels_last). gate is (C, P) for NCHW, (P, C) for channels_last.
template <typename T>
void gate_multiply_kernel(const T* y, const T* gate, T* out, int64_t N, int64_t C, int64_t P,
                          bool channels_last) {
  if (!channels_last) {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const T* g = gate + (k % C) * P;
        const T* yk = y + k * P;
        T* ok = out + k * P;
        for (int64_t p = 0; p < P; ++p) ok[p] = yk[p] * g[p];
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kPixelBlock / C);
    at::parallel_for(0, N * P, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const T* g = gate + (k % P) * C;
        const T* yk = y + k * C;
        T* ok = out + k * C;
        for (int64_t c = 0; c < C; ++c) ok[c] = yk[c] * g[c];
      }
    });
  }
}

// One pass over grad_out: dy = dout * gate (if dy != nullptr) and
// dgate = sum_n dout * y (if dgate != nullptr; N >= 1, every element is written). Layouts as
// in gate_multiply_kernel; dgate has the gate's layout. Each dgate element is summed over n by
// one thread in a fixed order.
template <typename T>
void gate_backward_kernel(const T* dout, const T* y, const T* gate, T* dy, T* dgate, int64_t N,
                          int64_t C, int64_t P, bool channels_last) {
  if (!channels_last) {
    const int64_t blocks = (P + kPixelBlock - 1) / kPixelBlock;
    at::parallel_for(0, C * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t c = k / blocks;
        const int64_t p0 = (k % blocks) * kPixelBlock;
        const int64_t p1 = std::min(P, p0 + kPixelBlock);
        const T* g = gate + c * P;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * C + c) * P;
          const T* d = dout + base;
          if (dy != nullptr) {
            T* dyk = dy + base;
            for (int64_t p = p0; p < p1; ++p) dyk[p] = d[p] * g[p];
          }
          if (dgate != nullptr) {
            const T* yk = y + base;
            T* dg = dgate + c * P;
            if (n == 0) {
              for (int64_t p = p0; p < p1; ++p) dg[p] = d[p] * yk[p];
            } else {
              for (int64_t p = p0; p < p1; ++p) dg[p] += d[p] * yk[p];
            }
          }
        }
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kPixelBlock / C);
    at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T* g = gate + p * C;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t base = (n * P + p) * C;
          const T* d = dout + base;
          if (dy != nullptr) {
            T* dyk = dy + base;
            for (int64_t c = 0; c < C; ++c) dyk[c] = d[c] * g[c];
          }
          if (dgate != nullptr) {
            const T* yk = y + base;
            T* dg = dgate + p * C;
            if (n == 0) {
              for (int64_t c = 0; c < C; ++c) dg[c] = d[c] * yk[c];
            } else {
              for (int64_t c = 0; c < C; ++c) dg[c] += d[c] * yk[c];
            }
          }
        }
      }
    });
  }
}

// The gate laid out as the kernels above read it: (C, P) for NCHW, (P, C) for channels_last.
at::Tensor gate_layout(const at::Tensor& gate, at::ScalarType dtype, bool channels_last) {
  auto g = gate.to(dtype);
  return channels_last ? g.permute({1, 2, 0}).contiguous() : g.contiguous();
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w,
                        const std::optional<at::Tensor>& b, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        at::MemoryFormat fmt) {
  return at::convolution(x, w, b, stride, padding, dilation, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups)
      .contiguous(fmt);
}

std::optional<at::Tensor> cast_optional(const std::optional<at::Tensor>& t,
                                        at::ScalarType dtype) {
  if (!t) return std::nullopt;
  return t->to(dtype);
}

// gated_conv2d_backward by the implicit-GEMM engine; x, w, b in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> implicit_gemm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
    const std::optional<at::Tensor>& b, const at::Tensor& gate, const at::Tensor& conv_out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> output_mask, at::ScalarType dtype, at::MemoryFormat fmt) {
  const auto geo = conv_geometry(x, w, stride, padding, dilation, groups);
  const auto cdtype = x.scalar_type();
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const int64_t tiles = implicit_gemm_tiles(geo), cg = geo.out_per_group();
  const int64_t tiles_per_group = tiles / groups;
  ImplicitGemmGrads grads;
  if (output_mask[0]) grads.input = at::empty(x.sizes(), opts).contiguous(fmt);
  if (output_mask[1]) grads.weight_parts = at::empty({tiles, cg, geo.reduction()}, opts);
  if (output_mask[2] && b) grads.bias_parts = at::empty({tiles, cg}, opts);
  if (output_mask[3]) grads.gate = at::empty({geo.channels, geo.pixels()}, opts);
  implicit_gemm_backward(geo, grad_out.to(cdtype), x, w, b, gate.to(cdtype),
                         output_mask[3] && conv_out.numel() > 0 ? conv_out.to(cdtype)
                                                                : at::Tensor(),
                         grads);
  auto empty = [&] { return at::empty({0}, x.options().dtype(dtype)); };
  at::Tensor grad_input = empty(), grad_weight = empty(), grad_bias = empty(),
             grad_gate = empty();
  if (output_mask[0]) grad_input = grads.input.to(dtype);
  if (output_mask[1]) {
    grad_weight = grads.weight_parts.view({groups, tiles_per_group, cg, geo.reduction()})
                      .sum(1)
                      .view(w.sizes())
                      .to(dtype);
  }
  if (grads.bias_parts.defined()) {
    grad_bias = grads.bias_parts.view({groups, tiles_per_group, cg}).sum(1).view({-1}).to(dtype);
  }
  if (output_mask[3]) grad_gate = grads.gate.view(gate.sizes()).to(dtype);
  return {grad_input, grad_weight, grad_bias, grad_gate};
}

// The gated output in the compute dtype, mixed when a mix is given.
at::Tensor mixed(const at::Tensor& gated, const std::optional<at::Tensor>& mix_weight,
                 const std::optional<at::Tensor>& mix_bias, at::ScalarType cdtype) {
  if (!mix_weight) return gated;
  return apply_mix(gated, mix_weight->to(cdtype), cast_optional(mix_bias, cdtype));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& mix_weight,
    const std::optional<at::Tensor>& mix_bias, bool save_conv) {
  check_gated_conv2d_args(input, weight, bias, gate, stride, padding, dilation, groups);
  check_mix_args(mix_weight, mix_bias, input, weight.size(0));
  // The kernels call ATen ops: keep them off the autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dtype = input.scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const auto fmt = output_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto geo = conv_geometry(input, weight, stride, padding, dilation, groups);
  if (implicit_gemm_forward_for(cdtype, geo)) {
    const std::vector<int64_t> shape{geo.batch, geo.channels, geo.out_h, geo.out_w};
    auto out = empty_cached(shape, cdtype, fmt);
    auto y = save_conv ? empty_cached(shape, cdtype, fmt) : at::Tensor();
    implicit_gemm_forward(geo, input.to(cdtype), weight.to(cdtype), cast_optional(bias, cdtype),
                          gate.to(cdtype), nullptr, out, save_conv ? &y : nullptr);
    return {mixed(out, mix_weight, mix_bias, cdtype).to(dtype),
            save_conv ? y.to(dtype) : at::empty({0}, input.options())};
  }
  const auto y = conv_forward(input.to(cdtype), weight.to(cdtype), cast_optional(bias, cdtype),
                              stride, padding, dilation, groups, fmt);
  // In place when backward does not need the ungated convolution.
  auto out = save_conv || cdtype != dtype ? empty_cached(y.sizes(), cdtype, fmt) : y;
  const auto g = gate_layout(gate, cdtype, channels_last);
  const int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "gated_conv2d_cpu", [&] {
    gate_multiply_kernel<scalar_t>(y.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                   out.data_ptr<scalar_t>(), N, C, P, channels_last);
  });
  auto conv_out = save_conv ? y.to(dtype) : at::empty({0}, input.options());
  return {mixed(out, mix_weight, mix_bias, cdtype).to(dtype), conv_out};
}

namespace {

// gated_conv2d_backward without a mix: grad_out is the gated output's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& gate, const at::Tensor& conv_out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> output_mask) {
  const auto [out_h, out_w] =
      check_gated_conv2d_args(input, weight, bias, gate, stride, padding, dilation, groups);
  // The kernels call ATen ops: keep them off the autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_gated_backward_shapes(grad_out, conv_out, input, weight, out_h, out_w);
  const int64_t N = input.size(0), C = weight.size(0), P = out_h * out_w;
  const auto dtype = input.scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const auto fmt = output_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const bool need_conv_grads = output_mask[0] || output_mask[1] || (output_mask[2] && bias);
  const auto x = input.to(cdtype);
  const auto w = weight.to(cdtype);
  const auto b = cast_optional(bias, cdtype);

  if (implicit_gemm_backward_for(cdtype)) {
    return implicit_gemm_backward_cpu(grad_out, x, w, b, gate, conv_out, stride, padding,
                                      dilation, groups, output_mask, dtype, fmt);
  }
  at::Tensor dy, dgate, y;
  const auto dout = grad_out.to(cdtype).contiguous(fmt);
  if (need_conv_grads) dy = empty_cached(dout.sizes(), cdtype, fmt);
  if (output_mask[3]) {
    y = conv_out.numel() == 0
            ? conv_forward(x, w, b, stride, padding, dilation, groups, fmt)
            : conv_out.to(cdtype).contiguous(fmt);
    dgate = channels_last ? empty_cached({P, C}, cdtype, at::MemoryFormat::Contiguous)
                          : empty_cached({C, P}, cdtype, at::MemoryFormat::Contiguous);
    if (N == 0) dgate.zero_();
  }
  const auto g = gate_layout(gate, cdtype, channels_last);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "gated_conv2d_backward_cpu", [&] {
    gate_backward_kernel<scalar_t>(
        dout.data_ptr<scalar_t>(), y.defined() ? y.data_ptr<scalar_t>() : nullptr,
        g.data_ptr<scalar_t>(), dy.defined() ? dy.data_ptr<scalar_t>() : nullptr,
        dgate.defined() ? dgate.data_ptr<scalar_t>() : nullptr, N, C, P, channels_last);
  });

  // Gradients that were not asked for come back empty (each its own tensor: outputs of an
  // operator never alias one another).
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, input.options());
  at::Tensor grad_bias = at::empty({0}, input.options());
  at::Tensor grad_gate = at::empty({0}, input.options());
  if (need_conv_grads) {
    const std::array<bool, 3> mask{output_mask[0], output_mask[1], output_mask[2] && bias};
    if (N == 0) {
      // ATen's convolution backward does not take an empty batch; its gradients are zero.
      if (mask[0]) grad_input = at::zeros_like(input, fmt);
      if (mask[1]) grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
      if (mask[2]) grad_bias = at::zeros({C}, input.options());
    } else {
      const std::optional<at::IntArrayRef> bias_sizes =
          bias ? std::optional<at::IntArrayRef>(bias->sizes()) : std::nullopt;
      auto [gi, gw, gb] = at::convolution_backward(dy, x, w, bias_sizes, stride, padding,
                                                   dilation, false, {0, 0}, groups, mask);
      if (mask[0]) grad_input = gi.to(dtype).contiguous(fmt);
      if (mask[1]) grad_weight = gw.to(dtype).contiguous();
      if (mask[2]) grad_bias = gb.to(dtype).contiguous();
    }
  }
  if (output_mask[3]) {
    auto dg = channels_last ? dgate.t().reshape({C, out_h, out_w}) : dgate.view({C, out_h, out_w});
    grad_gate = dg.to(dtype).contiguous();
  }
  return {grad_input, grad_weight, grad_bias, grad_gate};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& gate, const at::Tensor& conv_out,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups,
                          const std::optional<at::Tensor>& mix_weight,
                          const std::optional<at::Tensor>& mix_bias,
                          std::array<bool, 6> output_mask) {
  check_gated_conv2d_args(input, weight, bias, gate, stride, padding, dilation, groups);
  check_mix_args(mix_weight, mix_bias, input, weight.size(0));
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return gated_backward_with_mix(
      grad_out, gate, conv_out, mix_weight, mix_bias, output_mask,
      [&](const at::Tensor& grad_gated, const at::Tensor& conv, std::array<bool, 4> mask) {
        return gated_backward(grad_gated, input, weight, bias, gate, conv, stride, padding,
                              dilation, groups, mask);
      },
      [&] {
        return std::get<1>(gated_conv2d_cpu(input, weight, bias, gate, stride, padding,
                                            dilation, groups, std::nullopt, std::nullopt, true));
      });
}

TORCH_LIBRARY_IMPL(coordgate_ext, CPU, m) {
  m.impl("gated_conv2d", &gated_conv2d_cpu);
  m.impl("gated_conv2d_backward", &gated_conv2d_backward_cpu);
}

}  // namespace coordgate
