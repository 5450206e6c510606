// The BLAS path of the CPU linear_act kernels (see linear_act_blas.h), vectorized with at::vec:
//  * forward: when the weight is small enough to stay in cache, the rows are cut into blocks of 64-512;
//    each task computes its block's GEMM (single-threaded BLAS) and applies bias + activation to the
//    block at once, while it is still in cache. Large weights (or a single block) get one multithreaded
//    GEMM and then one parallel epilogue pass (re-reading a large weight per block would cost more than
//    the pass).
//  * backward: one pass over grad computes the masked gradient g' and the bias-gradient partial sums
//    together; in the blocked mode each block's dX = g' W^T follows immediately. dW = X^T g' is one
//    multithreaded GEMM over all rows, written in the weight's layout.
// float16/bfloat16 run in float32 where the CPU lacks fast GEMMs for them (linear_act_widen.h).
#include "cpu/linear_act_blas.h"

#include "common/cpu_alloc.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_widen.h"

#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <vector>

namespace customlayers::cpu {
namespace {

constexpr int64_t kMaxBlockRows = 512;           // rows per block in the blocked mode
constexpr int64_t kCachedWeightBytes = 4 << 20;  // weights up to this size use the blocked mode
constexpr int64_t kSmallMacs = 1 << 22;          // GEMMs up to this many multiply-adds are never blocked

// How the rows are split: blocks of `rows` rows (a multiple of kChunkRows), `blocked` when each block
// runs its own GEMM; otherwise one GEMM covers all rows and the blocks only split the elementwise work.
struct RowPlan {
  bool blocked;
  int64_t rows;
  int64_t count;
  int64_t grain;  // blocks per task, for at::parallel_for
};

RowPlan plan_rows(int64_t M, int64_t K, int64_t N, int64_t element_size) {
  RowPlan plan;
  // Small GEMMs are not split: one BLAS call (with BLAS's own choice of threads) costs less than
  // per-block calls and a parallel region around them.
  plan.blocked = K * N * element_size <= kCachedWeightBytes && M * K * N > kSmallMacs;
  const int64_t threads = at::get_num_threads();
  // Enough blocks for every thread, each as tall as possible up to kMaxBlockRows.
  const int64_t per_thread = (M + threads - 1) / threads;
  plan.rows = std::clamp<int64_t>((per_thread + kChunkRows - 1) / kChunkRows * kChunkRows, kChunkRows,
                                  plan.blocked ? kMaxBlockRows : kMaxBlockRows * 4);
  plan.count = (M + plan.rows - 1) / plan.rows;
  // One block is one GEMM: called outside a parallel region, BLAS threads it itself.
  plan.blocked = plan.blocked && plan.count > 1;
  const int64_t block_work = plan.blocked ? 2 * plan.rows * std::max<int64_t>(K, 1) * N : plan.rows * N;
  plan.grain = std::max<int64_t>(1, (plan.blocked ? kTaskFlops : kTaskElems) / std::max<int64_t>(block_work, 1));
  return plan;
}

// MKL's GEMMs with a row-major right operand of fewer than 16 columns run 2-4x slower than the same
// product with that operand column-major (measured at 256x256 @ 256x{4,10} and 1024x512 @ 512x{4,10}):
// a book-style (in_features, out_features) weight of an output layer. Such products take a column-major
// copy of the operand, or compute the transposed product (below kNarrowCols, both tiny).
constexpr int64_t kNarrowCols = 16;

bool narrow_row_major(const at::Tensor& b) { return b.size(1) < kNarrowCols && b.size(1) > 1 && b.stride(1) == 1; }

// b, or a column-major copy of it when a GEMM with it on the right would be slow (narrow_row_major).
at::Tensor right_operand(const at::Tensor& b) {
  if (!narrow_row_major(b)) return b;
  at::Tensor t = cpu::empty({b.size(1), b.size(0)}, b.scalar_type());
  t.copy_(b.t());
  return t.t();
}

// out = a @ b, where out (K, N) is narrow and row-major: computed as out^T = b^T a^T into a contiguous
// buffer, then transposed into out.
void mm_narrow_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!narrow_row_major(out)) {
    at::cpu::mm_out(out, a, b);
    return;
  }
  at::Tensor t = cpu::empty({out.size(1), out.size(0)}, out.scalar_type());
  at::cpu::mm_out(t, b.t(), a.t());
  out.copy_(t.t());
}

// out[r0:r1] = a[r0:r1] @ b, with BLAS on one thread when called inside a parallel region.
void mm_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t r0, int64_t r1) {
  at::Tensor dst = out.narrow(0, r0, r1 - r0);
  at::cpu::mm_out(dst, a.narrow(0, r0, r1 - r0), b);
}

