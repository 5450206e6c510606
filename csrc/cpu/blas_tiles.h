// GEMMs cut into tiles whose sizes depend on the shapes alone, each tile one single-threaded BLAS call
// (at::cpu::mm_out/addmm_out; for float32, gemm_f32.h's GEMM where it is the faster one) over the whole
// reduction, the tiles run in a parallel region: results that do not depend on the thread count. Shared by
// the CPU kernels whose GEMMs are BLAS's (linear_act_blas.cpp, linear_glu_kernel.cpp).
#pragma once

#include "common/cpu_alloc.h"
#include "cpu/gemm_f32.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace customlayers::cpu {

constexpr int64_t kTileMacs = 1 << 24;           // multiply-adds per tile, at least (float32, float64)
constexpr int64_t kCachedOperandBytes = 1 << 20; // operands up to this size are re-read from cache (L2)
constexpr int64_t kMaxTileRows = 512;
constexpr int64_t kMinTiles = 8;                 // columns are split while there are fewer tiles than this
constexpr int64_t kTileAlign = 64;               // tile sides are planned in multiples of this,
constexpr int64_t kEvenAlign = 16;               // then evened out in multiples of this (but the last ones)

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

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline TilePlan plan_tiles(int64_t R, int64_t C, int64_t red, int64_t element_size, int64_t tile_macs) {
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

// BLAS libraries pick their algorithm (how the work, and on some CPUs the sums, are split) from the number
// of threads they may use, not from the number they get: inside a parallel region they run on the calling
// thread, but (seen on an AVX-512 Xeon, for MKL's float32 and oneDNN's bfloat16 GEMMs) with other bits than
// under torch.set_num_threads(1). SequentialBlas tells the calling thread's BLAS that it has one thread:
// MKL's thread-local setting (MKL_Set_Num_Threads_Local, exported by libtorch_cpu when torch uses MKL; a
// null weak reference elsewhere, e.g. OpenBLAS or aarch64) and this thread's OpenMP thread count, which
// oneDNN reads. Both are restored on exit; other threads are not affected.
// torch sets both back to its thread count on a thread's first parallel loop (at::init_num_threads, once per
// thread, e.g. inside an addmm's bias copy): hold() says whether the setting held, setting it again.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

class SequentialBlas {
 public:
  SequentialBlas() : mkl_previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {
#ifdef _OPENMP
    omp_previous_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_previous_);
#ifdef _OPENMP
    omp_set_num_threads(omp_previous_);
#endif
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

  // Whether BLAS still had one thread; it has again after the call.
  bool hold() const {
    bool held = MKL_Set_Num_Threads_Local == nullptr || MKL_Set_Num_Threads_Local(1) == 1;
#ifdef _OPENMP
    if (omp_get_max_threads() != 1) {
      held = false;
      omp_set_num_threads(1);
    }
#endif
    return held;
  }

 private:
  int mkl_previous_;  // 0: MKL's global setting
#ifdef _OPENMP
  int omp_previous_;
#endif
};

// f(i) for every tile i < n, in a parallel region whenever more than one thread may run, with BLAS on the
// calling thread and told so (SequentialBlas), so a tile's result is the same whatever the thread count (one
// tile too: the region then has a thread with nothing to do). A tile during which the setting did not hold
// is computed again (f(i) overwrites its outputs): once per thread in practice, twice at most. Each thread takes the next tile
// not yet taken, so tiles of different costs (dX's and dW's) keep every thread busy; which thread computes
// a tile does not change it. The tiles call ATen ops (views, addmm, copies): each thread runs them with the
// caller's thread-local state (below autograd, as the kernel is called), which the region's worker threads
// would not have otherwise.
template <typename F>
void run_tiles(int64_t n, const F& f) {
  if (n <= 0) return;
  const auto run = [&](const SequentialBlas& sequential, int64_t i) {
    // Twice at most: torch resets the setting once per thread (and per library inlining its lazy init); a
    // setting that never holds must not loop forever.
    for (int tries = 0; tries < 3; ++tries) {
      f(i);
      if (sequential.hold()) return;
    }
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (at::get_num_threads() == 1 || at::in_parallel_region()) {
    const SequentialBlas sequential;
    for (int64_t i = 0; i < n; ++i) run(sequential, i);
    return;
  }
  const at::ThreadLocalState state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(threads, 2), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(state);
    const SequentialBlas sequential;
    for (int64_t i = next++; i < n; i = next++) run(sequential, i);
  });
}

// MKL's GEMMs with a row-major right operand of fewer than 16 columns run 2-4x slower than the same
// product with that operand column-major (measured at 256x256 @ 256x{4,10} and 1024x512 @ 512x{4,10}):
// a book-style (in_features, out_features) weight of an output layer. Such products take a column-major
// copy of the operand, or compute the transposed product.
constexpr int64_t kNarrowCols = 16;

inline bool narrow_row_major(const at::Tensor& b) { return b.size(1) < kNarrowCols && b.size(1) > 1 && b.stride(1) == 1; }

// b, or a column-major copy of it when a GEMM with it on the right would be slow (narrow_row_major).
inline at::Tensor right_operand(const at::Tensor& b) {
  if (!narrow_row_major(b)) return b;
  at::Tensor t = cpu::empty({b.size(1), b.size(0)}, b.scalar_type());
  t.copy_(b.t());
  return t.t();
}

// dst = a @ b [+ bias (C,), undefined: none], or dst += a @ b when `accumulate`: gemm_f32 for float32 where
// it is wanted (gemm_f32.h), else BLAS (addmm with a bias: added to the GEMM's accumulator, so that a
// float16/bfloat16 dst is rounded once).
inline void gemm(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                 bool accumulate = false) {
  if (dst.scalar_type() == at::kFloat && gemm_f32_wanted()) {
    const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
    gemm_f32({mutable_strided_of<float>(dst), strided_of<float>(a), strided_of<float>(b),
              bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr, dst.size(0), dst.size(1), a.size(1),
              accumulate});
  } else if (accumulate) {
    at::cpu::addmm_out(dst, dst, a, b);
  } else if (bias.defined()) {
    at::cpu::addmm_out(dst, bias, a, b);
  } else {
    at::cpu::mm_out(dst, a, b);
  }
}

// out = a @ b; when out is narrow and row-major, computed as out^T = b^T a^T into a contiguous buffer, then
// transposed into out.
inline void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!narrow_row_major(out)) {
    gemm(out, a, b, at::Tensor());
    return;
  }
  at::Tensor t = cpu::empty({out.size(1), out.size(0)}, out.scalar_type());
  gemm(t, b.t(), a.t(), at::Tensor());
  out.copy_(t.t());
}

// dst += a @ b (float32, float64: its sum rounded into dst's).
inline void tile_accumulate(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b) {
  if (a.size(1) > 0) gemm(dst, a, b, at::Tensor(), true);
}

// dst = a @ b [+ bias (C,), undefined: none].
inline void tile_product(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (a.size(1) == 0) {  // an empty sum; BLAS is not asked about zero-length inner dimensions
    dst.zero_();
    if (bias.defined()) dst.add_(bias);
  } else if (bias.defined()) {
    gemm(dst, a, b, bias);
  } else {
    gemm_into(dst, a, b);
  }
}

// Reduced-precision GEMMs run natively about 4x faster than float32 ones, and each call (oneDNN) reorders its
// operands: bigger tiles, fewer calls.
template <typename T>
constexpr int64_t tile_macs() {
  return at::vec::is_reduced_floating_point_v<T> ? 16 * kTileMacs : kTileMacs;
}

}  // namespace customlayers::cpu
