// CPU kernels of coordgate_ext::gated_conv2d and gated_conv2d_backward.
//
// The convolution itself is ATen's (oneDNN / the CPU's best GEMM): on the CPU the bound is
// the bare convolution, and the fused work is what surrounds it. ATen is called band by band
// (a few samples, or a few output rows of one sample: about cpu_band_bytes() of output), and the
// band's output is gated while it is still in cache. Forward: out = gate * y written per band
// (and y itself when backward needs it). Backward, band by band: one pass over the band of
// grad_out forms dy = grad_out * gate and the gate gradient dg = sum_n grad_out * y together
// (the band's y recomputed when it was not saved), then ATen's convolution backward takes
// the band's dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "output_cache.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace coordgate {
namespace {

// Pixels per work item of the NCHW passes: large enough to amortise scheduling, small
// enough to balance two cores on a few channels.
constexpr int64_t kPixelBlock = 4096;

// Output bytes of one band of the banded convolution (kDefaultBandBytes unless set). The gate
// pass reads the band from cache, and oneDNN's temporaries are band-sized. Under glibc's
// default allocator that is what makes banding pay: ATen's whole-batch convolution allocates
// output-sized buffers on every call, served as fresh pages faulted in on first touch (about
// 0.5 ms per MiB on the development VM); measured there, banded convolution + gate pass over
// the bare batched F.conv2d: 0.4-0.8 on the benchmark shapes with 1-4 MiB bands. Under an
// allocator that reuses memory (make bench-heap), the banded convolution is no faster than
// the whole-batch one and the gate pass is overhead (README, "The allocator").
std::atomic<int64_t> g_band_bytes{kDefaultBandBytes};

// Output bytes (the gated output, and the ungated one when saved) from which the forward gate
// pass writes them with non-temporal stores (kDefaultStreamBytes unless set; float32 outputs
// without a mix only: a mix or a cast back to float16 / bfloat16 reads the outputs right
// away). Heap allocator, 2 cores (AMD EPYC, 32 MiB L3), training / eval forward, streaming
// off -> on in one run: 2, 3->64, 512x512 (256 / 128 MiB written): 28.2 -> 24.6 / 18.7 -> 16.4
// ms (channels_last 21.1 -> 17.6 / 13.0 -> 11.7); 1, 32->32, 1024x1024 (256 / 128 MiB):
// 72.4 -> 69.2 / 59.6 -> 58.8 ms; but eval at 4, 32->32, 256x256 (32 MiB) 14.0 -> 14.9 ms
// and 8, 64->64, 128x128 (64 / 32 MiB) 25.8 -> 27.0 / 24.7 -> 25.7 ms, where the next
// operation still finds the outputs in cache.
std::atomic<int64_t> g_stream_bytes{kDefaultStreamBytes};

// Samples [n0, n1) and output rows [r0, r1) of the convolution's output.
struct Band {
  int64_t n0, n1, r0, r1;
};

// The output cut into bands of about cpu_band_bytes(): whole samples, several to a band, when a
// sample is smaller; rows of one sample otherwise.
std::vector<Band> output_bands(const ConvGeometry& g, int64_t element_size) {
  std::vector<Band> bands;
  if (g.out_h == 0 || g.out_w == 0 || g.channels == 0) return bands;
  const int64_t band_bytes = cpu_band_bytes();
  const int64_t row_bytes = g.channels * g.out_w * element_size;
  const int64_t sample_bytes = row_bytes * g.out_h;
  if (sample_bytes > band_bytes) {
    const int64_t rows = std::max<int64_t>(1, band_bytes / row_bytes);
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t r = 0; r < g.out_h; r += rows) {
        bands.push_back({n, n + 1, r, std::min(g.out_h, r + rows)});
      }
    }
  } else {
    const int64_t samples = std::max<int64_t>(1, band_bytes / sample_bytes);
    for (int64_t n = 0; n < g.batch; n += samples) {
      bands.push_back({n, std::min(g.batch, n + samples), 0, g.out_h});
    }
  }
  return bands;
}

