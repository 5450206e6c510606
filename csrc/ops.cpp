// The customlayers operator library: every op schema, in the one TORCH_LIBRARY block.
// Kernels register themselves per device in csrc/cpu/*_kernel.cpp and csrc/cuda/*_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY(customlayers, m) {
  // y = x - x.mean(dim, keepdim=True); dim=None (or []) centers on the global mean.
  m.def("centered(Tensor x, int[]? dim=None) -> Tensor");
}
