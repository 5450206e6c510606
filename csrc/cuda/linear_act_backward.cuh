// The element-wise half of linear_act's CUDA backward: the masked gradient g' = g * act'(.) (common/
// activation.h's activation_grad, from the forward's output or its pre-activation; relu's: a NaN output
// passes g, as torch.relu's) and the bias gradient db = column sums of g', reproducibly: one
// kernel writes g' and per-64-row-chunk column sums (one thread per column and chunk, no atomics), a
// second adds the chunks in a fixed order in double. Written against common/cuda_device.cuh only, so the CUDA emulator of the C++ tests runs it too.
#pragma once

#include "common/activation.h"
#include "common/cuda_device.cuh"

#include <algorithm>
#include <cstdint>

namespace customlayers::cuda {

constexpr int kColThreads = 256;
constexpr int64_t kChunkRows = 64;
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ inline int64_t act_grad_chunks(int64_t M) { return (M + kChunkRows - 1) / kChunkRows; }

template <typename T>
struct ActGradArgs {
  const T* g;           // M x N, row stride ldg, unit column stride
  int64_t ldg;
  const T* saved;       // act_saved(act): the forward's output or the pre-activation (null for 'none'),
  int64_t lds;          // row stride lds, unit column stride
  T* gp;                // g' (M x N, contiguous), or nullptr
  acc_t<T>* partial;    // act_grad_chunks(M) x N scratch, with db
  T* db;                // N values, or nullptr
  int64_t M, N;
  Activation act;
};

// For column n and each chunk of kChunkRows rows: v = g * act'(saved) (kMasked; g itself otherwise),
// written to gp when gp is set, and the chunk's sum of v into partial[chunk * N + n] when partial is set.
template <typename T, bool kMasked>
__global__ void __launch_bounds__(kColThreads) mask_and_sum_kernel(const ActGradArgs<T> a) {
  using A = acc_t<T>;
  const int64_t n = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (n >= a.N) return;
  const int64_t chunks = act_grad_chunks(a.M);
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t r0 = chunk * kChunkRows, r1 = r0 + kChunkRows < a.M ? r0 + kChunkRows : a.M;
    A sum = 0;
    for (int64_t r = r0; r < r1; ++r) {
      A v = static_cast<A>(a.g[r * a.ldg + n]);
      if constexpr (kMasked) {
        v = activation_grad(a.act, v, static_cast<A>(a.saved[r * a.lds + n]));
        if (a.gp != nullptr) a.gp[r * a.N + n] = static_cast<T>(v);
      }
      sum += v;
    }
    if (a.partial != nullptr) a.partial[chunk * a.N + n] = sum;
  }
}

// db[n] = sum over chunks of partial[chunk * N + n], in chunk order, in double.
template <typename T>
__global__ void __launch_bounds__(kColThreads) bias_grad_kernel(const ActGradArgs<T> a) {
  const int64_t n = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (n >= a.N) return;
  const int64_t chunks = act_grad_chunks(a.M);
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += static_cast<double>(a.partial[c * a.N + n]);
  a.db[n] = static_cast<T>(s);
}

// gp (when set; with an activation) = g * act'(saved), and db (when set, with partial) = column sums of it.
template <typename T>
void act_grad(const ActGradArgs<T>& a, cudaStream_t stream) {
  if (a.N == 0) return;
  const int64_t chunks = act_grad_chunks(a.M);
  const unsigned col_blocks = static_cast<unsigned>((a.N + kColThreads - 1) / kColThreads);
  const bool masked = a.act != Activation::kNone;
  const bool writes_gp = masked && a.gp != nullptr;
  if (chunks > 0 && (writes_gp || a.db != nullptr)) {
    const dim3 grid(col_blocks, static_cast<unsigned>(std::min(chunks, kMaxGridY)));
    launch_kernel(masked ? mask_and_sum_kernel<T, true> : mask_and_sum_kernel<T, false>, grid, dim3(kColThreads),
                  stream, a);
  }
  if (a.db != nullptr) launch_kernel(bias_grad_kernel<T>, dim3(col_blocks), dim3(kColThreads), stream, a);
}

}  // namespace customlayers::cuda
