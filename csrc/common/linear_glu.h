// What the gated linear unit ops (linear_glu, linear_glu_backward) do the same way on every device:
// argument checks, the matrix views the kernels take, output allocation and output shapes. A device
// supplies its kernels as LinearGluKernels (as linear_act's LinearActKernels, common/linear_act.h).
#pragma once

#include "common/linear_act.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace customlayers {

// linear_glu's arguments, checked, as a kernel takes them:
// out (M, N) = act(x2 (M, K) @ weight_gate (K, N) + bias_gate) * (x2 @ weight_up (K, N) + bias_up).
struct GluForward {
  at::Tensor x2;                     // x as a (M, K) matrix: a view where x's layout allows, any strides
  at::Tensor weight_gate, weight_up; // (K, N), any strides (nn.Linear.weight.t() is (1, K))
  at::Tensor bias_gate, bias_up;     // (N,) contiguous, or undefined for none
  Activation act;
  int64_t M, K, N;
};

// linear_glu_backward's arguments, checked: grad and the pre-activations gate and up as (M, N) matrices
// with unit column stride (any row stride).
struct GluBackward {
  at::Tensor g2, x2;
  at::Tensor weight_gate, weight_up;  // (K, N), any strides
  at::Tensor gate, up;
  Activation act;
  int64_t M, K, N;
};

// The requested gradients (the others undefined), uninitialized when a kernel receives them: dx (M, K)
// contiguous, the weights' (K, N) each in its weight's layout, the biases' (N,).
struct GluGrads {
  at::Tensor dx, dw_gate, dw_up, db_gate, db_up;
};

struct LinearGluKernels {
  // Uninitialized memory of `sizes` and (dense) `strides` with like's dtype, on like's device.
  at::Tensor (*empty)(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& like);
  // Fills `out` ((M, N) contiguous, M * N > 0), and the pre-activations `gate` and `up` ((M, N) contiguous,
  // like out) when they are not null.
  void (*forward)(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up);
  // Fills the defined gradients of `grads` (at least one is).
  void (*backward)(const GluBackward& args, GluGrads& grads);
};

// customlayers::linear_glu on a device's kernels: checks, then `out` in x's leading shape (*, N).
at::Tensor linear_glu(const LinearGluKernels& kernels, const at::Tensor& x, const at::Tensor& weight_gate,
                      const at::Tensor& weight_up, const std::optional<at::Tensor>& bias_gate,
                      const std::optional<at::Tensor>& bias_up, c10::string_view act, bool weight_t);

// customlayers::linear_glu_forward: (out, gate, up), each in x's leading shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_glu_forward(
    const LinearGluKernels& kernels, const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
    const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up, c10::string_view act,
    bool weight_t);

using GluGradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// customlayers::linear_glu_backward on a device's kernels: checks, then (dx in x's shape, dweight_gate,
// dweight_up, dbias_gate, dbias_up).
GluGradTuple linear_glu_backward(const LinearGluKernels& kernels, const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& weight_gate, const at::Tensor& weight_up, const at::Tensor& gate,
                                 const at::Tensor& up, c10::string_view act, std::array<bool, 5> mask);

// The ops on kernels K, as functions of the ops' schemas: m.impl("linear_glu", &linear_glu_op<K>).
template <const LinearGluKernels& K>
at::Tensor linear_glu_op(const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
                         const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up,
                         c10::string_view act, bool weight_t) {
  return linear_glu(K, x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t);
}

template <const LinearGluKernels& K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_glu_forward_op(
    const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
    const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up, c10::string_view act,
    bool weight_t) {
  return linear_glu_forward(K, x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t);
}

template <const LinearGluKernels& K>
GluGradTuple linear_glu_backward_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_gate,
                                    const at::Tensor& weight_up, const at::Tensor& gate, const at::Tensor& up,
                                    c10::string_view act, std::array<bool, 5> mask) {
  return linear_glu_backward(K, grad, x, weight_gate, weight_up, gate, up, act, mask);
}

}  // namespace customlayers
