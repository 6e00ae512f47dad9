// Per-element maths of CoordGate shared by the CPU and CUDA kernels.
//
// Everything here is C10_HOST_DEVICE so that the CPU kernels (tested directly) run the
// same code the GPU kernels will: coordinates of the output grid, the encoder activations
// and their derivatives, and the output size of a convolution.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

// linspace(-1, 1, n)[i], evaluated as torch.linspace does (from the nearer end), so that the
// kernels and the reference see the same coordinates up to rounding.
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

// phi(a) for a compile-time activation (gelu is the exact, erf form; softplus has beta 1 and
// threshold 20, as torch.nn.functional.softplus).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activate(T a) {
  if constexpr (A == Activation::kRelu) {
    return a > T(0) ? a : T(0);
  } else if constexpr (A == Activation::kSigmoid) {
    return sigmoid(a);
  } else if constexpr (A == Activation::kTanh) {
    return ::tanh(a);
  } else if constexpr (A == Activation::kSilu) {
    return a * sigmoid(a);
  } else if constexpr (A == Activation::kGelu) {
    return T(0.5) * a * (T(1) + ::erf(a * T(M_SQRT1_2)));
  } else if constexpr (A == Activation::kSoftplus) {
    return a > T(20) ? a : ::log1p(::exp(a));
  } else {
    return a;
  }
}

// d phi(a) / d a, as a function of the pre-activation a.
template <Activation A, typename T>
C10_HOST_DEVICE inline T activate_grad(T a) {
  if constexpr (A == Activation::kRelu) {
    return a > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kSigmoid) {
    const T s = sigmoid(a);
    return s * (T(1) - s);
  } else if constexpr (A == Activation::kTanh) {
    const T t = ::tanh(a);
    return T(1) - t * t;
  } else if constexpr (A == Activation::kSilu) {
    const T s = sigmoid(a);
    return s * (T(1) + a * (T(1) - s));
  } else if constexpr (A == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + ::erf(a * T(M_SQRT1_2)));
    const T pdf = ::exp(T(-0.5) * a * a) * T(0.3989422804014327);  // 1 / sqrt(2 pi)
    return cdf + a * pdf;
  } else if constexpr (A == Activation::kSoftplus) {
    return a > T(20) ? T(1) : sigmoid(a);
  } else {
    return T(1);
  }
}

// Calls f(std::integral_constant<Activation, act>{}): a runtime activation turned into a
// compile-time one, so that loops over pixels carry no branch on it.
template <typename F>
C10_HOST_DEVICE inline decltype(auto) with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSigmoid:
      return f(std::integral_constant<Activation, Activation::kSigmoid>{});
    case Activation::kTanh:
      return f(std::integral_constant<Activation, Activation::kTanh>{});
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu:
      return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kSoftplus:
      return f(std::integral_constant<Activation, Activation::kSoftplus>{});
    case Activation::kNone:
    default:
      return f(std::integral_constant<Activation, Activation::kNone>{});
  }
}

// Output length of a convolution along one dimension (nn.Conv2d's formula).
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride,
                                             int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace coordgate
