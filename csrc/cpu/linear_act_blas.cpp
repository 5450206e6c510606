// The BLAS path of the CPU linear_act kernels (see linear_act_blas.h).
//
// Results do not depend on the thread count: every GEMM is cut into output tiles whose sizes depend on the
// shapes alone (plan_tiles), each tile is one single-threaded BLAS call over the whole reduction, and the
// tiles run in a parallel region (run_tiles), where BLAS (MKL, OpenBLAS, oneDNN) runs on the calling thread
// only. A multithreaded BLAS call would split its work, and on some CPUs its sums, by the thread count.
//  * forward: per tile out = x @ W + bias (addmm: the bias is added to the GEMM's accumulator, so float16 and
//    bfloat16 outputs are rounded once, as nn.Linear's), then the activation on the tile while it is in cache
//    (float16/bfloat16 with an activation other than relu: the whole forward in float32, rounded once, or for
//    bfloat16 on the AMX or AVX512-BF16 kernel of linear_act_bf16.h);
//  * backward: one pass over grad makes the masked gradient g' = g * act'(.) and the bias-gradient chunk sums (fixed 64-row
//    chunks); then the tiles of dX = g' W^T and dW = X^T g' (in the weight's layout) in one parallel region.
// float16/bfloat16 run in float32 where the CPU lacks fast GEMMs for them (linear_act_widen.h).
#include "cpu/linear_act_blas.h"

#include "common/cpu_alloc.h"
#include "cpu/blas_tiles.h"
#include "cpu/linear_act_bf16.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_widen.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <vector>

namespace customlayers::cpu {
namespace {

constexpr int64_t kReductionChunk = 1024;        // rows per chunk of a dW summed over chunks

// One GEMM cut into tiles: out (R, C) = a (R, red) @ b (red, C) [+ bias (C,)], activation `act` on each tile.
struct TiledGemm {
  at::Tensor out, a, b, bias;
  Activation act = Activation::kNone;
  TilePlan plan;
};

TiledGemm tiled(at::Tensor out, at::Tensor a, at::Tensor b, at::Tensor bias, Activation act, int64_t tile_macs) {
  const TilePlan plan = plan_tiles(out.size(0), out.size(1), a.size(1), out.element_size(), tile_macs);
  return {std::move(out), std::move(a), std::move(b), std::move(bias), act, plan};
}

template <typename T>
void run_tile(const TiledGemm& g, int64_t tile) {
  const TilePlan& p = g.plan;
  const int64_t r0 = tile / p.col_tiles * p.rows, c0 = tile % p.col_tiles * p.cols;
  const int64_t rows = std::min(p.rows, g.out.size(0) - r0), cols = std::min(p.cols, g.out.size(1) - c0);
  at::Tensor dst = g.out.narrow(0, r0, rows).narrow(1, c0, cols);
  const at::Tensor a = g.a.narrow(0, r0, rows), b = g.b.narrow(1, c0, cols);
  const at::Tensor bias = g.bias.defined() ? g.bias.narrow(0, c0, cols) : at::Tensor();
  tile_product(dst, a, b, bias);
  if (g.act != Activation::kNone) activate_rows(dst.mutable_data_ptr<T>(), dst.stride(0), 0, rows, cols, g.act);
}

// The tiles of every GEMM in `gemms`, in one parallel region.
template <typename T>
void run_gemms(const std::vector<const TiledGemm*>& gemms) {
  int64_t total = 0;
  for (const TiledGemm* g : gemms) total += g->plan.count();
  run_tiles(total, [&](int64_t i) {
    for (const TiledGemm* g : gemms) {
      if (i < g->plan.count()) return run_tile<T>(*g, i);
      i -= g->plan.count();
    }
  });
}

template <typename T>
void forward_in_type(const LinearForward& args, at::Tensor& out) {
  const at::Tensor weight = args.K > 0 ? right_operand(args.weight) : args.weight;
  const TiledGemm g = tiled(out, args.x2, weight, args.bias, args.act, tile_macs<T>());
  run_gemms<T>({&g});
}

template <typename T>
void backward_in_type(const LinearBackward& args, LinearGrads& grads, double* partial) {
  const int64_t M = args.M, N = args.N;
  const bool masked = args.saved.defined(), gemms = grads.dx.defined() || grads.dw.defined();
  // g' = g * act'(.): its own buffer with an activation, g itself for 'none'.
  const at::Tensor gp = masked && gemms ? cpu::empty({M, N}, args.g2.scalar_type()) : args.g2;
  if ((masked && gemms) || partial != nullptr) {
    const MaskedGrad<T> src{rows_of<T>(args.g2), rows_of<T>(args.saved), N, args.act};
    const Rows<T> gp_rows{gp.is_same(args.g2) ? nullptr : gp.mutable_data_ptr<T>(), N};
    const int64_t chunks = ceil_div(M, kChunkRows);
    const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(kChunkRows * N, 1));
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      const ChunkSums sums{partial, N};
      mask_and_sum_rows(src, gp_rows, sums, begin * kChunkRows, std::min(M, end * kChunkRows));
    });
  }
  if (!gemms) return;
  const int64_t macs = tile_macs<T>();
  std::vector<TiledGemm> parts;  // dX = g' @ W^T: [M, N] x [N, K]; dW = X^T @ g': [K, M] x [M, N]
  if (grads.dx.defined()) parts.push_back(tiled(grads.dx, gp, right_operand(args.weight.t()), {}, Activation::kNone, macs));
  // A dW with few tiles and a long reduction (many rows, a small weight) is summed over fixed chunks of rows
  // instead, each chunk's product a GEMM of its own, the chunks added in order; not in float16/bfloat16,
  // whose chunks would each be rounded.
  const int64_t K = args.K;
  const bool split = grads.dw.defined() && !at::vec::is_reduced_floating_point_v<T> && M >= 2 * kReductionChunk &&
                     plan_tiles(K, N, M, grads.dw.element_size(), macs).count() < kMinTiles;
  const int64_t chunks = split ? ceil_div(M, kReductionChunk) : 0;
  const at::Tensor dw_parts = split ? cpu::empty({chunks, K, N}, grads.dw.scalar_type()) : at::Tensor();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = c * kReductionChunk, rows = std::min(kReductionChunk, M - r0);
    parts.push_back(tiled(dw_parts[c], args.x2.narrow(0, r0, rows).t(), gp.narrow(0, r0, rows), {}, Activation::kNone,
                          macs));
  }
  if (grads.dw.defined() && !split) parts.push_back(tiled(grads.dw, args.x2.t(), gp, {}, Activation::kNone, macs));
  std::vector<const TiledGemm*> list;
  for (const TiledGemm& g : parts) list.push_back(&g);
  run_gemms<T>(list);
  if (!split) return;
  const T* src = dw_parts.const_data_ptr<T>();
  const Strided<T> dw = mutable_strided_of<T>(grads.dw);
  at::parallel_for(0, K, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(N * chunks, 1)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t n = 0; n < N; ++n) {
        T acc = src[k * N + n];
        for (int64_t c = 1; c < chunks; ++c) acc += src[(c * K + k) * N + n];
        dw.data[k * dw.rs + n * dw.cs] = acc;
      }
  });
}

}  // namespace

