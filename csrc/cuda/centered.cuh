// The CUDA kernels of customlayers::centered (y = x - mean(x, dim)) on a dense [outer, reduce, inner]
// block (planned by common/layout.h, as on CPU):
//  * Rows that fit on chip (inner == 1, reduce <= 4096): one kernel, one warp or block per row; the row
//    stays in registers between the reduction and the subtraction.
//  * Columns (inner > 1) of at most 64 rows, or enough of them to give every SM several blocks: one
//    kernel, one thread per column (sum down it, then subtract), no workspace.
//  * Otherwise three kernels: partial sums over fixed chunks -> means (one warp per mean, chunks added
//    in a fixed order) -> subtract.
// Reductions use shuffle trees and fixed chunking, never atomics: the same input on the same GPU gives
// bit-identical output. Sums are accumulated in double; elementwise math in acc_t (float for
// float/half/bfloat16), with the mean split into hi + lo so float32 results keep ~double accuracy.
// Written against common/cuda_device.cuh and cuda_utils.cuh only, so the CUDA emulator of the C++ tests
// runs it too.
#pragma once

#include "common/cuda_utils.cuh"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace customlayers::cuda {

constexpr int kCenteredThreads = 256;
constexpr int kItems = 16;                            // values per thread held in registers (on-chip path)
constexpr int64_t kRowChunk = kCenteredThreads * 32;  // elements per block in row partial sums
constexpr int64_t kColRows = 64;                      // rows per block in column partial sums
constexpr int kUnroll = 4;                            // elements per thread per step when subtracting

template <typename A>
__device__ __forceinline__ void split_mean(double m, A& hi, A& lo) {
  hi = static_cast<A>(m);
  lo = isfinite(static_cast<double>(hi)) ? static_cast<A>(m - static_cast<double>(hi)) : A(0);
}

// One group of kGroup threads per row of length `reduce` <= kGroup * kItems (inner == 1).
template <typename T, int kGroup>
__global__ void __launch_bounds__(kCenteredThreads) rows_onchip_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                int64_t rows, int64_t reduce) {
  using A = acc_t<T>;
  __shared__ double shared[kCenteredThreads / kWarp];
  constexpr int kGroups = kCenteredThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  // Rows are visited in steps that keep the whole block in the loop together (barriers inside).
  for (int64_t base = int64_t(blockIdx.x) * kGroups; base < rows; base += int64_t(gridDim.x) * kGroups) {
    const int64_t row = base + threadIdx.x / kGroup;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * reduce;
    A v[kItems];
    double s = 0;  // in double from the first value, like every other sum here
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t r = lane + int64_t(k) * kGroup;
      v[k] = active && r < reduce ? static_cast<A>(xr[r]) : A(0);
      s += static_cast<double>(v[k]);
    }
    const double total = kGroup == kWarp ? warp_reduce_sum(s) : group_reduce_sum(s, shared, kGroup);
    if (!active) continue;
    A hi, lo;
    split_mean(total / static_cast<double>(reduce), hi, lo);
    T* yr = y + row * reduce;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t r = lane + int64_t(k) * kGroup;
      if (r < reduce) yr[r] = static_cast<T>((v[k] - hi) - lo);
    }
  }
}

// partial[o * chunks + c] = sum of row o's elements in chunk c (inner == 1).
template <typename T>
__global__ void __launch_bounds__(kCenteredThreads) row_partial_kernel(const T* __restrict__ x, double* __restrict__ partial,
                                                                int64_t outer, int64_t reduce, int64_t chunks) {
  __shared__ double shared[kCenteredThreads / kWarp];
  for (int64_t task = blockIdx.x; task < outer * chunks; task += gridDim.x) {
    const int64_t o = task / chunks, c = task % chunks;
    const int64_t begin = c * kRowChunk, end = min(reduce, begin + kRowChunk);
    const T* xr = x + o * reduce;
    double s = 0.0;
    for (int64_t r = begin + threadIdx.x; r < end; r += kUnroll * kCenteredThreads) {
      double part = 0;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t rk = r + int64_t(k) * kCenteredThreads;
        if (rk < end) part += static_cast<double>(xr[rk]);
      }
      s += part;
    }
    s = group_reduce_sum(s, shared, kCenteredThreads);
    if (threadIdx.x == 0) partial[task] = s;
  }
}

