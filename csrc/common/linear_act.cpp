#include "common/linear_act.h"

#include "common/checks.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

namespace customlayers {

Activation parse_activation(c10::string_view act, const char* op) {
  if (act == "relu") return Activation::kRelu;
  if (act == "none") return Activation::kNone;
  TORCH_CHECK_VALUE(false, op, ": act must be 'relu' or 'none', but got '", std::string(act), "'");
}

void check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  check_floating(x, op, "x");
  check_floating(weight, op, "weight");
  if (has_bias) check_floating(*bias, op, "bias");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op,
                   ": expected x and weight to have the same dtype, but x is ", x.scalar_type(), " and weight is ",
                   weight.scalar_type());
  if (has_bias)
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op,
                     ": expected x and bias to have the same dtype, but x is ", x.scalar_type(), " and bias is ",
                     bias->scalar_type());
  check_same_device(op, {{"x", &x}, {"weight", &weight}, {"bias", has_bias ? &*bias : nullptr}});
  TORCH_CHECK(weight.dim() == 2, op, ": expected weight to be 2-D (in_features, out_features), but got shape ",
              weight.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": expected x to have at least 1 dimension (*, in_features), but got shape ",
              x.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(0), op,
              ": x's last dimension must equal weight's in_features (weight.shape[0]), but x has shape ", x.sizes(),
              " and weight has shape ", weight.sizes());
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(1), op, ": expected bias of shape [",
                weight.size(1), "] (out_features,), but got shape ", bias->sizes());
}

std::vector<int64_t> linear_output_shape(const at::Tensor& x, const at::Tensor& weight) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(1);
  return shape;
}

int64_t linear_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.dim() == 2 ? t : t.reshape({rows, cols});
}

at::Tensor as_leading_shape(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  return x.dim() == 2 ? out : out.view(linear_output_shape(x, weight));
}

std::array<int64_t, 2> weight_grad_strides(const at::Tensor& weight) {
  const int64_t K = weight.size(0), N = weight.size(1);
  if (weight.stride(0) == 1 && weight.stride(1) != 1) return {1, K};
  return {N, 1};
}

at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

Activation check_linear_backward_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& out_arg, c10::string_view act_name) {
  constexpr const char* op = "linear_act_backward";
  check_linear_inputs(op, x, weight, std::nullopt);
  const Activation act = parse_activation(act_name, op);
  const at::Tensor out = out_arg.has_value() ? *out_arg : at::Tensor();
  check_floating(grad, op, "grad");
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": expected grad and x to have the same dtype, but grad is ",
                   grad.scalar_type(), " and x is ", x.scalar_type());
  check_same_device(op, {{"x", &x}, {"grad", &grad}, {"out", act == Activation::kRelu ? &out : nullptr}});
  const std::vector<int64_t> shape = linear_output_shape(x, weight);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), op, ": expected grad of shape ", at::IntArrayRef(shape),
              " (x's shape with out_features last), but got shape ", grad.sizes());
  if (act == Activation::kRelu) {
    TORCH_CHECK(out.defined(), op, ": act='relu' needs the forward output `out`");
    TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op,
                     ": expected out and x to have the same dtype, but out is ", out.scalar_type(), " and x is ",
                     x.scalar_type());
    TORCH_CHECK(out.sizes() == grad.sizes(), op, ": expected out of shape ", grad.sizes(), ", but got shape ",
                out.sizes());
  }
  return act;
}

}  // namespace customlayers
