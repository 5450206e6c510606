// CUDA kernels of customlayers::linear_glu (y = act(x @ Wg + bg) * (x @ Wu + bu)), linear_glu_forward and
// linear_glu_backward. No cuBLAS:
//
//  * The forward is one launch of the gated GEMM of cuda/linear_act_gemm.cuh: each block multiplies x by
//    the gate's and the up weight's columns of the same outputs, and its epilogue adds the biases and
//    writes act(gate) * up (and, for linear_glu_forward, both pre-activations, which the backward reads).
//  * Backward: cuda/linear_glu_backward.cuh's one pass makes [dgate | dup] (M, 2N) and the bias gradients
//    (fixed-order chunk sums); dX = [dgate | dup] [Wg^T; Wu^T] is one GEMM (its two products summed
//    before rounding), dWg = X^T dgate and dWu = X^T dup are GEMMs on strided views, each written in its
//    weight's layout.
// float16/bfloat16: tensor cores, float32 accumulation; every output, saved pre-activation and gated
// gradient rounded once.
#include "common/cuda_utils.cuh"
#include "common/linear_glu.h"
#include "cuda/gemm_operands.h"
#include "cuda/linear_glu_backward.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace customlayers::cuda {
namespace {

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(at::Tensor* t) {
  return t != nullptr ? t->mutable_data_ptr<T>() : nullptr;
}

void forward(const GluForward& a, at::Tensor& out, at::Tensor* gate, at::Tensor* up) {
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor wg = a.weight_gate, wu = a.weight_up;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_glu_cuda", [&] {
    using T = scalar_t;
    // The gated GEMM walks both weights the same way: weights of two layouts are read as contiguous copies.
    if (operand_layout(right<T>(wg), a.K, a.N).contig_x != operand_layout(right<T>(wu), a.K, a.N).contig_x) {
      wg = wg.contiguous();
      wu = wu.contiguous();
    }
    const GemmArgs<T> args{.a = left<T>(a.x2),
                           .b = right<T>(wg),
                           .c = out.mutable_data_ptr<T>(),
                           .scm = a.N,
                           .scn = 1,
                           .bias = data_or_null<T>(a.bias_gate),
                           .M = a.M,
                           .N = a.N,
                           .K = a.K,
                           .act = a.act,
                           .op = "linear_glu",
                           .b_up = right<T>(wu),
                           .bias_up = data_or_null<T>(a.bias_up),
                           .gate_out = mutable_data_or_null<T>(gate),
                           .up_out = mutable_data_or_null<T>(up)};
    gemm<true>(args, at::cuda::getCurrentCUDAStream(), Workspace(out));
  });
}

void backward(const GluBackward& a, GluGrads& grads) {
  const c10::cuda::CUDAGuard guard(a.x2.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = a.M, K = a.K, N = a.N;
  const bool gemms = grads.dx.defined() || grads.dw_gate.defined() || grads.dw_up.defined();
  const bool bias = grads.db_gate.defined() || grads.db_up.defined();
  const at::Tensor d = gemms ? at::empty({M, 2 * N}, a.g2.options()) : at::Tensor();  // [dgate | dup]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x2.scalar_type(), "linear_glu_backward_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const at::Tensor partial =
        bias ? at::empty({2, act_grad_chunks(M), N}, a.g2.options().dtype(c10::CppTypeToScalarType<A>::value))
             : at::Tensor();
    glu_grad(GluGradArgs<T>{.g = a.g2.const_data_ptr<T>(),
                            .gate = a.gate.const_data_ptr<T>(),
                            .up = a.up.const_data_ptr<T>(),
                            .ldg = a.g2.stride(0),
                            .ld_gate = a.gate.stride(0),
                            .ld_up = a.up.stride(0),
                            .d = gemms ? d.mutable_data_ptr<T>() : nullptr,
                            .partial = bias ? partial.mutable_data_ptr<A>() : nullptr,
                            .M = M,
                            .N = N,
                            .act = a.act},
             grads.db_gate.defined() ? grads.db_gate.mutable_data_ptr<T>() : nullptr,
             grads.db_up.defined() ? grads.db_up.mutable_data_ptr<T>() : nullptr, stream);
    if (grads.dx.defined()) {  // dX = [dgate | dup] @ [Wg^T; Wu^T]: [M, 2N] x [2N, K]
      const at::Tensor w = at::cat({a.weight_gate.t(), a.weight_up.t()}, 0);
      const GemmArgs<T> args{.a = left<T>(d),
                             .b = right<T>(w),
                             .c = grads.dx.mutable_data_ptr<T>(),
                             .scm = K,
                             .scn = 1,
                             .bias = nullptr,
                             .M = M,
                             .N = K,
                             .K = 2 * N,
                             .op = "linear_glu_backward"};
      gemm(args, stream, Workspace(d));
    }
    const auto weight_grad = [&](at::Tensor& dw, int64_t column) {  // dW = X^T @ d[:, column:column + N]
      if (!dw.defined()) return;
      const GemmArgs<T> args{.a = right<T>(a.x2),
                             .b = right<T>(d.narrow(1, column, N)),
                             .c = dw.mutable_data_ptr<T>(),
                             .scm = dw.stride(0),
                             .scn = dw.stride(1),
                             .bias = nullptr,
                             .M = K,
                             .N = N,
                             .K = M,
                             .op = "linear_glu_backward"};
      gemm(args, stream, Workspace(d));
    };
    weight_grad(grads.dw_gate, 0);
    weight_grad(grads.dw_up, N);
  });
}

constexpr LinearGluKernels kKernels{&empty, &forward, &backward};

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) {
  m.impl("linear_glu", &linear_glu_op<kKernels>);
  m.impl("linear_glu_forward", &linear_glu_forward_op<kKernels>);
  m.impl("linear_glu_backward", &linear_glu_backward_op<kKernels>);
}

}  // namespace customlayers::cuda
