// The operator schemas of coordgate_ext (one TORCH_LIBRARY block) and the module init of
// coordgate_ext._C. Kernels register themselves per backend (csrc/cpu, csrc/cuda); fake
// kernels and autograd are registered in Python (coordgate_ext/ops).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "cpu/output_cache.h"
#include "ops.h"

namespace coordgate {

namespace {

// Checked before anything divides by them.
void check_conv_hyperparameters(at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "gated_conv2d: stride, padding and dilation must have two entries each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "gated_conv2d: stride must be positive, got ",
              stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0,
              "gated_conv2d: dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0,
              "gated_conv2d: padding must be non-negative, got ", padding);
}

}  // namespace

Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "tanh") return Activation::kTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "softplus") return Activation::kSoftplus;
  TORCH_CHECK(false,
              "coordgate_ext: activation must be one of none, relu, sigmoid, tanh, silu, gelu, "
              "softplus; got '", name, "'");
}

void check_mlp_args(at::TensorList weights, at::TensorList biases, int64_t height,
                    int64_t width) {
  TORCH_CHECK(!weights.empty(), "mlp_gate: expected at least one encoder layer, got none");
  TORCH_CHECK(weights.size() == biases.size(), "mlp_gate: expected one bias per weight, got ",
              weights.size(), " weights and ", biases.size(), " biases");
  TORCH_CHECK(height > 0 && width > 0, "mlp_gate: expected a non-empty output grid, got ",
              height, "x", width);
  int64_t in_features = 2;
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& w = weights[l];
    const auto& b = biases[l];
    TORCH_CHECK(w.dim() == 2, "mlp_gate: encoder weight ", l, " must be 2-D (out, in), got ",
                w.dim(), "-D");
    TORCH_CHECK(w.size(1) == in_features, "mlp_gate: encoder width mismatch: layer ", l,
                " expects ", w.size(1), " input features but the previous layer gives ",
                in_features);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "mlp_gate: encoder bias ", l,
                " must have shape (", w.size(0), "), got ", b.sizes());
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type() &&
                    b.scalar_type() == weights[0].scalar_type(),
                "mlp_gate: every encoder parameter must have one dtype; got ",
                w.scalar_type(), " and ", b.scalar_type(), " beside ",
                weights[0].scalar_type());
    TORCH_CHECK(w.device() == weights[0].device() && b.device() == weights[0].device(),
                "mlp_gate: every encoder parameter must be on one device; got ", w.device(),
                " and ", b.device(), " beside ", weights[0].device());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()),
                "mlp_gate: encoder parameters must be floating point, got ", w.scalar_type());
    in_features = w.size(0);
  }
}

std::pair<int64_t, int64_t> check_gated_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& gate, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "gated_conv2d: expected a 4-D input (N, Cin, H, W), got ",
              input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4,
              "gated_conv2d: expected a 4-D weight (C, Cin/groups, kh, kw), got ",
              weight.dim(), "-D");
  TORCH_CHECK(gate.dim() == 3, "gated_conv2d: expected a 3-D gate (C, Ho, Wo), got ",
              gate.dim(), "-D");
  check_conv_hyperparameters(stride, padding, dilation);
  TORCH_CHECK(groups > 0, "gated_conv2d: groups must be positive, got ", groups);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype),
              "gated_conv2d: expected a floating-point input, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype && gate.scalar_type() == dtype &&
                  (!bias || bias->scalar_type() == dtype),
              "gated_conv2d: input, weight, bias and gate must have one dtype; got input ",
              dtype, ", weight ", weight.scalar_type(), ", gate ", gate.scalar_type(),
              bias ? ", bias " : "", bias ? c10::toString(bias->scalar_type()) : "");
  TORCH_CHECK(weight.device() == input.device() && gate.device() == input.device() &&
                  (!bias || bias->device() == input.device()),
              "gated_conv2d: input, weight, bias and gate must be on one device; got input ",
              input.device(), ", weight ", weight.device(), ", gate ", gate.device());
  const int64_t channels = weight.size(0);
  TORCH_CHECK(channels % groups == 0, "gated_conv2d: output channels (", channels,
              ") must be divisible by groups (", groups, ")");
  // ATen's convolution returns zero output channels for zero input channels, and the
  // reference cannot gate that: an empty reduction is refused.
  TORCH_CHECK(weight.size(1) > 0,
              "gated_conv2d: expected at least one input channel per group, got a weight of "
              "shape ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, "gated_conv2d: expected input with ",
              weight.size(1) * groups, " channels (weight ", weight.sizes(), ", groups ",
              groups, "), got ", input.size(1));
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels,
                "gated_conv2d: expected a bias of shape (", channels, "), got ",
                bias->sizes());
  }
  const auto [out_h, out_w] = conv_output_grid(input, weight, stride, padding, dilation);
  TORCH_CHECK(gate.size(0) == channels && gate.size(1) == out_h && gate.size(2) == out_w,
              "gated_conv2d: expected a gate of shape (", channels, ", ", out_h, ", ", out_w,
              "), got ", gate.sizes());
  return {out_h, out_w};
}