template <typename T>
void forward_in_type(const LinearForward& args, const acc_t<T>* bias, at::Tensor& out) {
  const int64_t M = args.M, K = args.K, N = args.N;
  if (K == 0) out.zero_();  // an empty sum; BLAS is not asked about zero-length inner dimensions
  const RowPlan plan = plan_rows(M, K, N, out.element_size());
  const at::Tensor weight = K > 0 ? right_operand(args.weight) : args.weight;
  if (!plan.blocked && K > 0) at::cpu::mm_out(out, args.x2, weight);
  T* y = out.mutable_data_ptr<T>();
  if (bias == nullptr && args.act == Activation::kNone && (!plan.blocked || K == 0)) return;
  at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
      if (plan.blocked && K > 0) mm_rows(out, args.x2, weight, r0, r1);
      epilogue_rows(y, r0, r1, N, bias, args.act);
    }
  });
}

template <typename T>
void backward_in_type(const LinearBackward& args, LinearGrads& grads, double* partial) {
  const int64_t M = args.M, N = args.N, K = args.K;
  at::Tensor& dx = grads.dx;
  at::Tensor& dw = grads.dw;
  const bool relu = args.o2.defined(), gemms = dx.defined() || dw.defined();
  // g' = (out <= 0 ? 0 : g): its own buffer for relu, g itself otherwise.
  const at::Tensor gp = relu && gemms ? cpu::empty({M, N}, args.g2.scalar_type()) : args.g2;
  const RowPlan plan = plan_rows(M, N, K, args.g2.element_size());  // dX = g' @ W^T: [M, N] x [N, K]
  const bool fused_dx = dx.defined() && plan.blocked && N > 0;
  if ((relu && gemms) || partial != nullptr || fused_dx) {
    const MaskedGrad<T> src{rows_of<T>(args.g2), rows_of<T>(args.o2), N};
    const Rows<T> gp_rows{gp.is_same(args.g2) ? nullptr : gp.mutable_data_ptr<T>(), N};
    const at::Tensor wt = fused_dx ? args.weight.t() : at::Tensor();
    at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t<T>> scratch(partial != nullptr ? N : 0);
      const ChunkSums<acc_t<T>> sums{partial, scratch.data(), N};
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
        mask_and_sum_rows(src, gp_rows, sums, r0, r1);
        if (fused_dx) mm_rows(dx, gp, wt, r0, r1);
      }
    });
  }
  if (dx.defined() && !fused_dx) {
    if (N > 0) at::cpu::mm_out(dx, gp, args.weight.t());
    else dx.zero_();
  }
  if (dw.defined()) {
    if (M > 0) mm_narrow_out(dw, args.x2.t(), gp);
    else dw.zero_();
  }
}

}  // namespace

template <typename T>
void blas_forward(const LinearForward& args, const acc_t<T>* bias, at::Tensor& out) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    if (blas_in_float<T>()) {
      LinearForward wide = args;
      wide.x2 = widened<T>(args.x2);
      wide.weight = widened<T>(args.weight);
      at::Tensor out_f = float_like(out);
      forward_in_type<float>(wide, bias, out_f);
      return narrowed_into<T>(out_f, out);
    }
  }
  forward_in_type<T>(args, bias, out);
}

template <typename T>
void blas_backward(const LinearBackward& args, LinearGrads& grads, double* partial) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    if ((grads.dx.defined() || grads.dw.defined()) && blas_in_float<T>()) {
      // The same in float32 (the bias-gradient sums are unchanged). x is read only for dW and the weight
      // only for dX (else only their sizes): widened when read.
      LinearBackward wide = args;
      wide.g2 = widened<T>(args.g2);
      if (grads.dw.defined()) wide.x2 = widened<T>(args.x2);
      if (grads.dx.defined()) wide.weight = widened<T>(args.weight);
      if (args.o2.defined()) wide.o2 = widened<T>(args.o2);
      LinearGrads wide_grads{float_like(grads.dx), float_like(grads.dw), at::Tensor()};
      backward_in_type<float>(wide, wide_grads, partial);
      if (grads.dx.defined()) narrowed_into<T>(wide_grads.dx, grads.dx);
      if (grads.dw.defined()) narrowed_into<T>(wide_grads.dw, grads.dw);
      return;
    }
  }
  backward_in_type<T>(args, grads, partial);
}

#define CUSTOMLAYERS_INSTANTIATE_BLAS(T)                                                 \
  template void blas_forward<T>(const LinearForward&, const acc_t<T>*, at::Tensor&); \
  template void blas_backward<T>(const LinearBackward&, LinearGrads&, double*);
CUSTOMLAYERS_FOR_FLOATING_TYPES(CUSTOMLAYERS_INSTANTIATE_BLAS)

}  // namespace customlayers::cpu
