// The customlayers operator library: every op schema, in the one TORCH_LIBRARY block. The schemas are
// written once, in customlayers/schemas.def (which the Python package reads too).
// Kernels register themselves per device in csrc/cpu/*_kernel.cpp and csrc/cuda/*_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY(customlayers, m) {
#define CUSTOMLAYERS_OP(name, schema) m.def(schema);
#include "../customlayers/schemas.def"
#undef CUSTOMLAYERS_OP
}