void check_gated_backward_shapes(const at::Tensor& grad_out, const at::Tensor& conv_out,
                                 const at::Tensor& input, const at::Tensor& weight,
                                 int64_t out_h, int64_t out_w) {
  const std::vector<int64_t> shape{input.size(0), weight.size(0), out_h, out_w};
  const at::IntArrayRef out_shape(shape);
  TORCH_CHECK(grad_out.sizes() == out_shape,
              "gated_conv2d_backward: expected grad_out of shape ", out_shape, ", got ",
              grad_out.sizes());
  TORCH_CHECK(conv_out.numel() == 0 || conv_out.sizes() == out_shape,
              "gated_conv2d_backward: expected conv_out of shape ", out_shape,
              " or empty (recompute), got ", conv_out.sizes());
}

std::pair<int64_t, int64_t> conv_output_grid(const at::Tensor& input, const at::Tensor& weight,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation) {
  // Checked here too: callers may ask for the grid before the full argument checks.
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4,
              "gated_conv2d: expected a 4-D input and a 4-D weight, got ", input.dim(), "-D and ",
              weight.dim(), "-D");
  check_conv_hyperparameters(stride, padding, dilation);
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0,
              "gated_conv2d: expected a non-empty kernel, got ", weight.size(2), "x",
              weight.size(3));
  const int64_t out_h = conv_out_size(input.size(2), weight.size(2), stride[0], padding[0],
                                      dilation[0]);
  const int64_t out_w = conv_out_size(input.size(3), weight.size(3), stride[1], padding[1],
                                      dilation[1]);
  TORCH_CHECK(out_h > 0 && out_w > 0, "gated_conv2d: the output would be empty (", out_h,
              "x", out_w, ") for input ", input.sizes(), " and kernel ", weight.size(2), "x",
              weight.size(3));
  return {out_h, out_w};
}

ConvGeometry conv_geometry(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  const auto [out_h, out_w] = conv_output_grid(input, weight, stride, padding, dilation);
  return ConvGeometry{input.size(0),  input.size(1), input.size(2), input.size(3),
                      weight.size(0), weight.size(2), weight.size(3), out_h,
                      out_w,          stride[0],      stride[1],     padding[0],
                      padding[1],     dilation[0],    dilation[1],   groups};
}

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

void check_mix_args(const std::optional<at::Tensor>& mix_weight,
                    const std::optional<at::Tensor>& mix_bias, const at::Tensor& input,
                    int64_t channels) {
  if (!mix_weight) {
    TORCH_CHECK(!mix_bias, "gated_conv2d: a mix_bias was given without a mix_weight");
    return;
  }
  const auto& m = *mix_weight;
  TORCH_CHECK(m.dim() == 4 && m.size(1) == channels && m.size(2) == 1 && m.size(3) == 1,
              "gated_conv2d: expected a mix_weight of shape (Cout, ", channels,
              ", 1, 1), got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == input.scalar_type() &&
                  (!mix_bias || mix_bias->scalar_type() == input.scalar_type()),
              "gated_conv2d: mix_weight and mix_bias must have the input's dtype (",
              input.scalar_type(), "); got ", m.scalar_type());
  TORCH_CHECK(m.device() == input.device() &&
                  (!mix_bias || mix_bias->device() == input.device()),
              "gated_conv2d: mix_weight and mix_bias must be on the input's device (",
              input.device(), "); got ", m.device());
  if (mix_bias) {
    TORCH_CHECK(mix_bias->dim() == 1 && mix_bias->size(0) == m.size(0),
                "gated_conv2d: expected a mix_bias of shape (", m.size(0), "), got ",
                mix_bias->sizes());
  }
}

