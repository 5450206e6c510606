// Public C++ API of customlayers: call the ops through the PyTorch dispatcher, so the CPU or CUDA
// kernel is chosen from the inputs' device exactly as from Python (torch.ops.customlayers.*).
// Link against the customlayers library, which registers the ops when it is loaded.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace customlayers {

// x - x.mean(dim, keepdim=True); no dim (or an empty list) centers on the global mean.
at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim = std::nullopt);

// act(x @ weight + bias) with weight (in_features, out_features) of any strides; act "relu" or "none".
at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view act = "relu");

// (dx, dweight, dbias) of linear_act for the selected inputs (undefined tensors for the others);
// `out` is linear_act's output (needed for act "relu").
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act,
                                                                   std::array<bool, 3> output_mask);

}  // namespace customlayers