template <typename T>
void blas_forward(const LinearForward& args, at::Tensor& out) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    // A native 16-bit GEMM rounds its output: relu of the rounded value is the rounded relu, but the other
    // activations would be rounded twice, so they run in float32 and round once, or for bfloat16 on a
    // kernel of linear_act_bf16.h (the AMX one also runs none and relu: faster than the BLAS tiles there).
    const bool act_on_rounded = args.act == Activation::kNone || args.act == Activation::kRelu;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (const Bf16Kernel kernel = bf16_kernel("linear_act");
          kernel == Bf16Kernel::kAmx || (!act_on_rounded && kernel != Bf16Kernel::kNone))
        return bf16_forward(args, out, kernel);
    }
    if (blas_in_float<T>() || !act_on_rounded) {
      LinearForward wide = args;
      wide.x2 = widened<T>(args.x2);
      wide.weight = widened<T>(args.weight);
      if (args.bias.defined()) wide.bias = widened<T>(args.bias);
      at::Tensor out_f = float_like(out);
      forward_in_type<float>(wide, out_f);
      return narrowed_into<T>(out_f, out);
    }
  }
  forward_in_type<T>(args, out);
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
      if (args.saved.defined()) wide.saved = widened<T>(args.saved);
      LinearGrads wide_grads{float_like(grads.dx), float_like(grads.dw), at::Tensor()};
      backward_in_type<float>(wide, wide_grads, partial);
      if (grads.dx.defined()) narrowed_into<T>(wide_grads.dx, grads.dx);
      if (grads.dw.defined()) narrowed_into<T>(wide_grads.dw, grads.dw);
      return;
    }
  }
  backward_in_type<T>(args, grads, partial);
}

#define CUSTOMLAYERS_INSTANTIATE_BLAS(T)                                 \
  template void blas_forward<T>(const LinearForward&, at::Tensor&); \
  template void blas_backward<T>(const LinearBackward&, LinearGrads&, double*);
CUSTOMLAYERS_FOR_FLOATING_TYPES(CUSTOMLAYERS_INSTANTIATE_BLAS)

}  // namespace customlayers::cpu
