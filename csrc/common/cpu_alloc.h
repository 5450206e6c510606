// Output allocation for the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace customlayers::cpu {

// torch.empty_like(x) (same sizes, dtype and strides), except that buffers of 32 MiB and more are
// 2 MiB aligned and advised to use transparent huge pages. malloc returns such buffers to the OS on
// free, so each new one is otherwise paid for in 4 KiB page faults (each zero-filled by the kernel),
// which cost more than the op's arithmetic.
at::Tensor empty_like(const at::Tensor& x);

// A contiguous CPU tensor of `sizes` and `dtype`, with the same allocator as empty_like.
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);

// The same with the given (non-overlapping and dense) strides.
at::Tensor empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype);

}  // namespace customlayers::cpu
