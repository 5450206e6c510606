// The customlayers operator library: every op schema, in the one TORCH_LIBRARY block.
// Kernels register themselves per device in csrc/cpu/*_kernel.cpp and csrc/cuda/*_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY(customlayers, m) {
  // y = x - x.mean(dim, keepdim=True); dim=None (or []) centers on the global mean.
  m.def("centered(Tensor x, int[]? dim=None) -> Tensor");
  // y = act(x @ weight + bias): x (*, in), weight (in, out) of any strides (nn.Linear.weight.t() works
  // without a copy), bias (out,) or None, act 'relu' or 'none'.
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias=None, str act='relu') -> Tensor");
  // Gradients of linear_act for the inputs selected by output_mask (x, weight, bias); the others are
  // None. `out` is the forward's output (the ReLU mask; unused for act='none').
  m.def("linear_act_backward(Tensor grad, Tensor x, Tensor weight, Tensor? out, str act, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}
