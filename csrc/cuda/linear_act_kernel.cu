// CUDA kernels of customlayers::linear_act (y = act(x @ W + b)) and linear_act_backward. No cuBLAS:
//
//  * The forward is one launch of the hand-written tiled GEMM of cuda/linear_act_gemm.cuh, with bias + activation
//    fused into its epilogue (CUDA cores for float32/float64, tensor cores for float16/bfloat16).
//  * Backward: the masked gradient g' = g * act'(.) and the bias gradient by the kernels of
//    cuda/linear_act_backward.cuh (fixed-order chunk sums, bit-reproducible); dX = g' W^T and dW = X^T g' are the
//    same GEMM on strided views, dW written in the weight's own layout.
#include "common/cuda_utils.cuh"
#include "common/linear_act.h"
#include "cuda/gemm_operands.h"
#include "cuda/linear_act_backward.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace customlayers::cuda {
namespace {

void forward(const LinearForward& a, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_act_cuda", [&] {
    const GemmArgs<scalar_t> args{.a = left<scalar_t>(a.x2),
                                  .b = right<scalar_t>(a.weight),
                                  .c = out.mutable_data_ptr<scalar_t>(),
                                  .scm = a.N,
                                  .scn = 1,
                                  .bias = a.bias.defined() ? a.bias.const_data_ptr<scalar_t>() : nullptr,
                                  .M = a.M,
                                  .N = a.N,
                                  .K = a.K,
                                  .act = a.act};
    gemm(args, at::cuda::getCurrentCUDAStream(), Workspace(out));
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// gp (when defined) = g2 * act'(saved) and db (when defined) = column sums of it.
template <typename T>
void mask_and_sum(const LinearBackward& a, at::Tensor& gp, at::Tensor& db, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t M = a.M, N = a.N;
  const bool masked = a.saved.defined();
  at::Tensor partial;
  if (db.defined()) partial = at::empty({act_grad_chunks(M), N}, a.g2.options().dtype(c10::CppTypeToScalarType<A>::value));
  act_grad(ActGradArgs<T>{.g = a.g2.const_data_ptr<T>(),
                          .ldg = a.g2.stride(0),
                          .saved = masked ? a.saved.const_data_ptr<T>() : nullptr,
                          .lds = masked ? a.saved.stride(0) : 0,
                          .gp = gp.defined() ? gp.mutable_data_ptr<T>() : nullptr,
                          .partial = db.defined() ? partial.mutable_data_ptr<A>() : nullptr,
                          .db = db.defined() ? db.mutable_data_ptr<T>() : nullptr,
                          .M = M,
                          .N = N,
                          .act = a.act},
           stream);
}

void backward(const LinearBackward& a, LinearGrads& grads) {
  const c10::cuda::CUDAGuard guard(a.x2.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = a.M, K = a.K, N = a.N;
  // g' = g * act'(.): its own buffer with an activation when a GEMM needs it, g itself for 'none'.
  const bool gemms = grads.dx.defined() || grads.dw.defined();
  at::Tensor gp = a.saved.defined() && gemms ? at::empty({M, N}, a.g2.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x2.scalar_type(), "linear_act_backward_cuda", [&] {
    using T = scalar_t;
    mask_and_sum<T>(a, gp, grads.db, stream);
    if (!gemms) return;
    if (!gp.defined()) gp = a.g2;
    if (grads.dx.defined()) {  // dX = g' @ W^T: [M, N] x [N, K]
      const GemmArgs<T> args{.a = left<T>(gp),
                             .b = transposed<T>(a.weight),
                             .c = grads.dx.mutable_data_ptr<T>(),
                             .scm = K,
                             .scn = 1,
                             .bias = nullptr,
                             .M = M,
                             .N = K,
                             .K = N};
      gemm(args, stream, Workspace(gp));
    }
    if (grads.dw.defined()) {  // dW = X^T @ g': [K, M] x [M, N]
      at::Tensor& dw = grads.dw;
      const GemmArgs<T> args{.a = right<T>(a.x2),
                             .b = right<T>(gp),
                             .c = dw.mutable_data_ptr<T>(),
                             .scm = dw.stride(0),
                             .scn = dw.stride(1),
                             .bias = nullptr,
                             .M = K,
                             .N = N,
                             .K = M};
      gemm(args, stream, Workspace(gp));
    }
  });
}

constexpr LinearActKernels kKernels{&empty, &forward, &backward};

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) {
  m.impl("linear_act", &linear_act_op<kKernels>);
  m.impl("linear_act_backward", &linear_act_backward_op<kKernels>);
}

}  // namespace customlayers::cuda