at::Tensor apply_mix(const at::Tensor& gated, const at::Tensor& mix_weight,
                     const std::optional<at::Tensor>& mix_bias) {
  const auto fmt = output_memory_format(gated);
  return at::conv2d(gated, mix_weight, mix_bias).contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_backward(
    const at::Tensor& grad_out, const at::Tensor& conv, const at::Tensor& gate,
    const at::Tensor& mix_weight, bool need_gated, bool need_weight, bool need_bias) {
  const auto fmt = output_memory_format(grad_out);
  at::Tensor grad_gated, grad_weight, grad_bias;
  const auto m2d = mix_weight.view({mix_weight.size(0), mix_weight.size(1)});
  if (need_gated) {
    // d gated[n, c] = sum_o M[o, c] d out[n, o]: a 1x1 convolution by M^T.
    grad_gated = at::conv2d(grad_out, m2d.t().reshape({m2d.size(1), m2d.size(0), 1, 1}))
                     .contiguous(fmt);
  }
  if (need_weight) {
    // d M[o, c] = sum_{n, pixel} d out[n, o] * gate[c] * conv[n, c].
    const auto gated = conv * gate.unsqueeze(0);
    grad_weight = at::einsum("nohw,nchw->oc", {grad_out, gated}).view(mix_weight.sizes());
  }
  if (need_bias) grad_bias = grad_out.sum({0, 2, 3});
  return {grad_gated, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_backward_with_mix(
    const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& conv_out,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask,
    const std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, std::array<bool, 4>)>& core,
    const std::function<at::Tensor()>& recompute_conv) {
  const std::array<bool, 4> mask{output_mask[0], output_mask[1], output_mask[2],
                                 output_mask[3]};
  auto empty = [&] { return at::empty({0}, grad_out.options()); };
  if (!mix_weight) {
    TORCH_CHECK(!output_mask[4] && !output_mask[5],
                "gated_conv2d_backward: mix gradients asked for without a mix_weight");
    auto [gi, gw, gb, gg] = core(grad_out, conv_out, mask);
    return {gi, gw, gb, gg, empty(), empty()};
  }
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(1) == mix_weight->size(0),
              "gated_conv2d_backward: expected grad_out of shape (N, ", mix_weight->size(0),
              ", Ho, Wo) (the mix's output channels), got ", grad_out.sizes());
  const bool need_gated = mask[0] || mask[1] || mask[2] || mask[3];
  at::Tensor conv = conv_out;
  if (output_mask[4] && conv.numel() == 0) conv = recompute_conv();
  const auto dtype = grad_out.scalar_type();
  const auto cdtype = compute_dtype(dtype);
  auto [grad_gated, grad_mix_w, grad_mix_b] = mix_backward(
      grad_out.to(cdtype), output_mask[4] ? conv.to(cdtype) : conv, gate.to(cdtype),
      mix_weight->to(cdtype), need_gated, output_mask[4], output_mask[5] && mix_bias);
  at::Tensor gi = empty(), gw = empty(), gb = empty(), gg = empty();
  if (need_gated) std::tie(gi, gw, gb, gg) = core(grad_gated.to(dtype), conv, mask);
  return {gi, gw, gb, gg, output_mask[4] ? grad_mix_w.to(dtype) : empty(),
          output_mask[5] && mix_bias ? grad_mix_b.to(dtype) : empty()};
}

std::pair<int64_t, int64_t> mlp_gated_conv2d_grid(const at::Tensor& input, const at::Tensor& weight,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "mlp_gated_conv2d: expected a 4-D input (N, Cin, H, W), got ",
              input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "mlp_gated_conv2d: expected a 4-D weight and two-entry stride, padding, dilation");
  return conv_output_grid(input, weight, stride, padding, dilation);
}

void check_encoder_device(at::TensorList encoder_weights, const at::Tensor& input) {
  TORCH_CHECK(!encoder_weights.empty() && encoder_weights[0].device() == input.device(),
              "mlp_gated_conv2d: the encoder's parameters must be on the input's device (",
              input.device(), ")");
}

