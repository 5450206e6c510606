// The customlayers operator library: every op schema, in the one TORCH_LIBRARY block.
// Kernels register themselves per device in csrc/cpu/*_kernel.cpp and csrc/cuda/*_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY(customlayers, m) {
  // y = x - x.mean(dim, keepdim=True); dim=None (or []) centers on the global mean.
  m.def("centered(Tensor x, int[]? dim=None) -> Tensor");
  // In place: uniform values in [low, high), those with |w| < threshold set to zero. Each value depends
  // only on (seed, offset, shape): an unseeded call draws them from the device's default generator.
  // Not differentiable (an initializer). Returns nothing, so that torch.compile can functionalize it.
  m.def("masked_uniform_(Tensor(a!) self, float low=-10, float high=10, float threshold=5, int? seed=None, "
        "int offset=0) -> ()");
  // y = act(x @ weight + bias): x (*, in), weight (in, out) of any strides (nn.Linear.weight.t() works
  // without a copy), bias (out,) or None, act one of 'none', 'relu', 'gelu' (erf, as F.gelu), 'gelu_tanh'
  // (F.gelu(approximate='tanh')), 'silu', 'tanh', 'sigmoid' (customlayers/_activations.py).
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias=None, str act='relu', bool weight_t=False) -> Tensor");
  // Gradients of linear_act for the inputs selected by output_mask (x, weight, bias); the others are
  // None. `out` is what the activation's derivative reads: the forward's output for relu, tanh and sigmoid,
  // the pre-activation x @ weight + bias for gelu, gelu_tanh and silu; unused (may be None) for act='none'.
  m.def("linear_act_backward(Tensor grad, Tensor x, Tensor weight, Tensor? out, str act, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
}
