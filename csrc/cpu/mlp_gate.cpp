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

#include <algorithm>
#include <cstdlib>
#include <tuple>
#include <utility>
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
  bool piecewise_linear = false;  // the fast path below applies (see is_piecewise_linear)
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

// delta = delta * act'(a) (relu: a select), element-wise over n contiguous values.
template <typename T>
void scale_by_activation_grad(Activation act, const T* a, T* delta, int64_t n) {
  with_activation(act, [&](auto A) {
    for (int64_t k = 0; k < n; ++k) delta[k] = backprop_activation<decltype(A)::value>(delta[k], a[k]);
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
        // Two inputs: an outer sum (the shared unit), which a GEMM with K = 2 would do poorly.
        const T* w = m.weight[0].data_ptr<T>();
        const T* b = m.bias[0].data_ptr<T>();
        for (int64_t o = 0; o < features; ++o) {
          T* ao = a + o * kTile;
          for (int64_t p = 0; p < count; ++p) ao[p] = encoder_input_unit<T>(w, b, o, r[p], q[p]);
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

// Two-layer encoders with a piecewise-linear hidden activation (relu, or none: the first
// author's encoder). Along row i of the grid, hidden unit e's pre-activation
// u_e + v_e q (u_e = W1[e, 0] r_i + b1[e], v_e = W1[e, 1]) is monotone in q, so the unit is
// active on one contiguous range of columns [lo_e, hi_e) (every column without a hidden
// activation). Between the ranges' ends the gate's pre-activation is affine in q:
//   z[c] = b2[c] + sum_{e active} W2[c, e] u_e + q sum_{e active} W2[c, e] v_e,
// so a row costs O(C W + E C) instead of the GEMM's O(E C W). Backward sums dz and dz * q
// over the same ranges with prefix sums; with a relu (or no) gate activation, dz is the
// gate's gradient on the one column range of each segment where the gate passes, so those
// sums are plain vectorised sums of the gradient. Sums over units and pixels are kept in
// double (vectorised sums: in the compute dtype over chunks of kSumChunk columns).
// Only for finite parameters: the segment sums skip inactive units and columns, where a
// NaN or infinite weight must still reach the gate (0 * inf is NaN in the specification).
bool is_piecewise_linear(const Mlp& m) {
  if (m.layers() != 2 || (m.hidden != Activation::kRelu && m.hidden != Activation::kNone)) {
    return false;
  }
  for (int64_t l = 0; l < 2; ++l) {
    if (!at::isfinite(m.weight[l]).all().item<bool>() || !at::isfinite(m.bias[l]).all().item<bool>()) {
      return false;
    }
  }
  return true;
}

// Rows per work item of the piecewise-linear kernels; gradient partial sums are kept per
// item and added in item order, so the result does not depend on the number of threads.
constexpr int64_t kRowBlock = 4;

// [lo, hi): where pred holds in [s, t), for a pred that switches at most once there.
template <typename Pred>
std::pair<int64_t, int64_t> true_range(int64_t s, int64_t t, Pred&& pred) {
  const bool first = pred(s);
  if (first == pred(t - 1)) return first ? std::make_pair(s, t) : std::make_pair(s, s);
  int64_t a = s, b = t - 1;  // pred(a) == first != pred(b)
  while (b - a > 1) {
    const int64_t mid = a + (b - a) / 2;
    (pred(mid) == first ? a : b) = mid;
  }
  return first ? std::make_pair(s, b) : std::make_pair(b, t);
}

// Row i's units: u, v and the active column range [lo, hi) of each.
template <typename T>
struct RowUnits {
  std::vector<double> u, v;
  std::vector<int64_t> lo, hi;

  explicit RowUnits(int64_t units) : u(units), v(units), lo(units), hi(units) {}

  void compute(const Mlp& m, T r, const T* q, int64_t width) {
    const T* w1 = m.weight[0].data_ptr<T>();
    const T* b1 = m.bias[0].data_ptr<T>();
    for (int64_t e = 0; e < static_cast<int64_t>(u.size()); ++e) {
      u[e] = static_cast<double>(w1[2 * e] * r + b1[e]);
      v[e] = static_cast<double>(w1[2 * e + 1]);
      if (m.hidden == Activation::kNone) {
        lo[e] = 0;
        hi[e] = width;
        continue;
      }
      // The same pre-activation the per-pixel path computes; monotone in q, so a bisection
      // finds the one column where the unit switches.
      auto active = [&](int64_t j) { return encoder_input_unit<T>(w1, b1, e, r, q[j]) > T(0); };
      std::tie(lo[e], hi[e]) = true_range(0, width, active);
    }
  }

  // Calls segment(s, t) for the maximal column ranges over which no unit switches, with
  // S0 = b2 + sum_active W2 u and S1 = sum_active W2 v (C values each) set for the range.
  template <typename F>
  void for_each_segment(const Mlp& m, int64_t width, std::vector<double>& s0,
                        std::vector<double>& s1, std::vector<std::pair<int64_t, int64_t>>& events,
                        F&& segment) const {
    const T* w2 = m.weight[1].data_ptr<T>();
    const T* b2 = m.bias[1].data_ptr<T>();
    const int64_t units = static_cast<int64_t>(u.size());
    const int64_t channels = m.weight[1].size(0);
    events.clear();
    for (int64_t e = 0; e < units; ++e) {
      if (lo[e] >= hi[e]) continue;
      events.emplace_back(lo[e], e + 1);  // + (e + 1): switches on
      if (hi[e] < width) events.emplace_back(hi[e], -(e + 1));
    }
    std::sort(events.begin(), events.end());
    for (int64_t c = 0; c < channels; ++c) {
      s0[c] = static_cast<double>(b2[c]);
      s1[c] = 0.0;
    }
    size_t k = 0;
    int64_t start = 0;
    while (start < width) {
      for (; k < events.size() && events[k].first == start; ++k) {
        const int64_t e = std::abs(events[k].second) - 1;
        const double sign = events[k].second > 0 ? 1.0 : -1.0;
        for (int64_t c = 0; c < channels; ++c) {
          const double w = static_cast<double>(w2[c * units + e]);
          s0[c] += sign * w * u[e];
          s1[c] += sign * w * v[e];
        }
      }
      const int64_t end = k < events.size() ? events[k].first : width;
      segment(start, end);
      start = end;
    }
  }
};

// gate: (C, height, width) memory, or (height, width, C) where pixel_major.
template <typename T>
void piecewise_linear_gate_kernel(const Mlp& m, int64_t height, int64_t width, bool pixel_major,
                                  T* gate) {
  const int64_t units = m.weight[0].size(0), channels = m.weight[1].size(0);
  const int64_t pixels = height * width;
  std::vector<T> q(width);
  for (int64_t j = 0; j < width; ++j) q[j] = grid_coordinate<T>(j, width);
  with_activation(m.gate, [&](auto A) {
    at::parallel_for(0, height, 1, [&](int64_t begin, int64_t end) {
      RowUnits<T> row(units);
      std::vector<double> s0(channels), s1(channels);
      std::vector<std::pair<int64_t, int64_t>> events;
      for (int64_t i = begin; i < end; ++i) {
        row.compute(m, grid_coordinate<T>(i, height), q.data(), width);
        row.for_each_segment(m, width, s0, s1, events, [&](int64_t s, int64_t t) {
          if (pixel_major) {
            for (int64_t j = s; j < t; ++j) {
              T* out = gate + (i * width + j) * channels;
              for (int64_t c = 0; c < channels; ++c) {
                out[c] = activate<decltype(A)::value>(
                    static_cast<T>(s0[c] + s1[c] * static_cast<double>(q[j])));
              }
            }
            return;
          }
          for (int64_t c = 0; c < channels; ++c) {
            T* out = gate + c * pixels + i * width;
            for (int64_t j = s; j < t; ++j) {
              out[j] = activate<decltype(A)::value>(
                  static_cast<T>(s0[c] + s1[c] * static_cast<double>(q[j])));
            }
          }
        });
      }
    });
  });
}

// sum0 = sum g[j] and sum1 = sum g[j] * q[j] over [lo, hi): lanes of T over chunks of
// kSumChunk columns (vectorised), each chunk's total added in double.
constexpr int64_t kSumLanes = 8, kSumChunk = 256;

template <typename T>
void range_sums(const T* g, const T* q, int64_t lo, int64_t hi, double& sum0, double& sum1) {
  sum0 = sum1 = 0.0;
  for (int64_t j0 = lo; j0 < hi; j0 += kSumChunk) {
    const int64_t j1 = std::min(hi, j0 + kSumChunk);
    T p0[kSumLanes] = {}, p1[kSumLanes] = {};
    int64_t j = j0;
    for (; j + kSumLanes <= j1; j += kSumLanes) {
      for (int64_t l = 0; l < kSumLanes; ++l) {
        p0[l] += g[j + l];
        p1[l] += g[j + l] * q[j + l];
      }
    }
    for (; j < j1; ++j) {
      p0[0] += g[j];
      p1[0] += g[j] * q[j];
    }
    double c0 = 0.0, c1 = 0.0;
    for (int64_t l = 0; l < kSumLanes; ++l) {
      c0 += static_cast<double>(p0[l]);
      c1 += static_cast<double>(p1[l]);
    }
    sum0 += c0;
    sum1 += c1;
  }
}

// grad_gate: (C, height, width) memory, or (height, width, C) where pixel_major. Each row is
// first copied (transposed, where pixel_major) into a per-thread (C, width) buffer, in cache,
// and summed there.
template <typename T>
void piecewise_linear_backward_kernel(const Mlp& m, int64_t height, int64_t width,
                                      const T* grad_gate, bool pixel_major,
                                      std::vector<at::Tensor>& grad_w,
                                      std::vector<at::Tensor>& grad_b) {
  const int64_t units = m.weight[0].size(0), channels = m.weight[1].size(0);
  const int64_t pixels = height * width;
  const int64_t blocks = (height + kRowBlock - 1) / kRowBlock;
  const T* w2 = m.weight[1].data_ptr<T>();
  std::vector<T> q(width);
  for (int64_t j = 0; j < width; ++j) q[j] = grid_coordinate<T>(j, width);
  // Per block: dW1 (E, 2), db1 (E), dW2 (C, E), db2 (C).
  const int64_t part_size = 3 * units + channels * units + channels;
  std::vector<double> parts(blocks * part_size, 0.0);
  with_activation(m.gate, [&](auto A) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      RowUnits<T> row(units);
      std::vector<double> s0(channels), s1(channels), d0(channels), d1(channels);
      // Per row, the sums of dz = grad * psi'(z) and of dz * q over each segment, then
      // cumulated over the segments: every unit's range starts and ends on a segment bound.
      const int64_t max_segments = 2 * units + 1;
      std::vector<double> c0(channels * (max_segments + 1)), c1(channels * (max_segments + 1));
      std::vector<int64_t> bounds;
      std::vector<std::pair<int64_t, int64_t>> events;
      std::vector<T> row_grad(channels * width);
      for (int64_t block = begin; block < end; ++block) {
        double* gw1 = parts.data() + block * part_size;
        double* gb1 = gw1 + 2 * units;
        double* gw2 = gb1 + units;
        double* gb2 = gw2 + channels * units;
        for (int64_t i = block * kRowBlock; i < std::min(height, (block + 1) * kRowBlock); ++i) {
          const T r = grid_coordinate<T>(i, height);
          row.compute(m, r, q.data(), width);
          if (pixel_major) {
            transpose_tiled(grad_gate + i * width * channels, channels, width, channels,
                            row_grad.data(), width);
          } else {
            // The channels' rows lie a whole grid apart: summed in place, segment after
            // segment, they share a few cache sets where the grid is a power of two.
            for (int64_t c = 0; c < channels; ++c) {
              const T* src = grad_gate + c * pixels + i * width;
              std::copy(src, src + width, row_grad.data() + c * width);
            }
          }
          bounds.clear();
          row.for_each_segment(m, width, s0, s1, events, [&](int64_t s, int64_t t) {
            const int64_t k = static_cast<int64_t>(bounds.size());
            bounds.push_back(s);
            for (int64_t c = 0; c < channels; ++c) {
              const T* g = row_grad.data() + c * width;
              double& sum0 = c0[c * (max_segments + 1) + k + 1];
              double& sum1 = c1[c * (max_segments + 1) + k + 1];
              constexpr Activation act = decltype(A)::value;
              if constexpr (act == Activation::kRelu || act == Activation::kNone) {
                // psi' is 1 where the gate passes and 0 elsewhere, and z is monotone in the
                // column: the sums run over one column range, found as the forward decides.
                int64_t lo = s, hi = t;
                if constexpr (act == Activation::kRelu) {
                  auto passes = [&](int64_t j) {
                    return static_cast<T>(s0[c] + s1[c] * static_cast<double>(q[j])) > T(0);
                  };
                  std::tie(lo, hi) = true_range(s, t, passes);
                }
                range_sums(g, q.data(), lo, hi, sum0, sum1);
                continue;
              }
              // Four partial sums: independent chains the compiler can keep in flight.
              double a0[4] = {0.0, 0.0, 0.0, 0.0}, a1[4] = {0.0, 0.0, 0.0, 0.0};
              for (int64_t j = s; j < t; ++j) {
                const T z = static_cast<T>(s0[c] + s1[c] * static_cast<double>(q[j]));
                const double dz = static_cast<double>(g[j] * activate_grad<act>(z));
                a0[j & 3] += dz;
                a1[j & 3] += dz * static_cast<double>(q[j]);
              }
              sum0 = (a0[0] + a0[1]) + (a0[2] + a0[3]);
              sum1 = (a1[0] + a1[1]) + (a1[2] + a1[3]);
            }
          });
          const int64_t segments = static_cast<int64_t>(bounds.size());
          bounds.push_back(width);
          for (int64_t c = 0; c < channels; ++c) {
            double* a0 = c0.data() + c * (max_segments + 1);
            double* a1 = c1.data() + c * (max_segments + 1);
            a0[0] = a1[0] = 0.0;
            for (int64_t k = 0; k < segments; ++k) {
              a0[k + 1] += a0[k];
              a1[k + 1] += a1[k];
            }
            gb2[c] += a0[segments];
          }
          auto segment_of = [&](int64_t column) {
            return std::lower_bound(bounds.begin(), bounds.end(), column) - bounds.begin();
          };
          for (int64_t e = 0; e < units; ++e) {
            if (row.lo[e] >= row.hi[e]) continue;
            const int64_t k_lo = segment_of(row.lo[e]), k_hi = segment_of(row.hi[e]);
            double t0 = 0.0, t1 = 0.0;
            for (int64_t c = 0; c < channels; ++c) {
              const double* a0 = c0.data() + c * (max_segments + 1);
              const double* a1 = c1.data() + c * (max_segments + 1);
              d0[c] = a0[k_hi] - a0[k_lo];
              d1[c] = a1[k_hi] - a1[k_lo];
              gw2[c * units + e] += row.u[e] * d0[c] + row.v[e] * d1[c];
              const double w = static_cast<double>(w2[c * units + e]);
              t0 += w * d0[c];
              t1 += w * d1[c];
            }
            gb1[e] += t0;
            gw1[2 * e] += static_cast<double>(r) * t0;
            gw1[2 * e + 1] += t1;
          }
        }
      }
    });
  });
  auto sum = at::zeros({part_size}, at::kDouble);
  double* total = sum.data_ptr<double>();
  for (int64_t block = 0; block < blocks; ++block) {
    const double* part = parts.data() + block * part_size;
    for (int64_t k = 0; k < part_size; ++k) total[k] += part[k];
  }
  // Each gradient its own copy (outputs of an operator never alias one another, and in
  // float64 a plain .to(dtype) would return views of sum).
  const auto dtype = m.weight[0].scalar_type();
  auto part = [&](int64_t offset, int64_t size) {
    return sum.narrow(0, offset, size).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  };
  grad_w.push_back(part(0, 2 * units).view({units, 2}));
  grad_b.push_back(part(2 * units, units));
  grad_w.push_back(part(3 * units, channels * units).view({channels, units}));
  grad_b.push_back(part(3 * units + channels * units, channels));
}

// gate: (C, height, width) memory, or (height, width, C) where pixel_major.
template <typename T>
void mlp_gate_kernel(const Mlp& m, int64_t height, int64_t width, bool pixel_major, T* gate) {
  if (m.piecewise_linear) {
    piecewise_linear_gate_kernel<T>(m, height, width, pixel_major, gate);
    return;
  }
  const int64_t pixels = height * width, channels = m.weight.back().size(0);
  const auto options = m.weight[0].options();
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Grad mode and dispatch state are thread-local: set them on every worker.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tile tile(m, options);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kTile;
      const int64_t count = std::min(kTile, pixels - p0);
      if (!pixel_major) {
        tile.forward<T>(m, p0, count, height, width, gate + p0, pixels);
        continue;
      }
      // The tile's gate is (C, count) in L2: transposed out from there.
      tile.forward<T>(m, p0, count, height, width);
      const T* a = tile.act.back().data_ptr<T>();
      for (int64_t p = 0; p < count; ++p) {
        T* out = gate + (p0 + p) * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] = a[c * kTile + p];
      }
    }
  });
}

