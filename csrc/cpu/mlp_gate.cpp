// CPU kernels of coordgate_ext::mlp_gate and mlp_gate_backward.
//
// The grid's pixels are cut into tiles of kTile pixels. A tile's activations live in small
// structure-of-arrays buffers ([feature][pixel], pixel fastest) so that every layer is a
// short loop nest whose innermost loop runs over kTile contiguous pixels and vectorises.
// Nothing of size (pixels x hidden) is ever allocated: backward recomputes a tile's forward
// before propagating through it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"

namespace coordgate {
namespace {

constexpr int64_t kTile = 64;
// Gradient partial sums are kept per block of a fixed number of pixels and added in block
// order, so the result does not depend on the number of threads.
constexpr int64_t kTilesPerBlock = 16;

template <typename T>
struct Mlp {
  std::vector<const T*> weight, bias;
  std::vector<int64_t> in, out;
  Activation hidden, gate;
  int64_t layers() const { return static_cast<int64_t>(weight.size()); }
};

template <typename T>
Mlp<T> make_mlp(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& b,
                Activation hidden, Activation gate) {
  Mlp<T> m;
  for (size_t l = 0; l < w.size(); ++l) {
    m.weight.push_back(w[l].data_ptr<T>());
    m.bias.push_back(b[l].data_ptr<T>());
    m.out.push_back(w[l].size(0));
    m.in.push_back(w[l].size(1));
  }
  m.hidden = hidden;
  m.gate = gate;
  return m;
}

// y[o][p] = bias[o] + sum_i weight[o][i] * x[i][p] for the kTile pixels p of a tile.
template <typename T>
inline void tile_linear(const T* weight, const T* bias, int64_t in, int64_t out, const T* x,
                        T* y) {
  for (int64_t o = 0; o < out; ++o) {
    T* yo = y + o * kTile;
    const T bo = bias[o];
    for (int64_t p = 0; p < kTile; ++p) yo[p] = bo;
    for (int64_t i = 0; i < in; ++i) {
      const T w = weight[o * in + i];
      const T* xi = x + i * kTile;
      for (int64_t p = 0; p < kTile; ++p) yo[p] += w * xi[p];
    }
  }
}

// Per-thread buffers of one tile: the coordinates, and each layer's pre-activation and
// activation.
template <typename T>
struct TileBuffers {
  std::vector<T> coords;
  std::vector<std::vector<T>> pre, act;
  explicit TileBuffers(const Mlp<T>& m) : coords(2 * kTile) {
    for (int64_t l = 0; l < m.layers(); ++l) {
      pre.emplace_back(m.out[l] * kTile);
      act.emplace_back(m.out[l] * kTile);
    }
  }
};

// Forward through every layer for pixels [p0, p0 + count) of the height x width grid.
// Pixels past count (the last, partial tile) get coordinate 0; their results are not used.
template <typename T>
void tile_forward(const Mlp<T>& m, int64_t p0, int64_t count, int64_t height, int64_t width,
                  TileBuffers<T>& buf) {
  T* r = buf.coords.data();
  T* q = r + kTile;
  for (int64_t p = 0; p < kTile; ++p) {
    const int64_t pixel = p0 + p;
    const bool valid = p < count;
    r[p] = valid ? grid_coordinate<T>(pixel / width, height) : T(0);
    q[p] = valid ? grid_coordinate<T>(pixel % width, width) : T(0);
  }
  const T* x = buf.coords.data();
  for (int64_t l = 0; l < m.layers(); ++l) {
    tile_linear(m.weight[l], m.bias[l], m.in[l], m.out[l], x, buf.pre[l].data());
    const Activation act = l + 1 == m.layers() ? m.gate : m.hidden;
    const T* a = buf.pre[l].data();
    T* h = buf.act[l].data();
    for (int64_t k = 0; k < m.out[l] * kTile; ++k) h[k] = activate(act, a[k]);
    x = h;
  }
}

template <typename T>
void mlp_gate_kernel(const Mlp<T>& m, int64_t height, int64_t width, T* gate) {
  const int64_t pixels = height * width;
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  const int64_t channels = m.out.back();
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    TileBuffers<T> buf(m);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kTile;
      const int64_t count = std::min(kTile, pixels - p0);
      tile_forward(m, p0, count, height, width, buf);
      const T* h = buf.act.back().data();
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t p = 0; p < count; ++p) gate[c * pixels + p0 + p] = h[c * kTile + p];
      }
    }
  });
}

