// What the fused linear ops (linear_act, linear_act_backward) do the same way on every device: the
// activation, argument checks, the matrix views the kernels take, output allocation and output shapes.
// A device supplies its kernels as LinearActKernels; the ops' entry points below prepare the arguments,
// call them, and shape the results.
#pragma once

#include "common/activation.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace customlayers {

// The activation named `act` (one of customlayers/_activations.py's names), or a ValueError naming op, the
// argument, the names and the value; activation_name is its inverse.
Activation activation_of(c10::string_view act, const char* op);
// The activation named `act`, or nothing (no error).
std::optional<Activation> find_activation(c10::string_view act);
const char* activation_name(Activation act);

// The number of rows of x seen as a (rows, in_features) matrix: the product of its leading dims.
int64_t linear_rows(const at::Tensor& x);

// x (*, in), weight (in, out) (with weight_t (out, in)) of any strides, bias (out,) or undefined: floating
// point, one dtype, one device, matching sizes. Errors name op, the arguments (weight_name, bias_name) and
// the shapes, dtypes or devices involved.
void check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         bool weight_t = false, const char* weight_name = "weight", const char* bias_name = "bias");

// (*, out): x's shape with its last dim replaced by weight's out_features (weight (in, out)).
std::vector<int64_t> linear_output_shape(const at::Tensor& x, const at::Tensor& weight);

// t seen as a (rows, cols) matrix: t itself when it is 2-D (no dispatcher call), else t.reshape.
at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols);

// A 2-D tensor with unit column stride (any row stride), or a contiguous copy of it: the layout the
// row-wise backward kernels read.
at::Tensor unit_column_stride(const at::Tensor& t);

// The strides of the gradient of a (K, N) weight: the weight's own layout, so that nn.Linear.weight.t()
// gets a gradient whose .t() is contiguous.
std::array<int64_t, 2> weight_grad_strides(const at::Tensor& weight);

// *t, or an undefined tensor.
const at::Tensor& defined_or_empty(const std::optional<at::Tensor>& t);

// linear_act's arguments, checked, as a kernel takes them: out (M, N) = act(x2 (M, K) @ weight (K, N) + bias).
struct LinearForward {
  at::Tensor x2;      // x as a (M, K) matrix: a view where x's layout allows, any strides
  at::Tensor weight;  // (K, N), any strides (nn.Linear.weight.t() is (1, K))
  at::Tensor bias;    // (N,) contiguous, or undefined for none
  Activation act;
  int64_t M, K, N;
};

// linear_act_backward's arguments, checked: grad and the saved tensor as (M, N) matrices with unit column
// stride (any row stride); `saved` is what act_saved(act) names (the forward's output or the
// pre-activation), undefined for act='none'.
struct LinearBackward {
  at::Tensor g2;
  at::Tensor x2;
  at::Tensor weight;
  at::Tensor saved;
  Activation act;
  int64_t M, K, N;
};

// The requested gradients (the others undefined), uninitialized when a kernel receives them: dx (M, K)
// contiguous, dw (K, N) in the weight's layout (nn.Linear.weight.t() gets a gradient whose .t() is
// contiguous, so accumulating it into .grad needs no copy), db (N,).
struct LinearGrads {
  at::Tensor dx, dw, db;
};

struct LinearActKernels {
  // Uninitialized memory of `sizes` and (dense) `strides` with like's dtype, on like's device.
  at::Tensor (*empty)(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& like);
  // Fills `out` ((M, N) contiguous, M * N > 0).
  void (*forward)(const LinearForward& args, at::Tensor& out);
  // Fills the defined gradients of `grads` (at least one is).
  void (*backward)(const LinearBackward& args, LinearGrads& grads);
};

// customlayers::linear_act on a device's kernels: checks, then `out` in x's leading shape (*, N). weight is
// (in_features, out_features), or with weight_t (out_features, in_features), nn.Linear's layout.
at::Tensor linear_act(const LinearActKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, c10::string_view act, bool weight_t);

// customlayers::linear_act_backward on a device's kernels: checks, then (dx in x's shape, dw, db).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const LinearActKernels& kernels,
                                                                   const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act, std::array<bool, 3> mask);

// The two ops on kernels K, as functions of the ops' schemas: m.impl("linear_act", &linear_act_op<K>).
template <const LinearActKernels& K>
at::Tensor linear_act_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         c10::string_view act, bool weight_t) {
  return linear_act(K, x, weight, bias, act, weight_t);
}

template <const LinearActKernels& K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& out,
                                                                      c10::string_view act, std::array<bool, 3> mask) {
  return linear_act_backward(K, grad, x, weight, out, act, mask);
}

}  // namespace customlayers
