// CUDA kernel of customlayers::masked_uniform_: fill a tensor in place with uniform values in [low, high),
// those of magnitude under `threshold` set to zero, in one pass (common/masked_uniform.h has the math,
// shared with the CPU kernel, so a seeded fill is bit-identical on both).
//
// Grid-stride loop over Philox counters: each thread turns one counter into kPerCall consecutive
// elements (four for float32/float16/bfloat16, two for float64), stored as one vector when the tensor
// is aligned for it. Unseeded calls take (seed, offset) from the device's default generator through
// PhiloxCudaState, so they work under CUDA graph capture too. Tensors that are not contiguous are filled
// through a contiguous buffer.
#include "common/cuda_utils.cuh"
#include "common/masked_uniform.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>

namespace customlayers::cuda {
namespace {

using namespace masked_uniform;

constexpr int kThreads = 256;
constexpr uint64_t kOffsetIncrement = 4;  // generator offset consumed per call (a multiple of 4, as torch requires)

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) masked_uniform_kernel(T* __restrict__ out, int64_t numel, int64_t groups,
                                                                   Params<acc_t<T>> p, at::PhiloxCudaState philox_args) {
  using A = acc_t<T>;
  constexpr int kPer = kPerCall<A>;
  const auto [seed, offset] = at::cuda::philox::unpack(philox_args);
  uint32_t k0, k1;
  key(seed, k0, k1);
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g < groups; g += step) {
    uint32_t c0, c1, c2, c3;
    counter(static_cast<uint64_t>(g), offset, c0, c1, c2, c3);
    philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
    A values[kPer];
    masked_values(c0, c1, c2, c3, p, values);
    const int64_t first = g * kPer;
    if (kAligned && first + kPer <= numel) {
      Pack<T, kPer> pack;
#pragma unroll
      for (int k = 0; k < kPer; ++k) pack.v[k] = static_cast<T>(values[k]);
      *reinterpret_cast<Pack<T, kPer>*>(out + first) = pack;
    } else {
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        if (first + k < numel) out[first + k] = static_cast<T>(values[k]);
    }
  }
}

void masked_uniform_(at::Tensor& self, double low, double high, double threshold, std::optional<int64_t> seed,
                     int64_t offset) {
  const Bounds bounds = check_args(self, low, high, threshold, offset);
  if (self.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(self.device());
  at::PhiloxCudaState philox_args(static_cast<uint64_t>(seed.value_or(0)), static_cast<uint64_t>(offset));
  if (!seed.has_value()) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(self.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox_args = gen->philox_cuda_state(kOffsetIncrement);
  }
  at::Tensor out = self.is_contiguous() ? self : at::empty(self.sizes(), self.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "masked_uniform_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int kPer = kPerCall<A>;
    scalar_t* data = out.mutable_data_ptr<scalar_t>();
    const int64_t numel = out.numel(), groups = (numel + kPer - 1) / kPer;
    const unsigned grid = grid_for(groups, kThreads);
    const Params<A> params(bounds);
    if (reinterpret_cast<uintptr_t>(data) % alignof(Pack<scalar_t, kPer>) == 0) {
      masked_uniform_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(data, numel, groups, params, philox_args);
    } else {
      masked_uniform_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(data, numel, groups, params, philox_args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!out.is_same(self)) self.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) { m.impl("masked_uniform_", &masked_uniform_); }

}  // namespace customlayers::cuda