// The input of one band: the rows of x its output rows read, with their halo, and the
// padding to convolve them with. Where the rows reach into the zero padding they are padded
// explicitly (a band-sized copy). Rows [start, end) of x are rows [offset, offset + end -
// start) of `rows`.
struct BandInput {
  at::Tensor rows;
  int64_t start, end, offset;
  std::array<int64_t, 2> padding;
};

BandInput band_input(const at::Tensor& x, const ConvGeometry& g, const Band& band,
                     at::MemoryFormat fmt) {
  const auto xb = x.narrow(0, band.n0, band.n1 - band.n0);
  if (band.r0 == 0 && band.r1 == g.out_h) return {xb, 0, g.height, 0, {g.pad_h, g.pad_w}};
  // Input rows [lo, hi) feed output rows [r0, r1); those outside [0, H) are zero padding.
  const int64_t lo = conv_input_index(band.r0, 0, g.stride_h, g.dilation_h, g.pad_h);
  const int64_t hi =
      conv_input_index(band.r1 - 1, g.kernel_h - 1, g.stride_h, g.dilation_h, g.pad_h) + 1;
  const int64_t start = std::max<int64_t>(lo, 0), end = std::min(hi, g.height);
  if (start >= end) {
    // Every row the band reads is padding.
    auto sizes = xb.sizes().vec();
    sizes[2] = hi - lo;
    return {at::zeros(sizes, xb.options()).contiguous(fmt), 0, 0, 0, {0, g.pad_w}};
  }
  auto rows = xb.narrow(2, start, end - start);
  if (start > lo || hi > end || !rows.is_contiguous(fmt)) {
    // The band's rows, zero-padded, in a reused buffer: ATen would copy an NCHW band's rows
    // (strided by the channel) into a fresh one, and constant_pad_nd fills a fresh one first.
    auto sizes = xb.sizes().vec();
    sizes[2] = hi - lo;
    auto padded = empty_cached(sizes, xb.scalar_type(), fmt);
    if (start > lo) padded.narrow(2, 0, start - lo).zero_();
    if (hi > end) padded.narrow(2, end - lo, hi - end).zero_();
    padded.narrow(2, start - lo, end - start).copy_(rows);
    rows = padded;
  }
  return {rows, start, end, start - lo, {0, g.pad_w}};
}

// ATen's convolution of one band: (n1 - n0, C, r1 - r0, Wo) in the layout fmt.
at::Tensor band_conv(const BandInput& in, const at::Tensor& w, const std::optional<at::Tensor>& b,
                     const ConvGeometry& g, at::MemoryFormat fmt) {
  return at::convolution(in.rows, w, b, {g.stride_h, g.stride_w}, in.padding,
                         {g.dilation_h, g.dilation_w}, false, {0, 0}, g.groups)
      .contiguous(fmt);
}

// Calls visit(band, y_band) for every band of y = conv(x, w) + b. Where there are at least two
// bands a thread, each thread takes a contiguous share of the bands and convolves and gates
// them alone (ATen and oneDNN run single-threaded inside a parallel region): one parallel region
// per call instead of two per band. Where the cores are shared with other busy processes,
// every region waits for its slowest thread to be scheduled: with two busy-loop processes on
// the 2-core development machine, eval forward at 16, 16->16, 5, 128x128 took 62-316 ms with
// a region per band (the bare convolution: 29-56 ms) and 35-38 ms with one. Alone, it was as
// fast or faster (heap allocator, 2, 3->64, 512x512 eval: 15.7 -> 14.3 ms).
template <typename Visit>
void for_each_band(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                   const ConvGeometry& g, at::MemoryFormat fmt, Visit&& visit) {
  const auto bands = output_bands(g, x.element_size());
  const int64_t count = static_cast<int64_t>(bands.size());
  auto run = [&](int64_t k) {
    visit(bands[k], band_conv(band_input(x, g, bands[k], fmt), w, b, g, fmt));
  };
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && count >= 2 * threads && !at::in_parallel_region()) {
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch guard.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t k = begin; k < end; ++k) run(k);
    });
    return;
  }
  for (int64_t k = 0; k < count; ++k) run(k);
}