void check_mlp_gated_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::TensorList encoder_weights, at::TensorList encoder_biases, int64_t out_h, int64_t out_w,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias) {
  check_mlp_args(encoder_weights, encoder_biases, out_h, out_w);
  check_encoder_device(encoder_weights, input);
  TORCH_CHECK(encoder_weights.back().size(0) == weight.size(0),
              "mlp_gated_conv2d: the encoder gives ", encoder_weights.back().size(0),
              " gate channels, the convolution ", weight.size(0));
  check_gated_conv2d_args(
      input, weight, bias,
      at::empty({1, 1, 1}, input.options()).expand({weight.size(0), out_h, out_w}), stride,
      padding, dilation, groups);
  check_mix_args(mix_weight, mix_bias, input, weight.size(0));
}

EncoderSpec encoder_spec(at::TensorList encoder_weights, at::TensorList encoder_biases,
                         c10::string_view hidden_activation, c10::string_view gate_activation,
                         std::optional<at::ScalarType> dtype) {
  EncoderSpec enc{{}, {}, parse_activation(hidden_activation), parse_activation(gate_activation)};
  for (size_t l = 0; l < encoder_weights.size(); ++l) {
    const auto w = encoder_weights[l], b = encoder_biases[l];
    enc.weight.push_back(dtype ? w.to(*dtype).contiguous() : w.contiguous());
    enc.bias.push_back(dtype ? b.to(*dtype).contiguous() : b.contiguous());
  }
  return enc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
mlp_gated_conv2d_backward_with(
    const MlpGateFn& mlp_gate, const GatedBackwardFn& gated_backward,
    const MlpGateBackwardFn& mlp_gate_backward,
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::TensorList encoder_weights,
    at::TensorList encoder_biases, c10::string_view hidden_activation,
    c10::string_view gate_activation, const at::Tensor& conv_out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& mix_weight, const std::optional<at::Tensor>& mix_bias,
    std::array<bool, 6> output_mask) {
  TORCH_CHECK(grad_out.dim() == 4, "mlp_gated_conv2d_backward: expected a 4-D grad_out, got ",
              grad_out.dim(), "-D");
  check_encoder_device(encoder_weights, input);
  const int64_t out_h = grad_out.size(2), out_w = grad_out.size(3);
  const auto gate = mlp_gate(encoder_weights, encoder_biases, out_h, out_w, hidden_activation,
                             gate_activation);
  auto [grad_input, grad_weight, grad_bias, grad_gate, grad_mix_w, grad_mix_b] =
      gated_backward(grad_out, input, weight, bias, gate.to(input.scalar_type()), conv_out,
                     stride, padding, dilation, groups, mix_weight, mix_bias, output_mask);
  std::vector<at::Tensor> grad_enc_w, grad_enc_b;
  if (output_mask[3]) {
    std::tie(grad_enc_w, grad_enc_b) =
        mlp_gate_backward(grad_gate.to(encoder_weights[0].scalar_type()), encoder_weights,
                          encoder_biases, out_h, out_w, hidden_activation, gate_activation);
  } else {
    // Not asked for: empty tensors, one per parameter (outputs never alias one another).
    for (size_t l = 0; l < encoder_weights.size(); ++l) {
      grad_enc_w.push_back(at::empty({0}, encoder_weights[l].options()));
      grad_enc_b.push_back(at::empty({0}, encoder_biases[l].options()));
    }
  }
  return {grad_input, grad_weight, grad_bias, grad_enc_w, grad_enc_b, grad_mix_w, grad_mix_b};
}

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

}  // namespace coordgate

