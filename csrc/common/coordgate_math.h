// Per-element maths of CoordGate shared by the CPU and CUDA kernels.
//
// Everything here is C10_HOST_DEVICE so that the CPU kernels (tested directly) run the
// same code the GPU kernels will: coordinates of the output grid, the encoder activations
// and their derivatives, and the output size of a convolution.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace coordgate {

// Activation codes, in the order of kActivationNames in csrc/ops.cpp and of
// coordgate_ext.reference.ACTIVATIONS.
enum class Activation : int64_t {
  kNone = 0,
  kRelu = 1,
  kSigmoid = 2,
  kTanh = 3,
  kSilu = 4,
  kGelu = 5,
  kSoftplus = 6,
};

// linspace(-1, 1, n)[i], evaluated exactly as torch.linspace does (from the nearer end), so
// that the kernels and the reference see the same coordinates.
template <typename T>
C10_HOST_DEVICE inline T grid_coordinate(int64_t i, int64_t n) {
  if (n <= 1) {
    return T(-1);
  }
  const T step = T(2) / static_cast<T>(n - 1);
  const int64_t half = n / 2;
  return i < half ? T(-1) + step * static_cast<T>(i)
                  : T(1) - step * static_cast<T>(n - 1 - i);
}

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T a) {
  return T(1) / (T(1) + ::exp(-a));
}

template <typename T>
C10_HOST_DEVICE inline T activate(Activation act, T a) {
  switch (act) {
    case Activation::kRelu:
      return a > T(0) ? a : T(0);
    case Activation::kSigmoid:
      return sigmoid(a);
    case Activation::kTanh:
      return ::tanh(a);
    case Activation::kSilu:
      return a * sigmoid(a);
    case Activation::kGelu:
      return T(0.5) * a * (T(1) + ::erf(a * T(M_SQRT1_2)));
    case Activation::kSoftplus:
      // torch.nn.functional.softplus with beta=1, threshold=20.
      return a > T(20) ? a : ::log1p(::exp(a));
    case Activation::kNone:
    default:
      return a;
  }
}

// d activate(a) / d a, as a function of the pre-activation a.
template <typename T>
C10_HOST_DEVICE inline T activate_grad(Activation act, T a) {
  switch (act) {
    case Activation::kRelu:
      return a > T(0) ? T(1) : T(0);
    case Activation::kSigmoid: {
      const T s = sigmoid(a);
      return s * (T(1) - s);
    }
    case Activation::kTanh: {
      const T t = ::tanh(a);
      return T(1) - t * t;
    }
    case Activation::kSilu: {
      const T s = sigmoid(a);
      return s * (T(1) + a * (T(1) - s));
    }
    case Activation::kGelu: {
      const T cdf = T(0.5) * (T(1) + ::erf(a * T(M_SQRT1_2)));
      const T pdf = ::exp(T(-0.5) * a * a) * T(0.3989422804014327);  // 1/sqrt(2 pi)
      return cdf + a * pdf;
    }
    case Activation::kSoftplus:
      return a > T(20) ? T(1) : sigmoid(a);
    case Activation::kNone:
    default:
      return T(1);
  }
}

// Output length of a convolution along one dimension (nn.Conv2d's formula).
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride,
                                             int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace coordgate