// Offsets of (n, c, first row of the band) in a full (N, C, Ho, Wo) tensor and in the band's
// own (n1 - n0, C, r1 - r0, Wo) tensor; NCHW (contiguous over the band's rows of one channel)
// or channels_last (contiguous over the band's rows and channels of one sample).
struct BandLayout {
  int64_t C, Ho, Wo;
  Band band;
  int64_t rows() const { return band.r1 - band.r0; }
  int64_t full_nchw(int64_t n, int64_t c) const { return ((n * C + c) * Ho + band.r0) * Wo; }
  int64_t local_nchw(int64_t n, int64_t c) const { return ((n - band.n0) * C + c) * rows() * Wo; }
  int64_t full_nhwc(int64_t n) const { return (n * Ho + band.r0) * Wo * C; }
  int64_t local_nhwc(int64_t n) const { return (n - band.n0) * rows() * Wo * C; }
};

// out[i] = src[i] * gate[i] and, if y_save, y_save[i] = src[i], for i < len.
template <typename T>
inline void gate_run(const T* src, const T* gate, T* out, T* y_save, int64_t len) {
  if (y_save != nullptr) {
    for (int64_t i = 0; i < len; ++i) {
      const T v = src[i];
      y_save[i] = v;
      out[i] = v * gate[i];
    }
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = src[i] * gate[i];
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

#if defined(__SSE2__)
// gate_run with non-temporal stores: the outputs go to memory without being read into the
// cache first (a normal store to a line not in cache reads it), and without evicting the
// band being read. out and y_save lie at the same offset of buffers aligned alike, so where
// one is 16-byte aligned so is the other. The caller fences (_mm_sfence) before the outputs
// are read elsewhere.
inline void gate_run_stream(const float* src, const float* gate, float* out, float* y_save,
                            int64_t len) {
  const int64_t head = std::min<int64_t>(
      len, ((16 - (reinterpret_cast<uintptr_t>(out) & 15)) & 15) / sizeof(float));
  gate_run(src, gate, out, y_save, head);
  int64_t i = head;
  for (; i + 4 <= len; i += 4) {
    const __m128 v = _mm_loadu_ps(src + i);
    _mm_stream_ps(out + i, _mm_mul_ps(v, _mm_loadu_ps(gate + i)));
    if (y_save != nullptr) _mm_stream_ps(y_save + i, v);
  }
  gate_run(src + i, gate + i, out + i, y_save != nullptr ? y_save + i : nullptr, len - i);
}
#endif

template <typename T>
inline void gate_run_to(const T* src, const T* gate, T* out, T* y_save, int64_t len,
                        bool stream) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream) return gate_run_stream(src, gate, out, y_save, len);
  }
#endif
  gate_run(src, gate, out, y_save, len);
}

inline void stream_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#endif
}

