// CUDA kernels of customlayers::linear_act (y = act(x @ W + b)) and linear_act_backward. No cuBLAS:
//
//  * The forward is one launch of the hand-written tiled GEMM of cuda/linear_act_gemm.cuh, with bias + activation
//    fused into its epilogue (CUDA cores for float32/float64, tensor cores for float16/bfloat16).
//  * Backward: the masked gradient g' = g * (out > 0) and the bias gradient by the kernels of
//    cuda/linear_act_backward.cuh (fixed-order chunk sums, bit-reproducible); dX = g' W^T and dW = X^T g' are the
//    same GEMM on strided views, dW written in the weight's own layout.
#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/linear_act.h"
#include "cuda/linear_act_gemm.cuh"
#include "cuda/linear_act_backward.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace customlayers::cuda {
namespace {

constexpr const char* kOp = "linear_act";

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

at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view act_name) {
  check_linear_inputs(kOp, x, weight, bias);
  const Activation act = parse_activation(act_name, kOp);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = linear_rows(x), K = weight.size(0), N = weight.size(1);
  const at::Tensor x2 = as_matrix(x, M, K);
  at::Tensor out = at::empty({M, N}, x.options());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_cuda", [&] {
    GemmArgs<scalar_t> args{left<scalar_t>(x2), right<scalar_t>(weight), out.mutable_data_ptr<scalar_t>(), N, 1,
                            b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, M, N, K,
                            act == Activation::kRelu};
    gemm(args, at::cuda::getCurrentCUDAStream(), Workspace(x));
  });
  return as_leading_shape(out, x, weight);
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// gp (when defined) = g2 masked by o2 > 0 (relu) and db (when defined) = column sums of the masked g2.
template <typename T>
void mask_and_sum(const at::Tensor& g2, const at::Tensor& o2, at::Tensor& gp, at::Tensor& db, bool relu,
                  cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t M = g2.size(0), N = g2.size(1);
  at::Tensor partial;
  if (db.defined()) partial = at::empty({relu_grad_chunks(M), N}, g2.options().dtype(c10::CppTypeToScalarType<A>::value));
  relu_grad(ReluGradArgs<T>{g2.const_data_ptr<T>(), g2.stride(0), relu ? o2.const_data_ptr<T>() : nullptr,
                            relu ? o2.stride(0) : 0, gp.defined() ? gp.mutable_data_ptr<T>() : nullptr,
                            db.defined() ? partial.mutable_data_ptr<A>() : nullptr,
                            db.defined() ? db.mutable_data_ptr<T>() : nullptr, M, N, relu},
            stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act_name,
                                                                   std::array<bool, 3> mask) {
  const Activation act = check_linear_backward_inputs(grad, x, weight, out, act_name);
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool relu = act == Activation::kRelu;
  const int64_t M = linear_rows(x), K = weight.size(0), N = weight.size(1);
  const at::Tensor x2 = as_matrix(x, M, K);
  const at::Tensor g2 = unit_column_stride(as_matrix(grad, M, N));
  const at::Tensor o2 = relu ? unit_column_stride(as_matrix(o, M, N)) : at::Tensor();
  const auto opts = x.options();
  at::Tensor dx = mask[0] ? at::empty({M, K}, opts) : at::Tensor();
  at::Tensor dw = mask[1] ? at::empty_strided({K, N}, weight_grad_strides(weight), opts) : at::Tensor();
  at::Tensor db = mask[2] ? at::empty({N}, opts) : at::Tensor();
  if (!mask[0] && !mask[1] && !mask[2]) return {dx, dw, db};

  // g' = g * (out > 0): its own buffer for relu when a GEMM needs it, g itself otherwise.
  const bool gemms = mask[0] || mask[1];
  at::Tensor gp = relu && gemms ? at::empty({M, N}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_backward_cuda", [&] {
    using T = scalar_t;
    mask_and_sum<T>(g2, o2, gp, db, relu, stream);
    if (!gemms) return;
    if (!gp.defined()) gp = g2;
    if (mask[0]) {  // dX = g' @ W^T: [M, N] x [N, K]
      GemmArgs<T> args{left<T>(gp), {weight.const_data_ptr<T>(), weight.stride(1), weight.stride(0)},
                       dx.mutable_data_ptr<T>(), K, 1, nullptr, M, K, N, false};
      gemm(args, stream, Workspace(x));
    }
    if (mask[1]) {  // dW = X^T @ g': [K, M] x [M, N]
      GemmArgs<T> args{{x2.const_data_ptr<T>(), x2.stride(0), x2.stride(1)}, right<T>(gp), dw.mutable_data_ptr<T>(),
                       dw.stride(0), dw.stride(1), nullptr, K, N, M, false};
      gemm(args, stream, Workspace(x));
    }
  });
  if (dx.defined() && x.dim() != 2) dx = dx.view(x.sizes());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace customlayers::cuda
