// Memory-layout planning shared by the CPU and CUDA kernels of reduce-then-broadcast ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace customlayers {

// The strides torch.empty_like(x) gives (memory_format=preserve): x's own strides when x is
// non-overlapping and dense, otherwise dense strides in the same dimension order. Outputs use these
// so that the real kernels and the fake (meta) implementations agree on layout.
std::vector<int64_t> empty_like_strides(const at::Tensor& x);

// An op y = f(x, reduction of x over some dims) seen as a dense [outer, reduce, inner] block in memory:
// element (o, r, i) lives at offset (o * reduce + r) * inner + i of both `input` and `output`.
// Contiguous, channels-last and any other dense layout is used in place, with no copy, whenever the
// reduced dims form one run in memory order; otherwise the input is permuted into a copy and `finish()`
// copies the output back into `result`.
struct ReduceLayout {
  at::Tensor input;
  at::Tensor output;
  at::Tensor result;
  int64_t outer = 1;
  int64_t reduce = 1;
  int64_t inner = 1;
  bool permuted = false;
  std::vector<int64_t> perm;

  void finish();
};

// `result` must be allocated with empty_like_strides(x) on x's device.
ReduceLayout plan_reduce(const at::Tensor& x, const std::vector<bool>& reduced, const at::Tensor& result);

}  // namespace customlayers
