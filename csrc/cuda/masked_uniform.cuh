// The CUDA kernel of customlayers::masked_uniform_ (common/masked_uniform.h has the math, shared with the
// CPU kernel, so a seeded fill is bit-identical on both). Grid-stride loop over Philox counters: each
// thread turns one counter into kPerCall consecutive elements (four for float32/float16/bfloat16, two for
// float64), stored as one vector when the output is aligned for it. The (seed, offset) pair comes from a
// Seeds object read on the device (Seeds::get()), so that a generator's state can be unpacked there (CUDA
// graph capture). Written against common/cuda_device.cuh and cuda_utils.cuh only, so the CUDA emulator
// of the C++ tests runs it too.
#pragma once

#include "common/cuda_utils.cuh"
#include "common/masked_uniform.h"

#include <cstdint>

namespace customlayers::cuda {

constexpr int kFillThreads = 256;

struct SeedOffset {
  uint64_t seed, offset;
};

template <typename T, bool kAligned, typename Seeds>
__global__ void __launch_bounds__(kFillThreads) masked_uniform_kernel(T* __restrict__ out, int64_t numel, int64_t groups,
                                                                       masked_uniform::Params<acc_t<T>> p, Seeds seeds) {
  using A = acc_t<T>;
  constexpr int kPer = masked_uniform::kPerCall<A>;
  const SeedOffset so = seeds.get();
  uint32_t k0, k1;
  masked_uniform::key(so.seed, k0, k1);
  const int64_t step = int64_t(gridDim.x) * kFillThreads;
  for (int64_t g = int64_t(blockIdx.x) * kFillThreads + threadIdx.x; g < groups; g += step) {
    uint32_t c0, c1, c2, c3;
    masked_uniform::counter(static_cast<uint64_t>(g), so.offset, c0, c1, c2, c3);
    philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
    A values[kPer];
    masked_uniform::masked_values(c0, c1, c2, c3, p, values);
    const int64_t first = g * kPer;
    if (kAligned && first + kPer <= numel) {
      Vector<T, kPer> pack;
#pragma unroll
      for (int k = 0; k < kPer; ++k) pack.v[k] = static_cast<T>(values[k]);
      *reinterpret_cast<Vector<T, kPer>*>(out + first) = pack;
    } else {
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        if (first + k < numel) out[first + k] = static_cast<T>(values[k]);
    }
  }
}

// Fills out[0, numel) (contiguous) with the masked uniform values of (seeds.get()) and bounds p.
template <typename T, typename Seeds>
void masked_uniform_fill(T* out, int64_t numel, const masked_uniform::Params<acc_t<T>>& p, const Seeds& seeds,
                         cudaStream_t stream) {
  constexpr int kPer = masked_uniform::kPerCall<acc_t<T>>;
  const int64_t groups = (numel + kPer - 1) / kPer;
  const dim3 grid(grid_for(groups, kFillThreads)), block(kFillThreads);
  if (reinterpret_cast<uintptr_t>(out) % alignof(Vector<T, kPer>) == 0)
    launch_kernel(masked_uniform_kernel<T, true, Seeds>, grid, block, stream, out, numel, groups, p, seeds);
  else
    launch_kernel(masked_uniform_kernel<T, false, Seeds>, grid, block, stream, out, numel, groups, p, seeds);
}

}  // namespace customlayers::cuda
