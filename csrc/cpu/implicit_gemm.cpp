// The CPU's implicit-GEMM engine of the gated convolution: the decomposition the CUDA
// kernels use (csrc/cuda/gated_conv2d.cu), run on the host with the same per-element
// functions from csrc/common, so that the CPU tests exercise the GPU's maths: the gather
// of the input through stride / dilation / padding / groups, the gate evaluated per tile
// from the encoder, the gated epilogue, the backward terms, and the input gradient's
// gather through the inverse index map.
//
// Forward, per (group, tile of output pixels), the batch loop inside so that the gate is
// read or evaluated once per tile: cols (K, tile) gathered from the input, acc = W_g cols
// (ATen's GEMM), epilogue out = (acc + b) * g. Backward pass 1, per (group, tile): dy =
// dout * g, dgate = sum_n dout * y (y saved or recomputed from cols), the bias and weight
// gradients as per-tile partials summed in tile order. Pass 2, per (group, image, tile of
// input pixels): the input gradient as a GEMM over the gathered dy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <atomic>

#include "../common/conv_geometry.h"
#include "../ops.h"
#include "kernels.h"

namespace coordgate {
namespace {

// Pixels per tile: cols (K x kTile) stays in L2 for the usual K = Cin * 9 <= 600.
constexpr int64_t kTile = 256;

std::atomic<int> g_cpu_engine{static_cast<int>(CpuEngine::kAuto)};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The output rows and columns of a tile's pixels p0 .. p0 + count, computed once per tile.
struct TilePixels {
  std::vector<int64_t> oh, ow;

  TilePixels() : oh(kTile), ow(kTile) {}

  void set(const ConvGeometry& g, int64_t p0, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      oh[i] = (p0 + i) / g.out_w;
      ow[i] = (p0 + i) % g.out_w;
    }
  }
};

// cols[k * kTile + i] = the input value that reduction index k reads at the tile's pixel i.
template <typename T>
void gather_input(const ConvGeometry& g, const T* x, const Strides4& xs, int64_t n,
                  int64_t group, const TilePixels& pix, int64_t count, T* cols) {
  const int64_t K = g.reduction();
  for (int64_t k = 0; k < K; ++k) {
    const Tap tap = reduction_tap(g, k);
    T* row = cols + k * kTile;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t off = conv_gather_offset(g, xs, n, group, tap, pix.oh[i], pix.ow[i]);
      row[i] = off < 0 ? T(0) : x[off];
    }
  }
}

// gate[c_local * kTile + i] for the group's channels at pixels p0 .. p0 + count, from the
// encoder; scratch holds 2 * max width values.
template <typename T>
void encoder_tile(const ConvGeometry& g, const EncoderParams<T>& enc, int64_t group,
                  int64_t p0, int64_t count, T* gate, T* scratch, int64_t max_width) {
  const int64_t cg = g.out_per_group();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t p = p0 + i;
    const T r = grid_coordinate<T>(p / g.out_w, g.out_h);
    const T q = grid_coordinate<T>(p % g.out_w, g.out_w);
    const T* hidden = encoder_hidden(enc, r, q, scratch, scratch + max_width, 1);
    for (int64_t c = 0; c < cg; ++c) {
      gate[c * kTile + i] = encoder_gate(enc, group * cg + c, hidden, 1, r, q);
    }
  }
}

