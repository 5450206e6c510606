// Public C++ API of customlayers: call the ops through the PyTorch dispatcher, so the CPU or CUDA
// kernel is chosen from the inputs' device exactly as from Python (torch.ops.customlayers.*), and
// autograd records them (every op is differentiable, to any order).
// Link against the customlayers library (CMake target customlayers::customlayers), which registers
// the ops when it is loaded.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

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

}  // namespace customlayers