// partial[(o * chunks + c) * inner + i] = sum over rows of chunk c of x[o, r, i] (inner > 1).
template <typename T>
__global__ void __launch_bounds__(kCenteredThreads) col_partial_kernel(const T* __restrict__ x, double* __restrict__ partial,
                                                                int64_t outer, int64_t reduce, int64_t inner,
                                                                int64_t chunks) {
  const int64_t tiles = (inner + kCenteredThreads - 1) / kCenteredThreads;
  for (int64_t task = blockIdx.x; task < outer * chunks * tiles; task += gridDim.x) {
    const int64_t tile = task % tiles, c = (task / tiles) % chunks, o = task / (tiles * chunks);
    const int64_t i = tile * kCenteredThreads + threadIdx.x;
    if (i >= inner) continue;
    const int64_t begin = c * kColRows, end = min(reduce, begin + kColRows);
    const T* xc = x + o * reduce * inner + i;
    double s = 0.0;
    for (int64_t r = begin; r < end; r += kUnroll) {
      double part = 0;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        if (r + k < end) part += static_cast<double>(xc[(r + k) * inner]);
      s += part;
    }
    partial[(o * chunks + c) * inner + i] = s;
  }
}

// One thread per column i of each outer block: its mean over all `reduce` rows (summed in double; with
// reduce <= kColRows in the order of a partial-sums chunk), then y = (x - hi) - lo down the same column.
// No workspace.
template <typename T>
__global__ void __launch_bounds__(kCenteredThreads) col_fused_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                              int64_t outer, int64_t reduce, int64_t inner) {
  using A = acc_t<T>;
  const int64_t tiles = (inner + kCenteredThreads - 1) / kCenteredThreads;
  for (int64_t task = blockIdx.x; task < outer * tiles; task += gridDim.x) {
    const int64_t tile = task % tiles, o = task / tiles;
    const int64_t i = tile * kCenteredThreads + threadIdx.x;
    if (i >= inner) continue;
    const T* xc = x + o * reduce * inner + i;
    T* yc = y + o * reduce * inner + i;
    double s = 0.0;
    for (int64_t r = 0; r < reduce; r += kUnroll) {
      double part = 0;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        if (r + k < reduce) part += static_cast<double>(xc[(r + k) * inner]);
      s += part;
    }
    A hi, lo;
    split_mean(s / static_cast<double>(reduce), hi, lo);
    for (int64_t r = 0; r < reduce; ++r) yc[r * inner] = static_cast<T>((static_cast<A>(xc[r * inner]) - hi) - lo);
  }
}

// One warp per mean: hi[k] + lo[k] = (sum over c of partial[(o * chunks + c) * inner + i]) / reduce.
template <typename A>
__global__ void __launch_bounds__(kCenteredThreads) finalize_kernel(const double* __restrict__ partial, A* __restrict__ hi,
                                                             A* __restrict__ lo, int64_t outer, int64_t reduce,
                                                             int64_t inner, int64_t chunks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kCenteredThreads / kWarp);
  for (int64_t k = int64_t(blockIdx.x) * (kCenteredThreads / kWarp) + threadIdx.x / kWarp; k < outer * inner; k += warps) {
    const int64_t o = k / inner, i = k % inner;
    double s = 0.0;
    for (int64_t c = lane; c < chunks; c += kWarp) s += partial[(o * chunks + c) * inner + i];
    s = warp_reduce_sum(s);
    if (lane == 0) split_mean(s / static_cast<double>(reduce), hi[k], lo[k]);
  }
}

enum class MeanIndex { kOne, kRow, kGeneral };

template <MeanIndex kMode, typename index_t>
__device__ __forceinline__ index_t mean_index(index_t e, index_t reduce, index_t inner) {
  if constexpr (kMode == MeanIndex::kOne) return 0;
  else if constexpr (kMode == MeanIndex::kRow) return e / reduce;
  else return (e / (reduce * inner)) * inner + e % inner;
}

// y[e] = (x[e] - hi[m]) - lo[m] for the mean m of element e.
template <typename T, MeanIndex kMode, typename index_t>
__global__ void __launch_bounds__(kCenteredThreads) subtract_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                             const acc_t<T>* __restrict__ hi,
                                                             const acc_t<T>* __restrict__ lo, index_t n,
                                                             index_t reduce, index_t inner) {
  using A = acc_t<T>;
  const index_t step = index_t(gridDim.x) * kCenteredThreads * kUnroll;
  for (index_t base = index_t(blockIdx.x) * kCenteredThreads * kUnroll + threadIdx.x; base < n; base += step) {
    A v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t e = base + index_t(k) * kCenteredThreads;
      v[k] = e < n ? static_cast<A>(x[e]) : A(0);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t e = base + index_t(k) * kCenteredThreads;
      if (e < n) {
        const index_t m = mean_index<kMode>(e, reduce, inner);
        y[e] = static_cast<T>((v[k] - hi[m]) - lo[m]);
      }
    }
  }
}

