// Public C++ API of customlayers: call the ops through the PyTorch dispatcher, so the CPU or CUDA
// kernel is chosen from the inputs' device exactly as from Python (torch.ops.customlayers.*).
// Link against the customlayers library, which registers the ops when it is loaded.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

namespace customlayers {

// x - x.mean(dim, keepdim=True); no dim (or an empty list) centers on the global mean.
at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim = std::nullopt);

}  // namespace customlayers
