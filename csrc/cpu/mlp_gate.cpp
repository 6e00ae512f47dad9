// CPU kernels of coordgate_ext::mlp_gate and mlp_gate_backward.
//
// The grid's pixels are cut into tiles of kTile pixels. A tile's activations are small
// feature-major matrices (features x pixels): every layer is one GEMM on the tile (ATen's
// BLAS, single-threaded inside the parallel loop) and one vectorised element-wise pass.
// Nothing of size (pixels x hidden) is ever allocated: backward recomputes a tile's forward
// before propagating through it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "output_cache.h"

namespace coordgate {
namespace {

// Pixels per tile: a tile's activations (features x kTile) stay in L2. Gradient partial sums
// are kept per tile and added in tile order, so the result does not depend on the number of
// threads.
constexpr int64_t kTile = 2048;

struct Mlp {
  std::vector<at::Tensor> weight, bias;  // compute dtype, contiguous; bias as (out, 1)
  Activation hidden, gate;
  int64_t layers() const { return static_cast<int64_t>(weight.size()); }
  Activation activation(int64_t l) const { return l + 1 == layers() ? gate : hidden; }
};

// out = act(a), element-wise over n contiguous values.
template <typename T>
void apply_activation(Activation act, const T* a, T* out, int64_t n) {
  with_activation(act, [&](auto A) {
    for (int64_t k = 0; k < n; ++k) out[k] = activate<decltype(A)::value>(a[k]);
  });
}

// delta *= act'(a), element-wise over n contiguous values.
template <typename T>
void scale_by_activation_grad(Activation act, const T* a, T* delta, int64_t n) {
  with_activation(act, [&](auto A) {
    for (int64_t k = 0; k < n; ++k) delta[k] *= activate_grad<decltype(A)::value>(a[k]);
  });
}

// A tile's forward state: coordinates (2, count), and per layer the pre-activation and the
// activation (out_l, count).
struct Tile {
  at::Tensor coords;
  std::vector<at::Tensor> pre, act;

  Tile(const Mlp& m, const at::TensorOptions& options) : coords(at::empty({2, kTile}, options)) {
    for (const auto& w : m.weight) {
      pre.push_back(at::empty({w.size(0), kTile}, options));
      act.push_back(at::empty({w.size(0), kTile}, options));
    }
  }

  // Forward for pixels [p0, p0 + count) of the height x width grid. The last layer's
  // activation goes to out (row c at out + c * out_stride) when given, else to act.back().
  template <typename T>
  void forward(const Mlp& m, int64_t p0, int64_t count, int64_t height, int64_t width,
               T* out = nullptr, int64_t out_stride = 0) {
    T* r = coords.data_ptr<T>();
    T* q = r + kTile;
    for (int64_t p = 0; p < count; ++p) {
      r[p] = grid_coordinate<T>((p0 + p) / width, height);
      q[p] = grid_coordinate<T>((p0 + p) % width, width);
    }
    for (int64_t l = 0; l < m.layers(); ++l) {
      const int64_t features = m.weight[l].size(0);
      T* a = pre[l].data_ptr<T>();
      if (l == 0) {
        // Two inputs: an outer sum, which a GEMM with K = 2 would do poorly.
        const T* w = m.weight[0].data_ptr<T>();
        const T* b = m.bias[0].data_ptr<T>();
        for (int64_t o = 0; o < features; ++o) {
          T* ao = a + o * kTile;
          const T wr = w[2 * o], wq = w[2 * o + 1], bo = b[o];
          for (int64_t p = 0; p < count; ++p) ao[p] = wr * r[p] + wq * q[p] + bo;
        }
      } else {
        auto a_view = pre[l].narrow(1, 0, count);
        at::addmm_out(a_view, m.bias[l], m.weight[l], act[l - 1].narrow(1, 0, count));
      }
      const bool last = l + 1 == m.layers();
      T* h = last && out != nullptr ? out : act[l].data_ptr<T>();
      const int64_t h_stride = last && out != nullptr ? out_stride : kTile;
      for (int64_t o = 0; o < features; ++o) {
        apply_activation(m.activation(l), a + o * kTile, h + o * h_stride, count);
      }
    }
  }
};

template <typename T>
void mlp_gate_kernel(const Mlp& m, int64_t height, int64_t width, at::Tensor& gate) {
  const int64_t pixels = height * width;
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Grad mode and dispatch state are thread-local: set them on every worker.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tile tile(m, gate.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kTile;
      const int64_t count = std::min(kTile, pixels - p0);
      tile.forward<T>(m, p0, count, height, width, gate.data_ptr<T>() + p0, pixels);
    }
  });
}