// The forward gate pass of one band: out = yb * gate and, if y_save, y_save = yb, at the
// band's place. yb is the band's convolution; gate is (C, Ho * Wo) for NCHW, (Ho * Wo, C)
// for channels_last; out and y_save are the full outputs, written with non-temporal stores
// where stream (float only; out and y_save must then be 16-byte aligned).
template <typename T>
void gate_band_kernel(const T* yb, const T* gate, T* out, T* y_save, const BandLayout& L,
                      bool channels_last, bool stream) {
  const int64_t nb = L.band.n1 - L.band.n0, C = L.C, P = L.Ho * L.Wo;
  const int64_t len = L.rows() * L.Wo;
  if (!channels_last) {
    at::parallel_for(0, nb * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t n = L.band.n0 + k / C, c = k % C;
        const T* src = yb + L.local_nchw(n, c);
        const T* gk = gate + c * P + L.band.r0 * L.Wo;
        const int64_t dst = L.full_nchw(n, c);
        gate_run_to(src, gk, out + dst, y_save != nullptr ? y_save + dst : nullptr, len, stream);
      }
      stream_fence(stream);
    });
  } else {
    // A sample's pixels of the band are contiguous in yb, the gate and the outputs alike.
    const int64_t grain = std::max<int64_t>(1, kPixelBlock / std::max<int64_t>(1, C));
    at::parallel_for(0, nb * len, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end;) {
        const int64_t n = L.band.n0 + k / len, p = k % len;
        const int64_t count = std::min(end - k, len - p);
        const T* src = yb + L.local_nhwc(n) + p * C;
        const T* gk = gate + (L.band.r0 * L.Wo + p) * C;
        const int64_t dst = L.full_nhwc(n) + p * C;
        gate_run_to(src, gk, out + dst, y_save != nullptr ? y_save + dst : nullptr, count * C,
                    stream);
        k += count;
      }
      stream_fence(stream);
    });
  }
}

