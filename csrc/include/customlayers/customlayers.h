// Public C++ API of customlayers: call the ops through the PyTorch dispatcher, so the CPU or CUDA
// kernel is chosen from the inputs' device exactly as from Python (torch.ops.customlayers.*), and
// autograd records them (every op is differentiable, to any order).
// Link against the customlayers library (CMake target customlayers::customlayers), which registers
// the ops when it is loaded.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <cstdint>
#include <optional>

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
CUSTOMLAYERS_API at::Tensor& masked_uniform_(at::Tensor& self, double low = -10, double high = 10, double threshold = 5,
                            std::optional<int64_t> seed = std::nullopt, int64_t offset = 0);

}  // namespace customlayers
