// CUDA building blocks shared by the CUDA kernels (with common/cuda_device.cuh): deterministic warp and block
// reductions (fixed shuffle trees, no atomics: the same input gives bit-identical results), and
// launch-size helpers.
#pragma once

#include "common/cuda_device.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace customlayers::cuda {

// N consecutive values of T, aligned to their whole size so that they load and store as one vector
// instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
  static constexpr int kSize = N;
  T v[N];
};

template <typename A>
__device__ __forceinline__ A warp_reduce_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the first `n` threads of the block, which must be a multiple of 32 (n <= 1024); every
// participating thread gets the result. `shared` holds at least n / 32 values. Contains barriers:
// all n threads must call it.
template <typename A>
__device__ __forceinline__ A group_reduce_sum(A v, A* shared, int n) {
  v = warp_reduce_sum(v);
  const int warps = n / kWarp;
  if (warps == 1) return v;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A total = lane < warps ? shared[lane] : A(0);
  return warp_reduce_sum(total);
}

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough to fill the GPU
// (`waves` blocks per SM) without launching more than the work needs.
inline unsigned grid_for(int64_t work, int64_t per_block, int waves = 8) {
  const int64_t needed = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sm_count()) * waves)));
}

}  // namespace customlayers::cuda
