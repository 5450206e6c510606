// Argument handling shared by the CPU and CUDA kernels of the fused linear ops (linear_act,
// linear_act_backward): the activation, input validation and the output shape.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <vector>

namespace customlayers {

enum class Activation { kNone, kRelu };

// "relu" or "none"; anything else is a ValueError naming the op and the value.
Activation parse_activation(c10::string_view act, const char* op);

// x (*, in), weight (in, out) of any strides, bias (out,) or none: floating point, one dtype, one
// device, matching sizes. Errors name the shapes, dtypes or devices involved.
void check_linear_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias);

// (*, out): x's shape with its last dim replaced by weight's out_features.
std::vector<int64_t> linear_output_shape(const at::Tensor& x, const at::Tensor& weight);

// The number of rows of x seen as a (rows, in_features) matrix: the product of its leading dims.
int64_t linear_rows(const at::Tensor& x);

// t seen as a (rows, cols) matrix: t itself when it is 2-D (no dispatcher call), else t.reshape.
at::Tensor as_matrix(const at::Tensor& t, int64_t rows, int64_t cols);

// out (rows, out_features) seen in linear_output_shape(x, weight): out itself when x is 2-D, else a view.
at::Tensor as_leading_shape(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight);

// The strides of dW (in_features, out_features) in the weight's layout: nn.Linear.weight.t() (strides
// (1, in)) gets a gradient whose .t() is contiguous, so accumulating it into .grad needs no copy; any
// other weight gets a contiguous one.
std::array<int64_t, 2> weight_grad_strides(const at::Tensor& weight);

// A 2-D tensor with unit column stride (any row stride), or a contiguous copy of it: the layout the
// row-wise backward kernels read.
at::Tensor unit_column_stride(const at::Tensor& t);

// Validates all of linear_act_backward's arguments: x and weight as check_linear_inputs does, the
// activation, and grad and out (the forward's output, needed for act='relu') against them.
// Returns the parsed activation.
Activation check_linear_backward_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& out, c10::string_view act);

}  // namespace customlayers