// grad_gate: contiguous, or pixel-major for a piecewise-linear encoder.
template <typename T>
void mlp_gate_backward_kernel(const Mlp& m, int64_t height, int64_t width,
                              const at::Tensor& grad_gate, std::vector<at::Tensor>& grad_w,
                              std::vector<at::Tensor>& grad_b) {
  if (m.piecewise_linear) {
    piecewise_linear_backward_kernel<T>(m, height, width, grad_gate.data_ptr<T>(),
                                        !grad_gate.is_contiguous(), grad_w, grad_b);
    return;
  }
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
  // Once per op call: the finiteness test reads every parameter.
  m.piecewise_linear = is_piecewise_linear(m);
  return m;
}

}  // namespace

at::Tensor mlp_gate_cpu(at::TensorList weights, at::TensorList biases, int64_t height,
                        int64_t width, c10::string_view hidden_activation,
                        c10::string_view gate_activation) {
  return mlp_gate_cpu_in(weights, biases, height, width, hidden_activation, gate_activation,
                         false);
}

at::Tensor mlp_gate_cpu_in(at::TensorList weights, at::TensorList biases, int64_t height,
                           int64_t width, c10::string_view hidden_activation,
                           c10::string_view gate_activation, bool pixel_major) {
  check_mlp_args(weights, biases, height, width);
  // The kernels call ATen ops: keep them off the autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dtype = weights[0].scalar_type();
  const auto cdtype = compute_dtype(dtype);
  const Mlp m = make_mlp(weights, biases, cdtype, hidden_activation, gate_activation);
  // From the output cache: inside mlp_gated_conv2d the gate is a temporary of every step.
  const int64_t channels = m.weight.back().size(0);
  auto gate = pixel_major ? empty_cached({height, width, channels}, cdtype,
                                         at::MemoryFormat::Contiguous)
                                .permute({2, 0, 1})
                          : empty_cached({channels, height, width}, cdtype,
                                         at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "mlp_gate_cpu", [&] {
    mlp_gate_kernel<scalar_t>(m, height, width, pixel_major, gate.data_ptr<scalar_t>());
  });
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
  const auto cast = grad_gate.to(cdtype);
  const bool in_place = m.piecewise_linear && !cast.is_contiguous() && pixel_major(cast);
  const auto gg = in_place ? cast : cast.contiguous();
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