// Accumulates the encoder's parameter gradients of one tile into grad (laid out as
// [W_0, b_0, W_1, b_1, ...], each row-major). grad_gate is (C, pixels) contiguous.
template <typename T>
void tile_backward(const Mlp<T>& m, int64_t p0, int64_t count, int64_t pixels,
                   const T* grad_gate, TileBuffers<T>& buf, std::vector<T>& delta,
                   std::vector<T>& delta_prev, const std::vector<int64_t>& offsets, T* grad) {
  const int64_t L = m.layers();
  const int64_t channels = m.out.back();
  // delta = d loss / d pre-activation of the current layer.
  for (int64_t c = 0; c < channels; ++c) {
    const T* a = buf.pre[L - 1].data() + c * kTile;
    T* d = delta.data() + c * kTile;
    for (int64_t p = 0; p < kTile; ++p) {
      d[p] = p < count ? grad_gate[c * pixels + p0 + p] * activate_grad(m.gate, a[p]) : T(0);
    }
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t in = m.in[l];
    const int64_t out = m.out[l];
    const T* x = l == 0 ? buf.coords.data() : buf.act[l - 1].data();
    T* gw = grad + offsets[l];
    T* gb = gw + out * in;
    for (int64_t o = 0; o < out; ++o) {
      const T* d = delta.data() + o * kTile;
      T sb = T(0);
      for (int64_t p = 0; p < kTile; ++p) sb += d[p];
      gb[o] += sb;
      for (int64_t i = 0; i < in; ++i) {
        const T* xi = x + i * kTile;
        T s = T(0);
        for (int64_t p = 0; p < kTile; ++p) s += d[p] * xi[p];
        gw[o * in + i] += s;
      }
    }
    if (l == 0) break;
    // delta_prev[i] = hidden'(pre_{l-1}[i]) * sum_o W_l[o][i] * delta[o]
    std::fill(delta_prev.begin(), delta_prev.begin() + in * kTile, T(0));
    for (int64_t o = 0; o < out; ++o) {
      const T* d = delta.data() + o * kTile;
      for (int64_t i = 0; i < in; ++i) {
        const T w = m.weight[l][o * in + i];
        T* dp = delta_prev.data() + i * kTile;
        for (int64_t p = 0; p < kTile; ++p) dp[p] += w * d[p];
      }
    }
    const T* a = buf.pre[l - 1].data();
    for (int64_t k = 0; k < in * kTile; ++k) delta_prev[k] *= activate_grad(m.hidden, a[k]);
    std::swap(delta, delta_prev);
  }
}