// The backward gate pass of one band: dy = dout * gate (if dy != nullptr) and
// dgate (+)= sum_{n in band} dout * y (if dgate != nullptr; assigned for n == 0, so every
// element is written when the bands cover the output). dout is the full tensor, dy the
// band's own; y is the full tensor or, where y_local, the band's own; layouts as in
// gate_band_kernel; dgate has the gate's layout. Each dgate element is summed over n by one
// thread in a fixed order.
template <typename T>
void gate_backward_band_kernel(const T* dout, const T* y, bool y_local, const T* gate, T* dy,
                               T* dgate, const BandLayout& L, bool channels_last) {
  const int64_t C = L.C, P = L.Ho * L.Wo, len = L.rows() * L.Wo;
  if (!channels_last) {
    const int64_t blocks = (len + kPixelBlock - 1) / kPixelBlock;
    at::parallel_for(0, C * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t c = k / blocks;
        const int64_t p0 = (k % blocks) * kPixelBlock;
        const int64_t p1 = std::min(len, p0 + kPixelBlock);
        const T* g = gate + c * P + L.band.r0 * L.Wo;
        for (int64_t n = L.band.n0; n < L.band.n1; ++n) {
          const int64_t full = L.full_nchw(n, c), local = L.local_nchw(n, c);
          const T* d = dout + full;
          if (dy != nullptr) {
            T* dyk = dy + local;
            for (int64_t p = p0; p < p1; ++p) dyk[p] = d[p] * g[p];
          }
          if (dgate != nullptr) {
            const T* yk = y + (y_local ? local : full);
            T* dg = dgate + c * P + L.band.r0 * L.Wo;
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
    const int64_t grain = std::max<int64_t>(1, kPixelBlock / std::max<int64_t>(1, C));
    at::parallel_for(0, len, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const T* g = gate + (L.band.r0 * L.Wo + p) * C;
        for (int64_t n = L.band.n0; n < L.band.n1; ++n) {
          const int64_t full = L.full_nhwc(n) + p * C, local = L.local_nhwc(n) + p * C;
          const T* d = dout + full;
          if (dy != nullptr) {
            T* dyk = dy + local;
            for (int64_t c = 0; c < C; ++c) dyk[c] = d[c] * g[c];
          }
          if (dgate != nullptr) {
            const T* yk = y + (y_local ? local : full);
            T* dg = dgate + (L.band.r0 * L.Wo + p) * C;
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

// Adds a row band's input gradient gi (the gradient of in.rows) into sample n of
// grad_input. A sample's bands come in order, and `written` is how far its rows are written:
// the band's rows below it (the halo shared with the previous band) are added, the rest
// copied, and rows that no band reads (skipped by the stride) zeroed.
void scatter_band_input_grad(at::Tensor& grad_input, const at::Tensor& gi, int64_t n,
                             const BandInput& in, int64_t& written) {
  if (in.start >= in.end) return;
  auto dst = grad_input.narrow(0, n, 1);
  if (in.start > written) dst.narrow(2, written, in.start - written).zero_();
  const int64_t shared = std::min(written, in.end) - in.start;
  if (shared > 0) dst.narrow(2, in.start, shared).add_(gi.narrow(2, in.offset, shared));
  const int64_t from = std::max(in.start, written);
  if (in.end > from) {
    dst.narrow(2, from, in.end - from)
        .copy_(gi.narrow(2, in.offset + from - in.start, in.end - from));
  }
  written = std::max(written, in.end);
}

// dst = src^T for src (rows, cols) and dst (cols, rows), both contiguous, by transpose_tiled
// on slices of the longer side. PyTorch's strided copy (permute().contiguous()) took 74 ms of
// a 127 ms channels_last eval call at 2, 3->64, 512x512.
at::Tensor transposed(const at::Tensor& src) {
  const int64_t rows = src.size(0), cols = src.size(1);
  auto dst = empty_cached({cols, rows}, src.scalar_type(), at::MemoryFormat::Contiguous);
  const bool by_rows = rows >= cols;
  const int64_t longer = by_rows ? rows : cols, shorter = by_rows ? cols : rows;
  // Slices of about kPixelBlock elements, at least a tile wide.
  const int64_t slice = std::max<int64_t>(64, kPixelBlock / std::max<int64_t>(1, shorter));
  const int64_t slices = (longer + slice - 1) / slice;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "coordgate_transposed", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t a = k * slice, b = std::min(longer, a + slice);
        if (by_rows) {
          transpose_tiled(s + a * cols, cols, b - a, cols, d + a, rows);
        } else {
          transpose_tiled(s + a, cols, rows, b - a, d + a * rows, rows);
        }
      }
    });
  });
  return dst;
}

// A (C, Ho, Wo) gate (or gate gradient) as a contiguous tensor: a pixel-major one by the
// tiled transpose, anything else by ATen.
at::Tensor contiguous_gate(const at::Tensor& gate) {
  if (gate.is_contiguous() || !pixel_major(gate)) return gate.contiguous();
  const int64_t C = gate.size(0), P = gate.size(1) * gate.size(2);
  return transposed(gate.permute({1, 2, 0}).reshape({P, C})).view(gate.sizes());
}

// The gate laid out as the kernels above read it: (C, P) for NCHW, (P, C) for channels_last.
// A channels_last call given a pixel-major gate (as the modules' eval cache keeps it) reads
// it in place; any other gate is transposed, once per call.
at::Tensor gate_layout(const at::Tensor& gate, at::ScalarType dtype, bool channels_last) {
  const int64_t C = gate.size(0), P = gate.size(1) * gate.size(2);
  const auto g = gate.to(dtype);
  if (channels_last && pixel_major(g)) return g.permute({1, 2, 0}).reshape({P, C});
  const auto contiguous = contiguous_gate(g);
  return channels_last ? transposed(contiguous.view({C, P})) : contiguous;
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

void set_cpu_band_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 1, "cpu band bytes must be at least 1, got ", bytes);
  g_band_bytes.store(bytes);
}

int64_t cpu_band_bytes() { return g_band_bytes.load(); }

void set_cpu_stream_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "cpu stream bytes must be at least 0, got ", bytes);
  g_stream_bytes.store(bytes);
}

