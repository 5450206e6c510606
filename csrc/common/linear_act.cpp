#include "common/linear_act.h"

#include "common/checks.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <iterator>
#include <string>
#include <vector>

namespace customlayers {
namespace {

// The activations' names, in Activation's order (customlayers/_activations.py's table).
constexpr const char* kActivationNames[] = {"none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"};

// The kernels take the weight as (in, out) of any strides: weight_t's (out, in) weight as its transposed view.
LinearForward prepare_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              c10::string_view act, bool weight_t) {
  constexpr const char* op = "linear_act";
  const at::Tensor& b = defined_or_empty(bias);
  check_linear_inputs(op, x, weight, b, weight_t);
  const Activation activation = activation_of(act, op);
  const at::Tensor w = weight_t ? weight.t() : weight;
  const int64_t M = linear_rows(x), K = w.size(0), N = w.size(1);
  return {as_matrix(x, M, K), w, b.defined() ? b.contiguous() : at::Tensor(), activation, M, K, N};
}

LinearBackward prepare_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& out, c10::string_view act) {
  constexpr const char* op = "linear_act_backward";
  check_linear_inputs(op, x, weight, at::Tensor());
  const Activation activation = activation_of(act, op);
  const ActSaved needs = act_saved(activation);
  const bool uses_out = needs != ActSaved::kNothing;
  check_floating(grad, op, "grad");
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": expected grad and x to have the same dtype, but grad is ",
                   grad.scalar_type(), " and x is ", x.scalar_type());
  check_same_device(op, {{"x", &x}, {"grad", &grad}, {"out", uses_out ? &out : nullptr}});
  const std::vector<int64_t> shape = linear_output_shape(x, weight);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), op, ": expected grad of shape ", at::IntArrayRef(shape),
              " (x's shape with out_features last), but got shape ", grad.sizes());
  if (uses_out) {
    TORCH_CHECK(out.defined(), op, ": act='", std::string(act), "' needs `out`: ",
                needs == ActSaved::kOutput ? "the forward's output" : "the pre-activation x @ weight + bias");
    TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op,
                     ": expected out and x to have the same dtype, but out is ", out.scalar_type(), " and x is ",
                     x.scalar_type());
    TORCH_CHECK(out.sizes() == grad.sizes(), op, ": expected out of shape ", grad.sizes(), ", but got shape ",
                out.sizes());
  }
  const int64_t M = linear_rows(x), K = weight.size(0), N = weight.size(1);
  return {unit_column_stride(as_matrix(grad, M, N)), as_matrix(x, M, K), weight,
          uses_out ? unit_column_stride(as_matrix(out, M, N)) : at::Tensor(), activation, M, K, N};
}

}  // namespace

void check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         bool weight_t, const char* weight_name, const char* bias_name) {
  const int64_t in_dim = weight_t ? 1 : 0;
  const bool has_bias = bias.defined();
  check_floating(x, op, "x");
  check_floating(weight, op, weight_name);
  if (has_bias) check_floating(bias, op, bias_name);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": expected x and ", weight_name,
                   " to have the same dtype, but x is ", x.scalar_type(), " and ", weight_name, " is ",
                   weight.scalar_type());
  if (has_bias)
    TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), op, ": expected x and ", bias_name,
                     " to have the same dtype, but x is ", x.scalar_type(), " and ", bias_name, " is ",
                     bias.scalar_type());
  check_same_device(op, {{"x", &x}, {weight_name, &weight}, {bias_name, has_bias ? &bias : nullptr}});
  TORCH_CHECK(weight.dim() == 2, op, ": expected ", weight_name, " to be 2-D ",
              weight_t ? "(out_features, in_features)" : "(in_features, out_features)", ", but got shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": expected x to have at least 1 dimension (*, in_features), but got shape ",
              x.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(in_dim), op, ": x's last dimension must equal ", weight_name,
              "'s in_features (", weight_name, ".shape[", in_dim, "]), but x has shape ", x.sizes(), " and ",
              weight_name, " has shape ", weight.sizes());
  if (has_bias)
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(1 - in_dim), op, ": expected ", bias_name,
                " of shape [", weight.size(1 - in_dim), "] (out_features,), but got shape ", bias.sizes());
}

std::vector<int64_t> linear_output_shape(const at::Tensor& x, const at::Tensor& weight) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(1);
  return shape;
}

at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

std::array<int64_t, 2> weight_grad_strides(const at::Tensor& weight) {
  const int64_t K = weight.size(0), N = weight.size(1);
  const bool transposed = weight.stride(0) == 1 && weight.stride(1) != 1;  // nn.Linear.weight.t()
  return transposed ? std::array<int64_t, 2>{1, K} : std::array<int64_t, 2>{N, 1};
}

const at::Tensor& defined_or_empty(const std::optional<at::Tensor>& t) {
  static const at::Tensor kUndefined;
  return t.has_value() ? *t : kUndefined;
}

std::optional<Activation> find_activation(c10::string_view act) {
  for (size_t i = 0; i < std::size(kActivationNames); ++i)
    if (act == kActivationNames[i]) return static_cast<Activation>(i);
  return std::nullopt;
}

Activation activation_of(c10::string_view act, const char* op) {
  if (const std::optional<Activation> found = find_activation(act)) return *found;
  std::string names;
  for (const char* name : kActivationNames) names += std::string(names.empty() ? "'" : ", '") + name + "'";
  TORCH_CHECK_VALUE(false, op, ": act must be one of ", names, ", but got '", std::string(act), "'");
}

const char* activation_name(Activation act) { return kActivationNames[static_cast<size_t>(act)]; }

int64_t linear_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

at::Tensor linear_act(const LinearActKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view act, bool weight_t) {
  const LinearForward args = prepare_forward(x, weight, bias, act, weight_t);
  at::Tensor out = kernels.empty({args.M, args.N}, {args.N, 1}, x);
  if (out.numel() > 0) kernels.forward(args, out);
  return x.dim() == 2 ? out : out.view(linear_output_shape(x, args.weight));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const LinearActKernels& kernels,
                                                                   const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act, std::array<bool, 3> mask) {
  const LinearBackward args = prepare_backward(grad, x, weight, defined_or_empty(out), act);
  const int64_t M = args.M, K = args.K, N = args.N;
  LinearGrads grads;
  if (mask[0]) grads.dx = kernels.empty({M, K}, {K, 1}, x);
  if (mask[1]) grads.dw = kernels.empty({K, N}, weight_grad_strides(weight), x);
  if (mask[2]) grads.db = kernels.empty({N}, {1}, x);
  if (mask[0] || mask[1] || mask[2]) kernels.backward(args, grads);
  if (grads.dx.defined() && x.dim() != 2) grads.dx = grads.dx.view(x.sizes());
  return {grads.dx, grads.dw, grads.db};
}

}  // namespace customlayers
