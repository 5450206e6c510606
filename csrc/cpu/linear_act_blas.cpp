// The BLAS path of the CPU linear_act kernels (see linear_act_blas.h).
//
// Results do not depend on the thread count: every GEMM is cut into output tiles whose sizes depend on the
// shapes alone (plan_tiles), each tile is one single-threaded BLAS call over the whole reduction, and the
// tiles run in a parallel region (run_tiles), where BLAS (MKL, OpenBLAS, oneDNN) runs on the calling thread
// only. A multithreaded BLAS call would split its work, and on some CPUs its sums, by the thread count.
//  * forward: per tile out = x @ W + bias (addmm: the bias is added to the GEMM's accumulator, so float16 and
//    bfloat16 outputs are rounded once, as nn.Linear's), then the activation on the tile while it is in cache
//    (float16/bfloat16 with an activation other than relu: the whole forward in float32, rounded once, or for
//    bfloat16 on the AVX512-BF16 kernel of linear_act_bf16.h);
//  * backward: one pass over grad makes the masked gradient g' = g * act'(.) and the bias-gradient chunk sums (fixed 64-row
//    chunks); then the tiles of dX = g' W^T and dW = X^T g' (in the weight's layout) in one parallel region.
// float16/bfloat16 run in float32 where the CPU lacks fast GEMMs for them (linear_act_widen.h).
#include "cpu/linear_act_blas.h"

#include "common/cpu_alloc.h"
#include "cpu/linear_act_bf16.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_widen.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <atomic>
#include <vector>

namespace customlayers::cpu {
namespace {

constexpr int64_t kTileMacs = 1 << 24;           // multiply-adds per tile, at least (float32, float64)
constexpr int64_t kCachedOperandBytes = 1 << 20; // operands up to this size are re-read from cache (L2)
constexpr int64_t kMaxTileRows = 512;
constexpr int64_t kMinTiles = 8;                 // columns are split while there are fewer tiles than this
constexpr int64_t kTileAlign = 64;               // tile sides are planned in multiples of this,
constexpr int64_t kEvenAlign = 16;               // then evened out in multiples of this (but the last ones)
constexpr int64_t kReductionChunk = 1024;        // rows per chunk of a dW summed over chunks

// The tiles of a GEMM's (R, C) output with reduction length `red`: rows x cols each (the last ones
// smaller), chosen from the shapes alone. Each tile is a BLAS call that packs its own operands, so
// - rows: enough for tile_macs when the right operand (red, C) stays in cache, else kMaxTileRows (each
//   tile re-reads it from memory);
// - columns are split while there are fewer than kMinTiles tiles, a tile keeps a quarter of tile_macs and
//   its rows of the left operand (rows, red), which each column tile re-reads, stay in cache;
// - an odd number of tiles gets one more row tile (two threads share them evenly), and the rows and
//   columns are then shared out evenly.
struct TilePlan {
  int64_t rows = 0, cols = 0, row_tiles = 0, col_tiles = 0;
  int64_t count() const { return row_tiles * col_tiles; }
};

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

TilePlan plan_tiles(int64_t R, int64_t C, int64_t red, int64_t element_size, int64_t tile_macs) {
  TilePlan p;
  if (R == 0 || C == 0) return p;
  red = std::max<int64_t>(red, 1);
  const bool cached = red * C * element_size <= kCachedOperandBytes;
  const int64_t rows = cached ? std::clamp(round_up(ceil_div(tile_macs, red * C), kTileAlign), kTileAlign, kMaxTileRows)
                              : kMaxTileRows;
  p.row_tiles = ceil_div(R, std::min(rows, R));
  p.col_tiles = 1;
  const auto tile_rows = [&] { return ceil_div(R, p.row_tiles); };
  while (p.row_tiles * p.col_tiles < kMinTiles && ceil_div(C, p.col_tiles * 2) >= kTileAlign &&
         tile_rows() * ceil_div(C, p.col_tiles * 2) * red >= tile_macs / 4 &&
         tile_rows() * red * element_size <= kCachedOperandBytes) {
    p.col_tiles *= 2;
  }
  if (p.row_tiles * p.col_tiles % 2 == 1 && R >= 2 * kEvenAlign * (p.row_tiles + 1)) ++p.row_tiles;
  p.rows = std::min(R, round_up(tile_rows(), kEvenAlign));
  p.cols = std::min(C, round_up(ceil_div(C, p.col_tiles), kEvenAlign));
  p.row_tiles = ceil_div(R, p.rows);
  p.col_tiles = ceil_div(C, p.cols);
  return p;
}

// f(i) for every tile i < n, in a parallel region whenever more than one thread may run: BLAS called inside
// it runs on the calling thread, so a tile's result is the same whatever the thread count (one tile too: the
// region then has a thread with nothing to do). Each thread takes the next tile not yet taken, so tiles of
// different costs (dX's and dW's) keep every thread busy; which thread computes a tile does not change it.
// The tiles call ATen ops (views, addmm, copies): each thread runs them with the caller's thread-local state
// (below autograd, as the kernel is called), which the region's worker threads would not have otherwise.
template <typename F>
void run_tiles(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  const at::ThreadLocalState state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(threads, 2), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t i = next++; i < n; i = next++) f(i);
  });
}

