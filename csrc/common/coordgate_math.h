// Per-element maths of CoordGate shared by the CPU and CUDA kernels.
//
// Everything here is C10_HOST_DEVICE so that the CPU kernels (tested directly) run the
// same code the GPU kernels will: coordinates of the output grid, the encoder's layers, its
// activations and their derivatives, the gate's application and the terms of its backward.
// The convolution's index arithmetic is in conv_geometry.h.
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
    // NaN passes, as torch.relu lets it.
    return a < T(0) ? T(0) : a;
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
    // torch's relu backward passes the gradient where the output is not <= 0: NaN included.
    return a <= T(0) ? T(0) : T(1);
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

// grad * phi'(a): the gradient through the activation, as PyTorch's autograd forms it. relu
// selects (torch's threshold_backward: zero where the output is <= 0, even for a NaN or
// infinite grad); the others multiply, so 0 * inf = NaN propagates as in torch.
template <Activation A, typename T>
C10_HOST_DEVICE inline T backprop_activation(T grad, T a) {
  if constexpr (A == Activation::kRelu) {
    return a <= T(0) ? T(0) : grad;
  } else if constexpr (A == Activation::kNone) {
    return grad;
  } else {
    return grad * activate_grad<A>(a);
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

// phi(a) and phi'(a) for an activation known only at run time (inside GPU kernels, where one
// kernel serves every activation and the switch costs nothing next to the convolution).
template <typename T>
C10_HOST_DEVICE inline T activate(Activation act, T a) {
  return with_activation(act, [&](auto A) { return activate<decltype(A)::value>(a); });
}

template <typename T>
C10_HOST_DEVICE inline T backprop_activation(Activation act, T grad, T a) {
  return with_activation(act, [&](auto A) { return backprop_activation<decltype(A)::value>(grad, a); });
}

// Pre-activation of unit o of the encoder's first layer (weight (E, 2) row-major, bias (E))
// at coordinates (r, q): w[o, 0] * r + w[o, 1] * q + b[o].
template <typename T, typename W>
C10_HOST_DEVICE inline T encoder_input_unit(const W* weight, const W* bias, int64_t o, T r,
                                            T q) {
  return static_cast<T>(weight[2 * o]) * r + static_cast<T>(weight[2 * o + 1]) * q +
         static_cast<T>(bias[o]);
}

// bias + sum_i w[i * w_stride] * x[i * x_stride], accumulated in T: one unit of a dense
// layer (w a row of an (out, in) weight, w_stride 1), or of its transpose (w a column,
// w_stride = out) in backward. Also the 1x1 channel mix.
template <typename T, typename W, typename X>
C10_HOST_DEVICE inline T dense_unit(const W* w, int64_t w_stride, T bias, const X* x,
                                    int64_t x_stride, int64_t n) {
  T acc = bias;
  for (int64_t i = 0; i < n; ++i) {
    acc += static_cast<T>(w[i * w_stride]) * static_cast<T>(x[i * x_stride]);
  }
  return acc;
}

// The gated output of one convolution value: (conv + bias) * gate (the bias is gated too).
template <typename T>
C10_HOST_DEVICE inline T gated_output(T conv, T bias, T gate) {
  return (conv + bias) * gate;
}

// Backward of out = y * gate at one element: the gradient reaching the convolution
// (dy = dout * gate) and one image's term of the gate's gradient (dgate += dout * y).
template <typename T>
C10_HOST_DEVICE inline T conv_grad_term(T dout, T gate) {
  return dout * gate;
}

template <typename T>
C10_HOST_DEVICE inline T gate_grad_term(T dout, T y) {
  return dout * y;
}

// The MLP coordinate encoder as the kernels read it: L layers, layer l's weight row-major
// (width[l], width[l-1]) with width[-1] = 2, its bias (width[l]); phi between layers, psi at
// the end. The pointers are host or device pointers, to match the kernel that reads them.
constexpr int kMaxEncoderLayers = 8;

template <typename W>
struct EncoderParams {
  const W* weight[kMaxEncoderLayers];
  const W* bias[kMaxEncoderLayers];
  int64_t width[kMaxEncoderLayers];
  int layers;
  Activation hidden, gate;
};

// Which of encoder_hidden's two buffers ends up holding the last hidden activations
// (nullptr for a one-layer encoder): layer 0 writes a, each further hidden layer swaps.
template <typename T>
C10_HOST_DEVICE inline T* encoder_hidden_result(int layers, T* a, T* b) {
  if (layers == 1) return nullptr;
  return (layers - 2) % 2 == 0 ? a : b;
}

// Runs every layer but the last at coordinates (r, q), ping-ponging between the buffers a
// and b (feature f at [f * stride], each at least max(width) long), and returns
// encoder_hidden_result(layers, a, b); threads that share the buffers column by column
// can ask encoder_hidden_result instead.
template <typename T, typename W>
C10_HOST_DEVICE inline T* encoder_hidden(const EncoderParams<W>& e, T r, T q, T* a, T* b,
                                         int64_t stride) {
  if (e.layers == 1) return nullptr;
  for (int64_t o = 0; o < e.width[0]; ++o) {
    a[o * stride] = activate(e.hidden, encoder_input_unit<T>(e.weight[0], e.bias[0], o, r, q));
  }
  T* in = a;
  T* out = b;
  for (int l = 1; l + 1 < e.layers; ++l) {
    const int64_t fan_in = e.width[l - 1];
    for (int64_t o = 0; o < e.width[l]; ++o) {
      out[o * stride] = activate(e.hidden, dense_unit(e.weight[l] + o * fan_in, 1,
                                                      static_cast<T>(e.bias[l][o]), in, stride,
                                                      fan_in));
    }
    T* t = in;
    in = out;
    out = t;
  }
  return encoder_hidden_result(e.layers, a, b);
}

// The gate of channel c at coordinates (r, q): psi of the last layer applied to the hidden
// activations that encoder_hidden returned.
template <typename T, typename W>
C10_HOST_DEVICE inline T encoder_gate(const EncoderParams<W>& e, int64_t c, const T* hidden,
                                      int64_t stride, T r, T q) {
  const int last = e.layers - 1;
  if (last == 0) {
    return activate(e.gate, encoder_input_unit<T>(e.weight[0], e.bias[0], c, r, q));
  }
  const int64_t fan_in = e.width[last - 1];
  return activate(e.gate, dense_unit(e.weight[last] + c * fan_in, 1,
                                     static_cast<T>(e.bias[last][c]), hidden, stride, fan_in));
}

// Output length of a convolution along one dimension (nn.Conv2d's formula).
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride,
                                             int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace coordgate
