// CUDA kernel of customlayers::masked_uniform_: fill a tensor in place with uniform values in [low, high),
// those of magnitude under `threshold` set to zero, in one pass (common/masked_uniform.h has the math,
// shared with the CPU kernel, so a seeded fill is bit-identical on both).
//
// The kernel is in cuda/masked_uniform.cuh. Unseeded calls take (seed, offset) from the device's default
// generator through PhiloxCudaState, unpacked on the device, so they work under CUDA graph capture too.
// Tensors that are not contiguous are filled through a contiguous buffer.
#include "common/checks.h"
#include "cuda/masked_uniform.cuh"

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

constexpr uint64_t kOffsetIncrement = 4;  // generator offset consumed per call (a multiple of 4, as torch requires)

// The generator's (seed, offset), read on the device.
struct GeneratorSeeds {
  at::PhiloxCudaState state;
  __device__ SeedOffset get() const {
    const auto [seed, offset] = at::cuda::philox::unpack(state);
    return {seed, offset};
  }
};

void masked_uniform_(at::Tensor& self, double low, double high, double threshold, std::optional<int64_t> seed,
                     int64_t offset) {
  const Bounds bounds = check_args(self, low, high, threshold, offset);
  check_writable(self, kOp, "tensor");
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
    masked_uniform_fill(out.mutable_data_ptr<scalar_t>(), out.numel(), Params<acc_t<scalar_t>>(bounds),
                        GeneratorSeeds{philox_args}, stream);
  });
  if (!out.is_same(self)) self.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) { m.impl("masked_uniform_", &masked_uniform_); }

}  // namespace customlayers::cuda
