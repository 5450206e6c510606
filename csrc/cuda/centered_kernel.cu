// CUDA kernel of customlayers::centered: y = x - mean(x, dim).
//
// Planned like the CPU kernel (common/layout.h) as a dense [outer, reduce, inner] block.
//  * Rows that fit on chip (inner == 1, reduce <= 4096): one kernel, one warp or block per row; the row
//    stays in registers between the reduction and the subtraction.
//  * Otherwise three kernels: partial sums over fixed chunks -> means (one warp per mean, chunks added
//    in a fixed order) -> subtract.
// Reductions use shuffle trees and fixed chunking, never atomics: the same input on the same GPU gives
// bit-identical output. Sums are accumulated in double; elementwise math in acc_t (float for
// float/half/bfloat16), with the mean split into hi + lo so float32 results keep ~double accuracy.
#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/layout.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace customlayers::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;                       // values per thread held in registers (on-chip path)
constexpr int64_t kRowChunk = kThreads * 32;     // elements per block in row partial sums
constexpr int64_t kColRows = 64;                 // rows per block in column partial sums
constexpr int kUnroll = 4;                       // elements per thread per step when subtracting

template <typename A>
__device__ __forceinline__ void split_mean(double m, A& hi, A& lo) {
  hi = static_cast<A>(m);
  lo = isfinite(static_cast<double>(hi)) ? static_cast<A>(m - static_cast<double>(hi)) : A(0);
}

// One group of kGroup threads per row of length `reduce` <= kGroup * kItems (inner == 1).
template <typename T, int kGroup>
__global__ void __launch_bounds__(kThreads) rows_onchip_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                int64_t rows, int64_t reduce) {
  using A = acc_t<T>;
  __shared__ double shared[kThreads / kWarp];
  constexpr int kGroups = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  // Rows are visited in steps that keep the whole block in the loop together (barriers inside).
  for (int64_t base = int64_t(blockIdx.x) * kGroups; base < rows; base += int64_t(gridDim.x) * kGroups) {
    const int64_t row = base + threadIdx.x / kGroup;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * reduce;
    A v[kItems];
    A s = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t r = lane + int64_t(k) * kGroup;
      v[k] = active && r < reduce ? static_cast<A>(xr[r]) : A(0);
      s += v[k];
    }
    const double total = kGroup == kWarp ? warp_reduce_sum(static_cast<double>(s))
                                         : group_reduce_sum(static_cast<double>(s), shared, kGroup);
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
__global__ void __launch_bounds__(kThreads) row_partial_kernel(const T* __restrict__ x, double* __restrict__ partial,
                                                                int64_t outer, int64_t reduce, int64_t chunks) {
  using A = acc_t<T>;
  __shared__ double shared[kThreads / kWarp];
  for (int64_t task = blockIdx.x; task < outer * chunks; task += gridDim.x) {
    const int64_t o = task / chunks, c = task % chunks;
    const int64_t begin = c * kRowChunk, end = min(reduce, begin + kRowChunk);
    const T* xr = x + o * reduce;
    double s = 0.0;
    for (int64_t r = begin + threadIdx.x; r < end; r += kUnroll * kThreads) {
      A part = 0;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t rk = r + int64_t(k) * kThreads;
        if (rk < end) part += static_cast<A>(xr[rk]);
      }
      s += static_cast<double>(part);
    }
    s = group_reduce_sum(s, shared, kThreads);
    if (threadIdx.x == 0) partial[task] = s;
  }
}

// partial[(o * chunks + c) * inner + i] = sum over rows of chunk c of x[o, r, i] (inner > 1).
template <typename T>
__global__ void __launch_bounds__(kThreads) col_partial_kernel(const T* __restrict__ x, double* __restrict__ partial,
                                                                int64_t outer, int64_t reduce, int64_t inner,
                                                                int64_t chunks) {
  using A = acc_t<T>;
  const int64_t tiles = (inner + kThreads - 1) / kThreads;
  for (int64_t task = blockIdx.x; task < outer * chunks * tiles; task += gridDim.x) {
    const int64_t tile = task % tiles, c = (task / tiles) % chunks, o = task / (tiles * chunks);
    const int64_t i = tile * kThreads + threadIdx.x;
    if (i >= inner) continue;
    const int64_t begin = c * kColRows, end = min(reduce, begin + kColRows);
    const T* xc = x + o * reduce * inner + i;
    double s = 0.0;
    for (int64_t r = begin; r < end; r += kUnroll) {
      A part = 0;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k)
        if (r + k < end) part += static_cast<A>(xc[(r + k) * inner]);
      s += static_cast<double>(part);
    }
    partial[(o * chunks + c) * inner + i] = s;
  }
}

