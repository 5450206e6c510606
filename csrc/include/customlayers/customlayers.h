// Public C++ API of customlayers: call the ops through the PyTorch dispatcher, so the CPU or CUDA
// kernel is chosen from the inputs' device exactly as from Python (torch.ops.customlayers.*), and
// autograd records them: centered, linear_act and linear_glu are differentiable to any order; masked_uniform_, an
// initializer, is not.
// Link against the customlayers library (CMake target customlayers::customlayers), which registers
// the ops when it is loaded.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// The library is built with hidden visibility: only what is marked CUSTOMLAYERS_API is exported.
#if defined(_WIN32)
#if defined(CUSTOMLAYERS_BUILDING_LIBRARY)
#define CUSTOMLAYERS_API __declspec(dllexport)
#else
#define CUSTOMLAYERS_API __declspec(dllimport)
#endif
#else
#define CUSTOMLAYERS_API __attribute__((visibility("default")))
#endif

namespace customlayers {

// x - x.mean(dim, keepdim=True); no dim (or an empty list) centers on the global mean.
CUSTOMLAYERS_API at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim = std::nullopt);

// Fills `self` in place with uniform values in [low, high), zeroing those with |value| < threshold (the
// book's initializer), and returns it. The values depend only on (seed, offset, shape), bit for bit the
// same on CPU and CUDA; without a seed they come from the device's default generator. Not
// differentiable: call it under torch::NoGradGuard when `self` requires grad.
CUSTOMLAYERS_API at::Tensor& masked_uniform_(at::Tensor& self, double low = -10, double high = 10,
                                              double threshold = 5, std::optional<int64_t> seed = std::nullopt, int64_t offset = 0);

// act(x @ weight + bias) with weight (in_features, out_features) of any strides; act one of "none", "relu",
// "gelu" (erf), "gelu_tanh" (tanh approximation), "silu", "tanh", "sigmoid".
// weight_t: weight is (out_features, in_features), torch::nn::Linear's layout: act(x @ weight^T + bias).
CUSTOMLAYERS_API at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, c10::string_view act = "relu",
                                        bool weight_t = false);

// (dx, dweight, dbias) of linear_act for the selected inputs (undefined tensors for the others);
// `out` is what act's derivative reads: linear_act's output for "relu", "tanh" and "sigmoid", the
// pre-activation x @ weight + bias for "gelu", "gelu_tanh" and "silu" (unused for "none").
CUSTOMLAYERS_API std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act,
                                                                   std::array<bool, 3> output_mask);

// A gated linear unit, the gated MLP's first half: act(x @ weight_gate + bias_gate) * (x @ weight_up + bias_up)
// (SwiGLU: act "silu"; GeGLU: "gelu" or "gelu_tanh"; every linear_act activation), weights (in_features,
// hidden_features) of any strides, or with weight_t (hidden_features, in_features), torch::nn::Linear's.
CUSTOMLAYERS_API at::Tensor linear_glu(const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
                                        const std::optional<at::Tensor>& bias_gate = std::nullopt,
                                        const std::optional<at::Tensor>& bias_up = std::nullopt,
                                        c10::string_view act = "silu", bool weight_t = false);

// linear_glu with the pre-activations its backward reads: (out, gate, up), gate = x @ weight_gate + bias_gate,
// up = x @ weight_up + bias_up (what linear_glu's autograd runs when a gradient may be asked for).
CUSTOMLAYERS_API std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_glu_forward(
    const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
    const std::optional<at::Tensor>& bias_gate = std::nullopt, const std::optional<at::Tensor>& bias_up = std::nullopt,
    c10::string_view act = "silu", bool weight_t = false);

// (dx, dweight_gate, dweight_up, dbias_gate, dbias_up) of linear_glu for the selected inputs (undefined
// tensors for the others), the weights (in_features, hidden_features), gate and up the pre-activations.
CUSTOMLAYERS_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_glu_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
    const at::Tensor& gate, const at::Tensor& up, c10::string_view act, std::array<bool, 5> output_mask);

// The CPU kernels' tier: which build of them runs ("default", "avx2" or "avx512"; empty when none could be
// loaded, and the pure-PyTorch references registered by the Python package, if any, serve the CPU), why, and
// which tiers were built beside the library. The library loads one tier when it is loaded: the highest
// built one that this CPU runs (CPUID) and torch's CPU capability allows (ATEN_CPU_CAPABILITY=default|avx2
// lowers it, as for PyTorch's own kernels).
struct CpuTierInfo {
  std::string tier;
  std::string reason;
  std::vector<std::string> built;
};
CUSTOMLAYERS_API CpuTierInfo cpu_tier();

}  // namespace customlayers