TORCH_LIBRARY(coordgate_ext, m) {
  // The (C, height, width) gate of an MLP coordinate encoder:
  // gate[:, i, j] = gate_act(W_L ... hidden_act(W_1 [r_i, q_j] + b_1) ... + b_L),
  // r = linspace(-1, 1, height), q = linspace(-1, 1, width).
  m.def(
      "mlp_gate(Tensor[] weights, Tensor[] biases, SymInt height, SymInt width, "
      "str hidden_activation, str gate_activation) -> Tensor");
  m.def(
      "mlp_gate_backward(Tensor grad_gate, Tensor[] weights, Tensor[] biases, SymInt height, "
      "SymInt width, str hidden_activation, str gate_activation) -> (Tensor[], Tensor[])");
  // gated = gate[None] * (conv2d(input, weight, bias, stride, padding, dilation, groups));
  // out = gated, or conv2d(gated, mix_weight (Cout, C, 1, 1), mix_bias) with a 1x1 mix.
  // Returns (out, conv) where conv is the ungated convolution when save_conv is true (what
  // backward needs for the gate's and the mix weight's gradients) and an empty tensor
  // otherwise.
  m.def(
      "gated_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor gate, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor? mix_weight, Tensor? mix_bias, "
      "bool save_conv) -> (Tensor, Tensor)");
  // Gradients (input, weight, bias, gate, mix_weight, mix_bias); an entry whose output_mask
  // is false comes back as an empty tensor. An empty conv_out means: recompute it from input.
  m.def(
      "gated_conv2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor gate, Tensor conv_out, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, Tensor? mix_weight, Tensor? mix_bias, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // gated_conv2d with gate = mlp_gate(encoder_weights, encoder_biases, Ho, Wo, ...) evaluated
  // inside the op (and again in backward): nothing of the gate's size is saved.
  m.def(
      "mlp_gated_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor[] encoder_weights, "
      "Tensor[] encoder_biases, str hidden_activation, str gate_activation, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor? mix_weight, Tensor? mix_bias, "
      "bool save_conv) -> (Tensor, Tensor)");
  // Gradients (input, weight, bias, encoder weights, encoder biases, mix_weight, mix_bias);
  // output_mask entries are input, weight, bias, encoder, mix_weight, mix_bias.
  m.def(
      "mlp_gated_conv2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor[] encoder_weights, Tensor[] encoder_biases, str hidden_activation, "
      "str gate_activation, Tensor conv_out, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, Tensor? mix_weight, Tensor? mix_bias, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");
}

namespace {

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  coordgate::empty_output_cache();
  Py_RETURN_NONE;
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(coordgate::output_cache_bytes());
}

// "auto" | "aten" | "implicit_gemm" (see CpuEngine in csrc/cpu/kernels.h).
constexpr const char* kEngineNames[] = {"auto", "aten", "implicit_gemm"};

PyObject* set_cpu_engine(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (int e = 0; e < 3; ++e) {
    if (std::string(name) == kEngineNames[e]) {
      coordgate::set_cpu_engine(static_cast<coordgate::CpuEngine>(e));
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError,
               "cpu engine must be one of 'auto', 'aten', 'implicit_gemm'; got '%s'", name);
  return nullptr;
}

PyObject* cpu_engine(PyObject*, PyObject*) {
  return PyUnicode_FromString(kEngineNames[static_cast<int>(coordgate::cpu_engine())]);
}

// A process-wide byte-count setting of the CPU kernels, as Python sees it.
struct ByteSetting {
  const char* what;
  long long minimum;
  void (*set)(int64_t);
  int64_t (*get)();
};

constexpr ByteSetting kBandBytes{"cpu band bytes", 1, &coordgate::set_cpu_band_bytes,
                                 &coordgate::cpu_band_bytes};
constexpr ByteSetting kStreamBytes{"cpu stream bytes", 0, &coordgate::set_cpu_stream_bytes,
                                   &coordgate::cpu_stream_bytes};

template <const ByteSetting& S>
PyObject* set_bytes(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes < S.minimum) {
    PyErr_Format(PyExc_ValueError, "%s must be at least %lld, got %lld", S.what, S.minimum,
                 bytes);
    return nullptr;
  }
  S.set(bytes);
  Py_RETURN_NONE;
}

template <const ByteSetting& S>
PyObject* get_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(S.get());
}

PyMethodDef module_methods[] = {
    {"set_cpu_engine", set_cpu_engine, METH_O,
     "Chooses how the CPU kernels convolve: 'auto', 'aten' or 'implicit_gemm'."},
    {"cpu_engine", cpu_engine, METH_NOARGS, "The CPU kernels' convolution engine."},
    {"set_cpu_band_bytes", set_bytes<kBandBytes>, METH_O,
     "Output bytes per band of the ATen engine's banded convolution."},
    {"cpu_band_bytes", get_bytes<kBandBytes>, METH_NOARGS,
     "Output bytes per band of the ATen engine's banded convolution."},
    {"set_cpu_stream_bytes", set_bytes<kStreamBytes>, METH_O,
     "Output bytes from which the ATen engine writes the forward's outputs with streaming "
     "stores."},
    {"cpu_stream_bytes", get_bytes<kStreamBytes>, METH_NOARGS,
     "Output bytes from which the ATen engine writes the forward's outputs with streaming "
     "stores."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS,
     "Frees the host buffers cached for the CPU kernels' large outputs."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS,
     "Bytes held in free host buffers cached for the CPU kernels."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing coordgate_ext._C runs the static registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
}