template <typename T>
void forward_kernel(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& w2d,
                    const T* bias, const T* gate_map, const EncoderSpec* encoder,
                    at::Tensor& out, at::Tensor* y) {
  const int64_t P = g.pixels(), K = g.reduction(), cg = g.out_per_group();
  const int64_t tiles = (P + kTile - 1) / kTile;
  const Strides4 xs = strides_of(x), os = strides_of(out);
  const Strides4 ys = y ? strides_of(*y) : Strides4{};
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* yp = y ? y->data_ptr<T>() : nullptr;
  const EncoderParams<T> enc = encoder ? encoder_params<T>(*encoder) : EncoderParams<T>{};
  int64_t max_width = 2;  // encoder_tile's scratch: two buffers of the widest layer
  for (int l = 0; l < enc.layers; ++l) max_width = std::max(max_width, enc.width[l]);
  at::parallel_for(0, g.groups * tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto cols = at::empty({K, kTile}, x.options().memory_format(at::MemoryFormat::Contiguous));
    auto acc = at::empty({cg, kTile}, cols.options());
    auto gate_tile = at::empty({cg, kTile}, cols.options());
    std::vector<T> scratch(2 * max_width);
    std::vector<int64_t> out_offset(kTile), y_offset(kTile);
    TilePixels pix;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / tiles;
      const int64_t p0 = (item % tiles) * kTile;
      const int64_t count = std::min(kTile, P - p0);
      if (encoder) {
        encoder_tile(g, enc, group, p0, count, gate_tile.data_ptr<T>(), scratch.data(),
                     max_width);
      }
      const auto w_g = w2d.narrow(0, group * cg, cg);
      auto acc_v = acc.narrow(1, 0, count);
      // The tile's pixels' offsets within an output channel, computed once per tile.
      pix.set(g, p0, count);
      for (int64_t i = 0; i < count; ++i) {
        out_offset[i] = os.offset(0, 0, pix.oh[i], pix.ow[i]);
        y_offset[i] = ys.offset(0, 0, pix.oh[i], pix.ow[i]);
      }
      for (int64_t n = 0; n < g.batch; ++n) {
        gather_input(g, xp, xs, n, group, pix, count, cols.data_ptr<T>());
        at::mm_out(acc_v, w_g, cols.narrow(1, 0, count));
        const T* a = acc.data_ptr<T>();
        for (int64_t cl = 0; cl < cg; ++cl) {
          const int64_t c = group * cg + cl;
          const T b = bias ? bias[c] : T(0);
          const T* gv = gate_map ? gate_map + c * P + p0 : gate_tile.data_ptr<T>() + cl * kTile;
          const T* v = a + cl * kTile;
          T* o = op + n * os.n + c * os.c;
          for (int64_t i = 0; i < count; ++i) o[out_offset[i]] = gated_output(v[i], b, gv[i]);
          if (yp) {
            T* yc = yp + n * ys.n + c * ys.c;
            for (int64_t i = 0; i < count; ++i) yc[y_offset[i]] = v[i] + b;
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const ConvGeometry& g, const at::Tensor& dout, const at::Tensor& x,
                     const at::Tensor& w2d, const T* bias, const T* gate_map,
                     const at::Tensor& y, const ImplicitGemmGrads& grads) {
  const int64_t P = g.pixels(), K = g.reduction(), cg = g.out_per_group();
  const int64_t cin_g = g.in_per_group(), taps = g.taps();
  const int64_t tiles = (P + kTile - 1) / kTile;
  const Strides4 xs = strides_of(x), ds = strides_of(dout);
  const bool recompute = !y.defined();
  const Strides4 ys = recompute ? Strides4{} : strides_of(y);
  const T* xp = x.data_ptr<T>();
  const T* dp = dout.data_ptr<T>();
  const T* yp = recompute ? nullptr : y.data_ptr<T>();
  const bool need_input = grads.input.defined(), need_weight = grads.weight_parts.defined();
  const bool need_bias = grads.bias_parts.defined(), need_gate = grads.gate.defined();
  const bool need_cols = need_weight || (need_gate && recompute);
  // dy = dout * gate, (N, C, P) contiguous: what the input gradient's gather reads.
  at::Tensor dy;
  if (need_input) dy = at::empty({g.batch, g.channels, P}, w2d.options());
  T* dyp = need_input ? dy.data_ptr<T>() : nullptr;
  T* dgp = need_gate ? grads.gate.data_ptr<T>() : nullptr;

  at::parallel_for(0, g.groups * tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto cols = at::empty({K, kTile}, w2d.options());
    auto acc = at::empty({cg, kTile}, w2d.options());
    auto dy_tile = at::empty({cg, kTile}, w2d.options());
    std::vector<T> dgate_tile(cg * kTile);
    std::vector<int64_t> dout_offset(kTile), y_offset(kTile);
    TilePixels pix;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / tiles, tile = item % tiles;
      const int64_t p0 = tile * kTile;
      const int64_t count = std::min(kTile, P - p0);
      const auto w_g = w2d.narrow(0, group * cg, cg);
      auto cols_v = cols.narrow(1, 0, count);
      auto dy_v = dy_tile.narrow(1, 0, count);
      auto acc_v = acc.narrow(1, 0, count);
      std::fill(dgate_tile.begin(), dgate_tile.end(), T(0));
      T* bias_part = need_bias ? grads.bias_parts[item].data_ptr<T>() : nullptr;
      if (bias_part) std::fill(bias_part, bias_part + cg, T(0));
      auto weight_part = need_weight ? grads.weight_parts[item] : at::Tensor();
      if (need_weight) weight_part.zero_();
      pix.set(g, p0, count);
      for (int64_t i = 0; i < count; ++i) {
        dout_offset[i] = ds.offset(0, 0, pix.oh[i], pix.ow[i]);
        y_offset[i] = ys.offset(0, 0, pix.oh[i], pix.ow[i]);
      }
      for (int64_t n = 0; n < g.batch; ++n) {
        if (need_cols) gather_input(g, xp, xs, n, group, pix, count, cols.data_ptr<T>());
        if (need_gate && recompute) at::mm_out(acc_v, w_g, cols_v);
        T* dyt = dy_tile.data_ptr<T>();
        const T* a = acc.data_ptr<T>();
        for (int64_t cl = 0; cl < cg; ++cl) {
          const int64_t c = group * cg + cl;
          const T b = bias ? bias[c] : T(0);
          const T* d = dp + n * ds.n + c * ds.c;
          const T* gv = gate_map + c * P + p0;
          T* dy_row = dyt + cl * kTile;
          for (int64_t i = 0; i < count; ++i) dy_row[i] = conv_grad_term(d[dout_offset[i]], gv[i]);
          if (dyp) std::copy(dy_row, dy_row + count, dyp + (n * g.channels + c) * P + p0);
          if (bias_part) {
            for (int64_t i = 0; i < count; ++i) bias_part[cl] += dy_row[i];
          }
          if (need_gate) {
            T* dg = dgate_tile.data() + cl * kTile;
            if (recompute) {
              const T* v = a + cl * kTile;
              for (int64_t i = 0; i < count; ++i) dg[i] += gate_grad_term(d[dout_offset[i]], v[i] + b);
            } else {
              const T* yc = yp + n * ys.n + c * ys.c;
              for (int64_t i = 0; i < count; ++i) {
                dg[i] += gate_grad_term(d[dout_offset[i]], yc[y_offset[i]]);
              }
            }
          }
        }
        if (need_weight) weight_part.addmm_(dy_v, cols_v.t());
      }
      if (need_gate) {
        for (int64_t cl = 0; cl < cg; ++cl) {
          const int64_t c = group * cg + cl;
          std::copy(dgate_tile.begin() + cl * kTile, dgate_tile.begin() + cl * kTile + count,
                    dgp + c * P + p0);
        }
      }
    }
  });
  if (!need_input) return;

  // Pass 2: dx[n, group, :, pixel] = Wt_g (cin_g, cg * taps) . dy gathered (cg * taps, tile).
  const int64_t in_pixels = g.height * g.width;
  const int64_t in_tiles = (in_pixels + kTile - 1) / kTile;
  const auto wt = w2d.view({g.groups, cg, cin_g, taps}).permute({0, 2, 1, 3}).reshape(
      {g.groups, cin_g, cg * taps});
  const Strides4 dys{g.channels * P, P, g.out_w, 1};
  at::Tensor dx = grads.input;
  const Strides4 dxs = strides_of(dx);
  T* dxp = dx.data_ptr<T>();
  at::parallel_for(0, g.groups * g.batch * in_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto gathered = at::empty({cg * taps, kTile}, w2d.options());
    auto dx_tile = at::empty({cin_g, kTile}, w2d.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / (g.batch * in_tiles);
      const int64_t n = (item / in_tiles) % g.batch;
      const int64_t q0 = (item % in_tiles) * kTile;
      const int64_t count = std::min(kTile, in_pixels - q0);
      T* gp = gathered.data_ptr<T>();
      for (int64_t cl = 0; cl < cg; ++cl) {
        for (int64_t t = 0; t < taps; ++t) {
          T* row = gp + (cl * taps + t) * kTile;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t q = q0 + i;
            int64_t pixel;
            const int64_t off = conv_scatter_offset(g, dys, n, group * cg + cl, t / g.kernel_w,
                                                    t % g.kernel_w, q / g.width, q % g.width,
                                                    &pixel);
            row[i] = off < 0 ? T(0) : dyp[off];
          }
        }
      }
      auto dx_v = dx_tile.narrow(1, 0, count);
      at::mm_out(dx_v, wt[group], gathered.narrow(1, 0, count));
      const T* dt = dx_tile.data_ptr<T>();
      for (int64_t ci = 0; ci < cin_g; ++ci) {
        for (int64_t i = 0; i < count; ++i) {
          const int64_t q = q0 + i;
          dxp[dxs.offset(n, group * cin_g + ci, q / g.width, q % g.width)] = dt[ci * kTile + i];
        }
      }
    }
  });
}

}  // namespace

