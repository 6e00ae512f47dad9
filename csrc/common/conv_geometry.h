// Index arithmetic of the 2-D convolution, shared by the CPU and CUDA kernels.
//
// The convolution is an implicit GEMM: output pixel p = (oh, ow) of image n and output
// channel c (of group g) is the dot product, over the reduction index k in [0, K) with
// K = Cin/groups * kh * kw, of weight[c, k] and the input value that tap k reads at p.
// Every kernel that gathers the input for (p, k), scatters back to it, or walks a tensor
// through its strides does it through these functions.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace coordgate {

// nn.Conv2d's arguments and the sizes they imply. Built on the host (from_tensors in
// csrc/ops.h), passed by value to the kernels.
struct ConvGeometry {
  int64_t batch, in_channels, height, width;  // input (N, Cin, H, W)
  int64_t channels, kernel_h, kernel_w;       // weight (C, Cin/groups, kh, kw)
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups;

  C10_HOST_DEVICE int64_t in_per_group() const { return in_channels / groups; }
  C10_HOST_DEVICE int64_t out_per_group() const { return channels / groups; }
  // K: the length of one output value's dot product.
  C10_HOST_DEVICE int64_t reduction() const { return in_per_group() * kernel_h * kernel_w; }
  C10_HOST_DEVICE int64_t pixels() const { return out_h * out_w; }
  C10_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
};

// Element strides of a 4-D (n, c, h, w) tensor: NCHW, channels_last and sliced views alike.
struct Strides4 {
  int64_t n, c, h, w;

  C10_HOST_DEVICE int64_t offset(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// The input row (column) that output row (column) o reads through kernel tap u:
// o * stride + u * dilation - pad. It may lie in the zero padding (outside [0, size)).
C10_HOST_DEVICE inline int64_t conv_input_index(int64_t o, int64_t u, int64_t stride,
                                                int64_t dilation, int64_t pad) {
  return o * stride + u * dilation - pad;
}

// The output row (column) whose tap u reads input row (column) i, if one exists: the
// inverse of conv_input_index, used by the input gradient's gather. False when i is
// skipped by the stride or the output would fall outside [0, out_size).
C10_HOST_DEVICE inline bool conv_output_index(int64_t i, int64_t u, int64_t stride,
                                              int64_t dilation, int64_t pad, int64_t out_size,
                                              int64_t* o) {
  const int64_t t = i + pad - u * dilation;
  if (t < 0 || t % stride != 0) return false;
  *o = t / stride;
  return *o < out_size;
}

// Reduction index k of the weight layout (C, Cin/groups, kh, kw) split into the input
// channel within the group and the kernel tap: k = (ci * kh + u) * kw + v.
struct Tap {
  int64_t ci, u, v;
};

C10_HOST_DEVICE inline Tap reduction_tap(const ConvGeometry& g, int64_t k) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t t = k % taps;
  return {k / taps, t / g.kernel_w, t % g.kernel_w};
}

// Offset in the input of the value that tap (ci, u, v) of group `group` reads at output
// pixel (oh, ow) of image n, or -1 where the tap falls in the zero padding.
C10_HOST_DEVICE inline int64_t conv_gather_offset(const ConvGeometry& g, const Strides4& s,
                                                  int64_t n, int64_t group, const Tap& tap,
                                                  int64_t oh, int64_t ow) {
  const int64_t ih = conv_input_index(oh, tap.u, g.stride_h, g.dilation_h, g.pad_h);
  const int64_t iw = conv_input_index(ow, tap.v, g.stride_w, g.dilation_w, g.pad_w);
  if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return -1;
  return s.offset(n, group * g.in_per_group() + tap.ci, ih, iw);
}

// The same for reduction index k.
C10_HOST_DEVICE inline int64_t conv_gather_offset(const ConvGeometry& g, const Strides4& s,
                                                  int64_t n, int64_t group, int64_t k,
                                                  int64_t oh, int64_t ow) {
  return conv_gather_offset(g, s, n, group, reduction_tap(g, k), oh, ow);
}

// Offset in grad_out of the value that input pixel (ih, iw) receives through tap (u, v)
// from output channel c of image n, or -1 where no output pixel reads it through that tap.
C10_HOST_DEVICE inline int64_t conv_scatter_offset(const ConvGeometry& g, const Strides4& s,
                                                   int64_t n, int64_t c, int64_t u, int64_t v,
                                                   int64_t ih, int64_t iw, int64_t* pixel) {
  int64_t oh, ow;
  if (!conv_output_index(ih, u, g.stride_h, g.dilation_h, g.pad_h, g.out_h, &oh) ||
      !conv_output_index(iw, v, g.stride_w, g.dilation_w, g.pad_w, g.out_w, &ow)) {
    return -1;
  }
  *pixel = oh * g.out_w + ow;
  return s.offset(n, c, oh, ow);
}

}  // namespace coordgate
