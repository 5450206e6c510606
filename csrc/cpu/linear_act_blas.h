// The CPU linear_act kernels for weights too large for the small-weight kernels: the GEMMs are BLAS's
// (at::cpu::mm_out/addmm_out: MKL, OpenBLAS or oneDNN, any operand strides, so the weight may be the
// transposed view nn.Linear.weight.t() without a copy), cut into tiles fixed by the shapes and each run on
// one thread, so that results do not depend on the thread count; everything around them hand-written
// (linear_act_blas.cpp).
#pragma once

#include "common/cpu_vec.h"
#include "common/linear_act.h"

namespace customlayers::cpu {

// out = act(x2 @ weight + bias).
template <typename T>
void blas_forward(const LinearForward& args, at::Tensor& out);

// The defined dx and dw of `grads` (db is not touched), and when `partial` is set the bias gradient's
// 64-row chunk column sums (partial[chunk * N ...]).
template <typename T>
void blas_backward(const LinearBackward& args, LinearGrads& grads, double* partial);

}  // namespace customlayers::cpu
