// CPU kernels of customlayers::linear_act (y = act(x @ W + b)) and linear_act_backward: which path a
// layer takes, and what both paths share.
//  * Small weights and narrow outputs (linear_act_small.h): hand-written register-blocked GEMM kernels
//    for all three GEMMs, fused with the bias, the activation and the masked gradient.
//  * Larger weights (linear_act_blas.h): BLAS GEMMs fused by rows with hand-written epilogues.
// The bias gradient is kept as column sums per fixed 64-row chunk (by either path's mask pass) and the
// chunks are added in order, in double (sum_chunks): it does not depend on the thread count or the block size.
// Neither does anything else, on either path (fixed blocks and tiles, each computed on one thread).
#include "common/cpu_alloc.h"
#include "common/linear_act.h"
#include "cpu/linear_act_blas.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_small.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <memory>
#include <tuple>
#include <vector>

namespace customlayers::cpu {
namespace {

at::Tensor empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& like) {
  return cpu::empty_strided(sizes, strides, like.scalar_type());
}

template <typename T>
void forward_impl(const LinearForward& args, at::Tensor& out) {
  using A = acc_t<T>;
  const bool narrow = narrow_weight(args.K, args.N);
  const bool small = !narrow && small_weight(args.K, args.N);
  if (!narrow && !small) return blas_forward<T>(args, out);
  // The bias in the accumulation type, once (loads of float16/bfloat16 need widening otherwise); zero
  // padded to whole vectors for the small-weight kernel.
  std::vector<A> bias;
  if (args.bias.defined()) {
    const T* b = args.bias.const_data_ptr<T>();
    bias.assign(small ? small_padded_cols<T>(args.N) : args.N, A(0));
    std::copy(b, b + args.N, bias.begin());
  }
  const A* bias_ptr = args.bias.defined() ? bias.data() : nullptr;
  if (narrow) narrow_forward<T>(args, bias_ptr, out);
  else small_forward<T>(args, bias_ptr, out);
}

void forward(const LinearForward& args, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_act_cpu",
                                  [&] { forward_impl<scalar_t>(args, out); });
}

template <typename T>
void backward_impl(const LinearBackward& args, LinearGrads& grads) {
  const int64_t M = args.M, N = args.N;
  const bool db = grads.db.defined();
  const int64_t chunks = (M + kChunkRows - 1) / kChunkRows;
  // Every chunk's row of bias-gradient partial sums is written by the mask pass.
  const auto partial = std::make_unique_for_overwrite<double[]>(db ? chunks * N : 0);
  double* partial_ptr = db ? partial.get() : nullptr;
  if ((narrow_weight(args.K, N) || small_weight(args.K, N)) && (grads.dx.defined() || grads.dw.defined()))
    small_backward<T>(args, grads, partial_ptr);
  else
    blas_backward<T>(args, grads, partial_ptr);
  if (db) sum_chunks(partial_ptr, chunks, N, grads.db);
}

void backward(const LinearBackward& args, LinearGrads& grads) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x2.scalar_type(), "linear_act_backward_cpu",
                                  [&] { backward_impl<scalar_t>(args, grads); });
}

constexpr LinearActKernels kKernels{&empty, &forward, &backward};

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CPU, m) {
  m.impl("linear_act", &linear_act_op<kKernels>);
  m.impl("linear_act_backward", &linear_act_backward_op<kKernels>);
}

}  // namespace customlayers::cpu
