#include "common/linear_glu.h"

#include "common/checks.h"

#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace customlayers {
namespace {

void check_same_shape(const char* op, const at::Tensor& weight_gate, const at::Tensor& weight_up) {
  TORCH_CHECK(weight_gate.sizes() == weight_up.sizes(), op,
              ": expected weight_gate and weight_up to have the same shape, but weight_gate has shape ",
              weight_gate.sizes(), " and weight_up has shape ", weight_up.sizes());
}

// A pre-activation saved by the forward (gate, up): x's dtype and device, grad's shape.
void check_saved(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const at::Tensor& grad) {
  check_floating(t, op, name);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " and x to have the same dtype, but ",
                   name, " is ", t.scalar_type(), " and x is ", x.scalar_type());
  TORCH_CHECK(t.sizes() == grad.sizes(), op, ": expected ", name, " of shape ", grad.sizes(), " (grad's), but got shape ",
              t.sizes());
}

// The kernels take the weights as (in, out) of any strides: weight_t's (out, in) weights as transposed views.
GluForward prepare_forward(const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
                           const at::Tensor& bias_gate, const at::Tensor& bias_up, c10::string_view act,
                           bool weight_t) {
  constexpr const char* op = "linear_glu";
  check_linear_inputs(op, x, weight_gate, bias_gate, weight_t, "weight_gate", "bias_gate");
  check_linear_inputs(op, x, weight_up, bias_up, weight_t, "weight_up", "bias_up");
  check_same_shape(op, weight_gate, weight_up);
  const Activation activation = activation_of(act, op);
  const at::Tensor wg = weight_t ? weight_gate.t() : weight_gate, wu = weight_t ? weight_up.t() : weight_up;
  const int64_t M = linear_rows(x), K = wg.size(0), N = wg.size(1);
  const auto bias = [](const at::Tensor& b) { return b.defined() ? b.contiguous() : at::Tensor(); };
  return {as_matrix(x, M, K), wg, wu, bias(bias_gate), bias(bias_up), activation, M, K, N};
}

GluBackward prepare_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_gate,
                             const at::Tensor& weight_up, const at::Tensor& gate, const at::Tensor& up,
                             c10::string_view act) {
  constexpr const char* op = "linear_glu_backward";
  check_linear_inputs(op, x, weight_gate, at::Tensor(), false, "weight_gate");
  check_linear_inputs(op, x, weight_up, at::Tensor(), false, "weight_up");
  check_same_shape(op, weight_gate, weight_up);
  const Activation activation = activation_of(act, op);
  check_floating(grad, op, "grad");
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": expected grad and x to have the same dtype, but grad is ",
                   grad.scalar_type(), " and x is ", x.scalar_type());
  check_same_device(op, {{"x", &x}, {"grad", &grad}, {"gate", &gate}, {"up", &up}});
  const std::vector<int64_t> shape = linear_output_shape(x, weight_gate);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), op, ": expected grad of shape ", at::IntArrayRef(shape),
              " (x's shape with hidden_features last), but got shape ", grad.sizes());
  check_saved(op, "gate", gate, x, grad);
  check_saved(op, "up", up, x, grad);
  const int64_t M = linear_rows(x), K = weight_gate.size(0), N = weight_gate.size(1);
  const auto rows = [&](const at::Tensor& t) { return unit_column_stride(as_matrix(t, M, N)); };
  return {rows(grad), as_matrix(x, M, K), weight_gate, weight_up, rows(gate), rows(up), activation, M, K, N};
}

}  // namespace

at::Tensor linear_glu(const LinearGluKernels& kernels, const at::Tensor& x, const at::Tensor& weight_gate,
                      const at::Tensor& weight_up, const std::optional<at::Tensor>& bias_gate,
                      const std::optional<at::Tensor>& bias_up, c10::string_view act, bool weight_t) {
  const GluForward args = prepare_forward(x, weight_gate, weight_up, defined_or_empty(bias_gate),
                                          defined_or_empty(bias_up), act, weight_t);
  at::Tensor out = kernels.empty({args.M, args.N}, {args.N, 1}, x);
  if (out.numel() > 0) kernels.forward(args, out, nullptr, nullptr);
  return x.dim() == 2 ? out : out.view(linear_output_shape(x, args.weight_gate));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_glu_forward(
    const LinearGluKernels& kernels, const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
    const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up, c10::string_view act,
    bool weight_t) {
  const GluForward args = prepare_forward(x, weight_gate, weight_up, defined_or_empty(bias_gate),
                                          defined_or_empty(bias_up), act, weight_t);
  at::Tensor out = kernels.empty({args.M, args.N}, {args.N, 1}, x);
  at::Tensor gate = kernels.empty({args.M, args.N}, {args.N, 1}, x), up = kernels.empty({args.M, args.N}, {args.N, 1}, x);
  if (out.numel() > 0) kernels.forward(args, out, &gate, &up);
  if (x.dim() == 2) return {out, gate, up};
  const std::vector<int64_t> shape = linear_output_shape(x, args.weight_gate);
  return {out.view(shape), gate.view(shape), up.view(shape)};
}

GluGradTuple linear_glu_backward(const LinearGluKernels& kernels, const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& weight_gate, const at::Tensor& weight_up, const at::Tensor& gate,
                                 const at::Tensor& up, c10::string_view act, std::array<bool, 5> mask) {
  const GluBackward args = prepare_backward(grad, x, weight_gate, weight_up, gate, up, act);
  const int64_t M = args.M, K = args.K, N = args.N;
  GluGrads grads;
  if (mask[0]) grads.dx = kernels.empty({M, K}, {K, 1}, x);
  if (mask[1]) grads.dw_gate = kernels.empty({K, N}, weight_grad_strides(weight_gate), x);
  if (mask[2]) grads.dw_up = kernels.empty({K, N}, weight_grad_strides(weight_up), x);
  if (mask[3]) grads.db_gate = kernels.empty({N}, {1}, x);
  if (mask[4]) grads.db_up = kernels.empty({N}, {1}, x);
  if (mask[0] || mask[1] || mask[2] || mask[3] || mask[4]) kernels.backward(args, grads);
  if (grads.dx.defined() && x.dim() != 2) grads.dx = grads.dx.view(x.sizes());
  return {grads.dx, grads.dw_gate, grads.dw_up, grads.db_gate, grads.db_up};
}

}  // namespace customlayers