template <typename T>
void mlp_gate_backward_kernel(const Mlp<T>& m, int64_t height, int64_t width,
                              const T* grad_gate, const std::vector<int64_t>& offsets,
                              int64_t num_params, T* grad) {
  const int64_t pixels = height * width;
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  const int64_t blocks = (tiles + kTilesPerBlock - 1) / kTilesPerBlock;
  int64_t max_width = 2;
  for (int64_t l = 0; l < m.layers(); ++l) max_width = std::max(max_width, m.out[l]);
  std::vector<T> partial(blocks * num_params, T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TileBuffers<T> buf(m);
    std::vector<T> delta(max_width * kTile), delta_prev(max_width * kTile);
    for (int64_t blk = begin; blk < end; ++blk) {
      T* g = partial.data() + blk * num_params;
      const int64_t t_end = std::min(tiles, (blk + 1) * kTilesPerBlock);
      for (int64_t t = blk * kTilesPerBlock; t < t_end; ++t) {
        const int64_t p0 = t * kTile;
        const int64_t count = std::min(kTile, pixels - p0);
        tile_forward(m, p0, count, height, width, buf);
        tile_backward(m, p0, count, pixels, grad_gate, buf, delta, delta_prev, offsets, g);
      }
    }
  });
  std::fill(grad, grad + num_params, T(0));
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const T* g = partial.data() + blk * num_params;
    for (int64_t k = 0; k < num_params; ++k) grad[k] += g[k];
  }
}

std::vector<at::Tensor> to_compute(at::TensorList ts, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.to(dtype).contiguous());
  return out;
}

at::Tensor mlp_gate_cpu(at::TensorList weights, at::TensorList biases, int64_t height,
                        int64_t width, c10::string_view hidden_activation,
                        c10::string_view gate_activation) {
  check_mlp_args(weights, biases, height, width);
  const Activation hidden = parse_activation(hidden_activation);
  const Activation gate_act = parse_activation(gate_activation);
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const auto w = to_compute(weights, cdtype);
  const auto b = to_compute(biases, cdtype);
  const int64_t channels = w.back().size(0);
  auto gate = at::empty({channels, height, width}, w[0].options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_cpu", [&] {
    const auto m = make_mlp<scalar_t>(w, b, hidden, gate_act);
    mlp_gate_kernel<scalar_t>(m, height, width, gate.data_ptr<scalar_t>());
  });
  return gate.to(dtype);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_gate_backward_cpu(
    const at::Tensor& grad_gate, at::TensorList weights, at::TensorList biases, int64_t height,
    int64_t width, c10::string_view hidden_activation, c10::string_view gate_activation) {
  check_mlp_args(weights, biases, height, width);
  const int64_t channels = weights.back().size(0);
  TORCH_CHECK(grad_gate.dim() == 3 && grad_gate.size(0) == channels &&
                  grad_gate.size(1) == height && grad_gate.size(2) == width,
              "mlp_gate_backward: expected grad_gate of shape (", channels, ", ", height, ", ",
              width, "), got ", grad_gate.sizes());
  const Activation hidden = parse_activation(hidden_activation);
  const Activation gate_act = parse_activation(gate_activation);
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const auto w = to_compute(weights, cdtype);
  const auto b = to_compute(biases, cdtype);
  const auto gg = grad_gate.to(cdtype).contiguous();
  std::vector<int64_t> offsets;
  int64_t num_params = 0;
  for (const auto& wl : w) {
    offsets.push_back(num_params);
    num_params += wl.numel() + wl.size(0);
  }
  auto grad = at::empty({num_params}, w[0].options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_backward_cpu", [&] {
    const auto m = make_mlp<scalar_t>(w, b, hidden, gate_act);
    mlp_gate_backward_kernel<scalar_t>(m, height, width, gg.data_ptr<scalar_t>(), offsets,
                                       num_params, grad.data_ptr<scalar_t>());
  });
  std::vector<at::Tensor> grad_w, grad_b;
  for (size_t l = 0; l < w.size(); ++l) {
    const int64_t out = w[l].size(0);
    const int64_t in = w[l].size(1);
    grad_w.push_back(
        grad.narrow(0, offsets[l], out * in).view({out, in}).to(dtype, false, /*copy=*/true));
    grad_b.push_back(grad.narrow(0, offsets[l] + out * in, out).to(dtype, false, /*copy=*/true));
  }
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(coordgate_ext, CPU, m) {
  m.impl("mlp_gate", &mlp_gate_cpu);
  m.impl("mlp_gate_backward", &mlp_gate_backward_cpu);
}

}  // namespace coordgate