void set_cpu_engine(CpuEngine engine) { g_cpu_engine.store(static_cast<int>(engine)); }

CpuEngine cpu_engine() { return static_cast<CpuEngine>(g_cpu_engine.load()); }

namespace {

// The engine's answer for an explicit choice, or auto_choice under kAuto.
bool implicit_gemm_for(bool auto_choice) {
  const CpuEngine engine = cpu_engine();
  return engine == CpuEngine::kImplicitGemm || (engine == CpuEngine::kAuto && auto_choice);
}

}  // namespace

bool implicit_gemm_forward_for(at::ScalarType compute_dtype) {
  return implicit_gemm_for(compute_dtype == at::kDouble);
}

bool implicit_gemm_backward_for(at::ScalarType compute_dtype) {
  return implicit_gemm_for(compute_dtype == at::kDouble);
}

int64_t implicit_gemm_tiles(const ConvGeometry& g) {
  return g.groups * ((g.pixels() + kTile - 1) / kTile);
}

void implicit_gemm_forward(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& gate,
                           const EncoderSpec* encoder, at::Tensor& out, at::Tensor* y) {
  const auto w2d = weight.contiguous().view({g.channels, g.reduction()});
  const auto b = bias ? bias->contiguous() : at::Tensor();
  const auto gmap = gate.defined() ? gate.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "implicit_gemm_forward", [&] {
    forward_kernel<scalar_t>(g, x, w2d, b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                             gmap.defined() ? gmap.data_ptr<scalar_t>() : nullptr, encoder, out,
                             y);
  });
}

void implicit_gemm_backward(const ConvGeometry& g, const at::Tensor& dout, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& gate, const at::Tensor& y,
                            const ImplicitGemmGrads& grads) {
  const auto w2d = weight.contiguous().view({g.channels, g.reduction()});
  const auto b = bias ? bias->contiguous() : at::Tensor();
  const auto gmap = gate.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "implicit_gemm_backward", [&] {
    backward_kernel<scalar_t>(g, dout, x, w2d, b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                              gmap.data_ptr<scalar_t>(), y, grads);
  });
}

}  // namespace coordgate