template <typename T, MeanIndex kMode>
void launch_subtract(const T* x, T* y, const acc_t<T>* hi, const acc_t<T>* lo, int64_t n, int64_t reduce,
                     int64_t inner, cudaStream_t stream) {
  const dim3 grid(grid_for(n, kCenteredThreads * kUnroll)), block(kCenteredThreads);
  if (n <= std::numeric_limits<int32_t>::max() / 2) {
    launch_kernel(subtract_kernel<T, kMode, int32_t>, grid, block, stream, x, y, hi, lo, static_cast<int32_t>(n),
                  static_cast<int32_t>(reduce), static_cast<int32_t>(inner));
  } else {
    launch_kernel(subtract_kernel<T, kMode, int64_t>, grid, block, stream, x, y, hi, lo, n, reduce, inner);
  }
}

// Whether columns (inner > 1) take col_fused_kernel: a column is one chunk of partial sums, or the
// columns alone give every SM several blocks. Its memory is the output alone (the partial sums need 8
// bytes per mean and chunk, more than the output when few rows are reduced: (2, 2^27) with dim=0).
inline bool centered_fused_columns(int64_t outer, int64_t reduce, int64_t inner) {
  const int64_t tiles = (inner + kCenteredThreads - 1) / kCenteredThreads;
  return inner > 1 && (reduce <= kColRows || outer * tiles >= 4 * static_cast<int64_t>(sm_count()));
}

// Chunks of the partial sums (0: none, a row fits on chip or columns are fused).
inline int64_t centered_chunks(int64_t outer, int64_t reduce, int64_t inner) {
  if ((inner == 1 && reduce <= kCenteredThreads * kItems) || centered_fused_columns(outer, reduce, inner)) return 0;
  return inner == 1 ? (reduce + kRowChunk - 1) / kRowChunk : (reduce + kColRows - 1) / kColRows;
}

// Bytes of device memory centered_block() needs for this block (partial sums, then the means' hi and lo).
template <typename T>
size_t centered_workspace_bytes(int64_t outer, int64_t reduce, int64_t inner) {
  const int64_t chunks = centered_chunks(outer, reduce, inner);
  if (chunks == 0) return 0;
  return sizeof(double) * outer * chunks * inner + 2 * sizeof(acc_t<T>) * outer * inner;
}

// y = x - mean over the middle dimension of the dense [outer, reduce, inner] block x; `workspace` holds
// centered_workspace_bytes<T>(outer, reduce, inner) bytes, 8-byte aligned.
template <typename T>
void centered_block(const T* x, T* y, int64_t outer, int64_t reduce, int64_t inner, void* workspace,
                    cudaStream_t stream) {
  using A = acc_t<T>;
  const dim3 block(kCenteredThreads);
  const int64_t chunks = centered_chunks(outer, reduce, inner);
  if (chunks == 0 && inner > 1) {
    launch_kernel(col_fused_kernel<T>, dim3(grid_for(outer * ((inner + kCenteredThreads - 1) / kCenteredThreads), 1)),
                  block, stream, x, y, outer, reduce, inner);
    return;
  }
  if (chunks == 0) {
    if (reduce <= kWarp * kItems)
      launch_kernel(rows_onchip_kernel<T, kWarp>, dim3(grid_for(outer, kCenteredThreads / kWarp)), block, stream, x, y,
                    outer, reduce);
    else
      launch_kernel(rows_onchip_kernel<T, kCenteredThreads>, dim3(grid_for(outer, 1)), block, stream, x, y, outer,
                    reduce);
    return;
  }

  double* partial = static_cast<double*>(workspace);
  A* hi = reinterpret_cast<A*>(partial + outer * chunks * inner);
  A* lo = hi + outer * inner;
  if (inner == 1) {
    launch_kernel(row_partial_kernel<T>, dim3(grid_for(outer * chunks, 1)), block, stream, x, partial, outer, reduce,
                  chunks);
  } else {
    const int64_t tiles = (inner + kCenteredThreads - 1) / kCenteredThreads;
    launch_kernel(col_partial_kernel<T>, dim3(grid_for(outer * chunks * tiles, 1)), block, stream, x, partial, outer,
                  reduce, inner, chunks);
  }
  launch_kernel(finalize_kernel<A>, dim3(grid_for(outer * inner, kCenteredThreads / kWarp)), block, stream,
                static_cast<const double*>(partial), hi, lo, outer, reduce, inner, chunks);

  const int64_t n = outer * reduce * inner;
  const A* chi = hi;
  const A* clo = lo;
  if (outer == 1 && inner == 1)
    launch_subtract<T, MeanIndex::kOne>(x, y, chi, clo, n, reduce, inner, stream);
  else if (inner == 1)
    launch_subtract<T, MeanIndex::kRow>(x, y, chi, clo, n, reduce, inner, stream);
  else
    launch_subtract<T, MeanIndex::kGeneral>(x, y, chi, clo, n, reduce, inner, stream);
}

}  // namespace customlayers::cuda