template <typename T>
void mlp_gate_backward_kernel(const Mlp& m, int64_t height, int64_t width,
                              const at::Tensor& grad_gate, std::vector<at::Tensor>& grad_w,
                              std::vector<at::Tensor>& grad_b) {
  const int64_t pixels = height * width;
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  const int64_t L = m.layers();
  const auto options = grad_gate.options();
  auto gg2d = grad_gate.view({grad_gate.size(0), pixels});
  // Per-tile partial gradients, (tiles, out, in) and (tiles, out).
  std::vector<at::Tensor> part_w, part_b;
  int64_t max_width = 2;
  for (const auto& w : m.weight) {
    part_w.push_back(at::empty({tiles, w.size(0), w.size(1)}, options));
    part_b.push_back(at::empty({tiles, w.size(0)}, options));
    max_width = std::max(max_width, w.size(0));
  }
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Grad mode and dispatch state are thread-local: set them on every worker.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tile tile(m, options);
    auto delta_buf = at::empty({max_width, kTile}, options);
    auto prev_buf = at::empty({max_width, kTile}, options);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kTile;
      const int64_t count = std::min(kTile, pixels - p0);
      tile.forward<T>(m, p0, count, height, width);
      // delta = d loss / d pre-activation of layer l, (out_l, count).
      auto delta = delta_buf.narrow(0, 0, m.weight[L - 1].size(0)).narrow(1, 0, count);
      delta.copy_(gg2d.narrow(1, p0, count));
      for (int64_t l = L - 1; l >= 0; --l) {
        // Every tile buffer is (features, kTile): row o starts at o * kTile.
        const int64_t out_features = delta.size(0);
        T* d = delta.data_ptr<T>();
        if (l == L - 1) {
          const T* a = tile.pre[l].data_ptr<T>();
          for (int64_t o = 0; o < out_features; ++o) {
            scale_by_activation_grad(m.gate, a + o * kTile, d + o * kTile, count);
          }
        }
        const auto x = l == 0 ? tile.coords.narrow(1, 0, count)
                              : tile.act[l - 1].narrow(1, 0, count);
        auto tile_grad_w = part_w[l][t];
        auto tile_grad_b = part_b[l][t];
        at::mm_out(tile_grad_w, delta, x.t());
        T* gb = tile_grad_b.data_ptr<T>();
        for (int64_t o = 0; o < out_features; ++o) {
          const T* row = d + o * kTile;
          T sum = T(0);
          for (int64_t p = 0; p < count; ++p) sum += row[p];
          gb[o] = sum;
        }
        if (l == 0) break;
        auto prev = prev_buf.narrow(0, 0, m.weight[l].size(1)).narrow(1, 0, count);
        at::mm_out(prev, m.weight[l].t(), delta);
        const T* a_prev = tile.pre[l - 1].data_ptr<T>();
        T* dp = prev.data_ptr<T>();
        for (int64_t i = 0; i < prev.size(0); ++i) {
          scale_by_activation_grad(m.hidden, a_prev + i * kTile, dp + i * kTile, count);
        }
        std::swap(delta_buf, prev_buf);
        delta = prev;
      }
    }
  });
  for (int64_t l = 0; l < L; ++l) {
    grad_w.push_back(part_w[l].sum(0));
    grad_b.push_back(part_b[l].sum(0));
  }
}

Mlp make_mlp(at::TensorList weights, at::TensorList biases, at::ScalarType dtype,
             c10::string_view hidden_activation, c10::string_view gate_activation) {
  Mlp m;
  for (size_t l = 0; l < weights.size(); ++l) {
    m.weight.push_back(weights[l].to(dtype).contiguous());
    m.bias.push_back(biases[l].to(dtype).contiguous().unsqueeze(1));
  }
  m.hidden = parse_activation(hidden_activation);
  m.gate = parse_activation(gate_activation);
  return m;
}

}  // namespace

at::Tensor mlp_gate_cpu(at::TensorList weights, at::TensorList biases, int64_t height,
                        int64_t width, c10::string_view hidden_activation,
                        c10::string_view gate_activation) {
  check_mlp_args(weights, biases, height, width);
  // The kernels call ATen ops: keep them off the autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const Mlp m = make_mlp(weights, biases, cdtype, hidden_activation, gate_activation);
  // From the output cache: inside mlp_gated_conv2d the gate is a temporary of every step.
  auto gate = empty_cached({m.weight.back().size(0), height, width}, cdtype,
                           at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_cpu",
                             [&] { mlp_gate_kernel<scalar_t>(m, height, width, gate); });
  return gate.to(dtype);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_gate_backward_cpu(
    const at::Tensor& grad_gate, at::TensorList weights, at::TensorList biases, int64_t height,
    int64_t width, c10::string_view hidden_activation, c10::string_view gate_activation) {
  check_mlp_args(weights, biases, height, width);
  // The kernels call ATen ops: keep them off the autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t channels = weights.back().size(0);
  TORCH_CHECK(grad_gate.dim() == 3 && grad_gate.size(0) == channels &&
                  grad_gate.size(1) == height && grad_gate.size(2) == width,
              "mlp_gate_backward: expected grad_gate of shape (", channels, ", ", height, ", ",
              width, "), got ", grad_gate.sizes());
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const Mlp m = make_mlp(weights, biases, cdtype, hidden_activation, gate_activation);
  const auto gg = grad_gate.to(cdtype).contiguous();
  std::vector<at::Tensor> grad_w, grad_b;
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_backward_cpu", [&] {
    mlp_gate_backward_kernel<scalar_t>(m, height, width, gg, grad_w, grad_b);
  });
  for (size_t l = 0; l < grad_w.size(); ++l) {
    grad_w[l] = grad_w[l].to(dtype);
    grad_b[l] = grad_b[l].to(dtype);
  }
  return {grad_w, grad_b};
}

TORCH_LIBRARY_IMPL(coordgate_ext, CPU, m) {
  m.impl("mlp_gate", &mlp_gate_cpu);
  m.impl("mlp_gate_backward", &mlp_gate_backward_cpu);
}

}  // namespace coordgate