// MKL's GEMMs with a row-major right operand of fewer than 16 columns run 2-4x slower than the same
// product with that operand column-major (measured at 256x256 @ 256x{4,10} and 1024x512 @ 512x{4,10}):
// a book-style (in_features, out_features) weight of an output layer. Such products take a column-major
// copy of the operand, or compute the transposed product.
constexpr int64_t kNarrowCols = 16;

bool narrow_row_major(const at::Tensor& b) { return b.size(1) < kNarrowCols && b.size(1) > 1 && b.stride(1) == 1; }

// b, or a column-major copy of it when a GEMM with it on the right would be slow (narrow_row_major).
at::Tensor right_operand(const at::Tensor& b) {
  if (!narrow_row_major(b)) return b;
  at::Tensor t = cpu::empty({b.size(1), b.size(0)}, b.scalar_type());
  t.copy_(b.t());
  return t.t();
}

// out = a @ b; when out is narrow and row-major, computed as out^T = b^T a^T into a contiguous buffer, then
// transposed into out.
void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!narrow_row_major(out)) {
    at::cpu::mm_out(out, a, b);
    return;
  }
  at::Tensor t = cpu::empty({out.size(1), out.size(0)}, out.scalar_type());
  at::cpu::mm_out(t, b.t(), a.t());
  out.copy_(t.t());
}

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
  if (g.a.size(1) == 0) {  // an empty sum; BLAS is not asked about zero-length inner dimensions
    dst.zero_();
    if (bias.defined()) dst.add_(bias);
  } else if (bias.defined()) {
    at::cpu::addmm_out(dst, bias, a, b);
  } else {
    gemm_into(dst, a, b);
  }
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

// Reduced-precision GEMMs run natively about 4x faster than float32 ones, and each call (oneDNN) reorders its
// operands: bigger tiles, fewer calls.
template <typename T>
constexpr int64_t tile_macs() {
  return at::vec::is_reduced_floating_point_v<T> ? 16 * kTileMacs : kTileMacs;
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
      std::vector<acc_t<T>> scratch(partial != nullptr ? N : 0);
      const ChunkSums<acc_t<T>> sums{partial, scratch.data(), N};
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

// Whether the bfloat16 forwards that round once run on the AVX512-BF16 kernel (CUSTOMLAYERS_CPU_BLAS16).
bool bf16_dot_enabled() {
  switch (blas16_setting()) {
    case Blas16::kAuto: return bf16_dot_supported();
    case Blas16::kDot:
      TORCH_CHECK_VALUE(bf16_dot_supported(), "linear_act: CUSTOMLAYERS_CPU_BLAS16=dot needs a CPU with AVX512-BF16 "
                        "and the avx512 CPU tier (customlayers.backend_report() says which runs)");
      return true;
    case Blas16::kNative:
    case Blas16::kFloat: return false;
  }
  return false;
}

}  // namespace

template <typename T>
void blas_forward(const LinearForward& args, at::Tensor& out) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    // A native 16-bit GEMM rounds its output: relu of the rounded value is the rounded relu, but the other
    // activations would be rounded twice, so they run in float32 and round once.
    const bool act_on_rounded = args.act == Activation::kNone || args.act == Activation::kRelu;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (!act_on_rounded && bf16_dot_enabled()) return bf16_dot_forward(args, out);
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