// One warp per mean: hi[k] + lo[k] = (sum over c of partial[(o * chunks + c) * inner + i]) / reduce.
template <typename A>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const double* __restrict__ partial, A* __restrict__ hi,
                                                             A* __restrict__ lo, int64_t outer, int64_t reduce,
                                                             int64_t inner, int64_t chunks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarp);
  for (int64_t k = int64_t(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp; k < outer * inner; k += warps) {
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
__global__ void __launch_bounds__(kThreads) subtract_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                             const acc_t<T>* __restrict__ hi,
                                                             const acc_t<T>* __restrict__ lo, index_t n,
                                                             index_t reduce, index_t inner) {
  using A = acc_t<T>;
  const index_t step = index_t(gridDim.x) * kThreads * kUnroll;
  for (index_t base = index_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n; base += step) {
    A v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t e = base + index_t(k) * kThreads;
      v[k] = e < n ? static_cast<A>(x[e]) : A(0);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t e = base + index_t(k) * kThreads;
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
  const unsigned grid = grid_for(n, kThreads * kUnroll);
  if (n <= std::numeric_limits<int32_t>::max() / 2) {
    subtract_kernel<T, kMode, int32_t><<<grid, kThreads, 0, stream>>>(x, y, hi, lo, static_cast<int32_t>(n),
                                                                      static_cast<int32_t>(reduce),
                                                                      static_cast<int32_t>(inner));
  } else {
    subtract_kernel<T, kMode, int64_t><<<grid, kThreads, 0, stream>>>(x, y, hi, lo, n, reduce, inner);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void centered_block(const T* x, T* y, int64_t outer, int64_t reduce, int64_t inner, const at::Tensor& like) {
  using A = acc_t<T>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (inner == 1 && reduce <= kWarp * kItems) {
    rows_onchip_kernel<T, kWarp><<<grid_for(outer, kThreads / kWarp), kThreads, 0, stream>>>(x, y, outer, reduce);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (inner == 1 && reduce <= kThreads * kItems) {
    rows_onchip_kernel<T, kThreads><<<grid_for(outer, 1), kThreads, 0, stream>>>(x, y, outer, reduce);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const int64_t chunks = inner == 1 ? (reduce + kRowChunk - 1) / kRowChunk : (reduce + kColRows - 1) / kColRows;
  const auto opts = like.options();
  at::Tensor partial = at::empty({outer * chunks * inner}, opts.dtype(at::kDouble));
  at::Tensor means = at::empty({2, outer * inner}, opts.dtype(c10::CppTypeToScalarType<A>::value));
  A* hi = means.mutable_data_ptr<A>();
  A* lo = hi + outer * inner;

  if (inner == 1) {
    row_partial_kernel<T><<<grid_for(outer * chunks, 1), kThreads, 0, stream>>>(x, partial.mutable_data_ptr<double>(),
                                                                                outer, reduce, chunks);
  } else {
    const int64_t tiles = (inner + kThreads - 1) / kThreads;
    col_partial_kernel<T><<<grid_for(outer * chunks * tiles, 1), kThreads, 0, stream>>>(
        x, partial.mutable_data_ptr<double>(), outer, reduce, inner, chunks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<A><<<grid_for(outer * inner, kThreads / kWarp), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), hi, lo, outer, reduce, inner, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t n = outer * reduce * inner;
  if (outer == 1 && inner == 1)
    launch_subtract<T, MeanIndex::kOne>(x, y, hi, lo, n, reduce, inner, stream);
  else if (inner == 1)
    launch_subtract<T, MeanIndex::kRow>(x, y, hi, lo, n, reduce, inner, stream);
  else
    launch_subtract<T, MeanIndex::kGeneral>(x, y, hi, lo, n, reduce, inner, stream);
}

at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim) {
  check_floating(x, "centered", "x");
  const std::vector<bool> mask = reduced_dims_mask(x, dim, "centered");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor result = at::empty_strided(x.sizes(), empty_like_strides(x), x.options());
  if (x.numel() == 0) return result;
  ReduceLayout plan = plan_reduce(x, mask, result);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centered_cuda", [&] {
    centered_block(plan.input.const_data_ptr<scalar_t>(), plan.output.mutable_data_ptr<scalar_t>(), plan.outer,
                   plan.reduce, plan.inner, x);
  });
  plan.finish();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) { m.impl("centered", &centered); }

}  // namespace customlayers::cuda