int64_t cpu_stream_bytes() { return g_stream_bytes.load(); }

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
  if (implicit_gemm_forward_for(cdtype)) {
    const std::vector<int64_t> shape{geo.batch, geo.channels, geo.out_h, geo.out_w};
    auto out = empty_cached(shape, cdtype, fmt);
    auto y = save_conv ? empty_cached(shape, cdtype, fmt) : at::Tensor();
    implicit_gemm_forward(geo, input.to(cdtype), weight.to(cdtype), cast_optional(bias, cdtype),
                          gate.to(cdtype), nullptr, out, save_conv ? &y : nullptr);
    return {mixed(out, mix_weight, mix_bias, cdtype).to(dtype),
            save_conv ? y.to(dtype) : at::empty({0}, input.options())};
  }
  const auto x = input.to(cdtype);
  const auto w = weight.to(cdtype);
  const auto b = cast_optional(bias, cdtype);
  const std::vector<int64_t> shape{geo.batch, geo.channels, geo.out_h, geo.out_w};
  auto out = empty_cached(shape, cdtype, fmt);
  auto y = save_conv ? empty_cached(shape, cdtype, fmt) : at::Tensor();
  const auto g = gate_layout(gate, cdtype, channels_last);
  // Streaming stores need the outputs' bases aligned alike (see gate_run_stream).
  const bool stream =
      dtype == at::kFloat && !mix_weight &&
      out.nbytes() * (save_conv ? 2 : 1) >= static_cast<size_t>(cpu_stream_bytes()) &&
      aligned16(out.data_ptr()) && (!save_conv || aligned16(y.data_ptr()));
  AT_DISPATCH_FLOATING_TYPES(cdtype, "gated_conv2d_cpu", [&] {
    for_each_band(x, w, b, geo, fmt, [&](const Band& band, const at::Tensor& yb) {
      gate_band_kernel<scalar_t>(yb.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(),
                                 save_conv ? y.data_ptr<scalar_t>() : nullptr,
                                 BandLayout{geo.channels, geo.out_h, geo.out_w, band},
                                 channels_last, stream);
    });
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
  const int64_t C = weight.size(0), P = out_h * out_w;
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
  // Gradients that were not asked for come back empty (each its own tensor: outputs of an
  // operator never alias one another).
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, input.options());
  at::Tensor grad_bias = at::empty({0}, input.options());
  at::Tensor grad_gate = at::empty({0}, input.options());
  const std::array<bool, 3> mask{output_mask[0], output_mask[1], output_mask[2] && bias.has_value()};
  const auto geo = conv_geometry(x, w, stride, padding, dilation, groups);
  // Band by band, each band's dy = dout * gate (and y, when recomputed) used while it is in
  // cache by ATen's convolution backward; the weight and bias gradients are the bands' sums,
  // added in band order.
  const auto bands = output_bands(geo, x.element_size());
  at::Tensor dgate;
  if (output_mask[3]) {
    dgate = channels_last ? empty_cached({P, C}, cdtype, at::MemoryFormat::Contiguous)
                          : empty_cached({C, P}, cdtype, at::MemoryFormat::Contiguous);
    if (bands.empty()) dgate.zero_();
  }
  if (bands.empty() && need_conv_grads) {
    // ATen's convolution backward does not take an empty batch; its gradients are zero.
    if (mask[0]) grad_input = at::zeros_like(input, fmt);
    if (mask[1]) grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
    if (mask[2]) grad_bias = at::zeros({C}, input.options());
  }
  const auto dout = grad_out.to(cdtype).contiguous(fmt);
  const bool recompute = output_mask[3] && conv_out.numel() == 0;
  const auto y = output_mask[3] && !recompute ? conv_out.to(cdtype).contiguous(fmt) : at::Tensor();
  const auto g = gate_layout(gate, cdtype, channels_last);
  const std::optional<at::IntArrayRef> bias_sizes =
      bias ? std::optional<at::IntArrayRef>(bias->sizes()) : std::nullopt;
  at::Tensor gx, gw_sum, gb_sum;
  int64_t sample = -1, written = 0;  // the row bands' sample, and its rows written in gx
  auto finish_sample = [&] {
    if (gx.defined() && sample >= 0 && written < geo.height) {
      gx.narrow(0, sample, 1).narrow(2, written, geo.height - written).zero_();
    }
  };
  AT_DISPATCH_FLOATING_TYPES(cdtype, "gated_conv2d_backward_cpu", [&] {
    for (const Band& band : bands) {
      const bool whole_rows = band.r0 == 0 && band.r1 == out_h;
      const BandInput in = band_input(x, geo, band, fmt);
      const auto yb = recompute ? band_conv(in, w, b, geo, fmt) : at::Tensor();
      const at::Tensor dyb =
          need_conv_grads
              ? empty_cached({band.n1 - band.n0, C, band.r1 - band.r0, out_w}, cdtype, fmt)
              : at::Tensor();
      gate_backward_band_kernel<scalar_t>(
          dout.data_ptr<scalar_t>(),
          recompute ? yb.data_ptr<scalar_t>() : (y.defined() ? y.data_ptr<scalar_t>() : nullptr),
          recompute, g.data_ptr<scalar_t>(),
          dyb.defined() ? dyb.data_ptr<scalar_t>() : nullptr,
          dgate.defined() ? dgate.data_ptr<scalar_t>() : nullptr,
          BandLayout{C, out_h, out_w, band}, channels_last);
      if (!need_conv_grads) continue;
      auto [gi, gw, gb] = at::convolution_backward(dyb, in.rows, w, bias_sizes, stride,
                                                   in.padding, dilation, false, {0, 0}, groups,
                                                   mask);
      if (mask[1]) gw_sum = gw_sum.defined() ? gw_sum.add_(gw) : gw;
      if (mask[2]) gb_sum = gb_sum.defined() ? gb_sum.add_(gb) : gb;
      if (!mask[0]) continue;
      if (whole_rows) {
        if (bands.size() == 1) {
          gx = gi;
        } else {
          if (!gx.defined()) gx = empty_cached(x.sizes(), cdtype, fmt);
          gx.narrow(0, band.n0, band.n1 - band.n0).copy_(gi);
        }
        continue;
      }
      if (!gx.defined()) gx = empty_cached(x.sizes(), cdtype, fmt);
      if (band.n0 != sample) {
        finish_sample();
        sample = band.n0;
        written = 0;
      }
      scatter_band_input_grad(gx, gi, band.n0, in, written);
    }
  });
  finish_sample();
  if (!bands.empty() && need_conv_grads) {
    if (mask[0]) grad_input = gx.to(dtype).contiguous(fmt);
    if (mask[1]) grad_weight = gw_sum.to(dtype).contiguous();
    if (mask[2]) grad_bias = gb_sum.to(dtype).contiguous();
  }
  if (output_mask[3]) {
    // channels_last: (Ho, Wo, C) memory, as the kernels wrote it.
    grad_gate = (channels_last ? dgate.view({out_h, out_w, C}).permute({2, 0, 1})
                               : dgate.view({C, out_h, out_w}))
                    .to(dtype);
  }
  return {grad_input, grad_weight, grad_bias, grad_gate};
}

}  // namespace

bool pixel_major(const at::Tensor& gate) { return gate.permute({1, 2, 0}).is_contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cpu_pixel_major(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& gate, const at::Tensor& conv_out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& gate, const at::Tensor& conv_out,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups,
                          const std::optional<at::Tensor>& mix_weight,
                          const std::optional<at::Tensor>& mix_bias,
                          std::array<bool, 6> output_mask) {
  auto grads = gated_conv2d_backward_cpu_pixel_major(grad_out, input, weight, bias, gate,
                                                     conv_out, stride, padding, dilation,
                                                     groups, mix_weight, mix_bias, output_mask);
  // The operator's gate gradient is contiguous, whatever the input's layout.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::get<3>(grads) = contiguous_gate(std::get<3>(grads));
  return grads;
}

TORCH_LIBRARY_IMPL(coordgate_ext, CPU, m) {
  m.impl("gated_conv2d", &gated_conv2d_cpu);
  m.impl("gated_conv2d_backward", &gated_conv2d_backward_cpu);
}

}  // namespace coordgate
