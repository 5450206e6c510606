// What the CUDA ops' plumbing (linear_act_kernel.cu, linear_glu_kernel.cu) shares to run the GEMM of
// cuda/linear_act_gemm.cuh on tensors: matrices as its operands, outputs, and the split-K workspace.
#pragma once

#include "cuda/linear_act_gemm.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>

namespace customlayers::cuda {

// Device memory for one GEMM's split-K partial sums. Freed when this goes out of scope, after the GEMM's
// kernels are queued: the caching allocator reuses it only in the order of the stream.
class Workspace {
 public:
  explicit Workspace(const at::Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  void* operator()(size_t bytes) {
    buffer_ = at::empty({static_cast<int64_t>(bytes)}, options_);
    return buffer_.mutable_data_ptr();
  }

 private:
  at::TensorOptions options_;
  at::Tensor buffer_;
};

// The K x M view of a row-major-indexed (M x K) tensor x2 (x2[m][k]).
template <typename T>
Operand<T> left(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(1), t.stride(0)};
}

// The K x N view of a (K x N) tensor.
template <typename T>
Operand<T> right(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// The K x N view of the transpose of a (N x K) tensor.
template <typename T>
Operand<T> transposed(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(1), t.stride(0)};
}

// The ops' kernels' `empty`: uninitialized device memory of `sizes` and `strides` with like's dtype.
inline at::Tensor empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& like) {
  return at::empty_strided(sizes, strides, like.options());
}

}  // namespace customlayers::cuda
