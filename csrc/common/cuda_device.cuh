// The part of CUDA the kernels of csrc/cuda/*.cuh are written against (with the builtins: threadIdx,
// __syncthreads, warp shuffles...): half/bfloat16 types and WMMA for tensor cores, the accumulation type,
// kernel launches and the SM count. Compiled with
// CUSTOMLAYERS_CUDA_EMULATOR defined and tests/cpp/cuda_emulator on the include path, the same kernels
// build as host C++ against cuda_emulator.h and run on CPU threads: that is how the C++ tests check their
// indexing, edges, layouts and barriers without a GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef CUSTOMLAYERS_CUDA_EMULATOR
#include "cuda_emulator.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace customlayers::cuda {

// Arithmetic type for elementwise work: double for double, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kWarp = 32;

#ifndef CUSTOMLAYERS_CUDA_EMULATOR
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// kernel<<<grid, block, 0, stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace customlayers::cuda
