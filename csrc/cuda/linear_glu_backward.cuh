// The element-wise half of linear_glu's CUDA backward: one pass over grad, gate and up makes the gated
// gradients dgate = g * up * act'(gate) and dup = g * act(gate) (common/activation.h; act' from act(gate)
// for relu, tanh and sigmoid, as act_saved says) side by side in one M x 2N buffer, and the per-64-row-
// chunk column sums of both for the bias gradients (one thread per column and chunk, no atomics), which
// linear_act_backward.cuh's bias_grad_kernel adds in a fixed order in double. Written against
// common/cuda_device.cuh only, so the CUDA emulator of the C++ tests runs it too.
#pragma once

#include "common/activation.h"
#include "common/cuda_device.cuh"
#include "cuda/linear_act_backward.cuh"

#include <algorithm>
#include <cstdint>

namespace customlayers::cuda {

template <typename T>
struct GluGradArgs {
  const T* g;              // M x N each, unit column stride, row strides ldg, ld_gate, ld_up
  const T* gate;
  const T* up;
  int64_t ldg, ld_gate, ld_up;
  T* d;                    // M x 2N contiguous: dgate in columns [0, N), dup in [N, 2N); or nullptr
  acc_t<T>* partial;       // 2 x act_grad_chunks(M) x N chunk sums (dgate's, then dup's); or nullptr
  int64_t M, N;
  Activation act;
};

template <typename T>
__global__ void __launch_bounds__(kColThreads) glu_grad_kernel(const GluGradArgs<T> a) {
  using A = acc_t<T>;
  const int64_t n = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (n >= a.N) return;
  const bool from_output = act_saved(a.act) == ActSaved::kOutput;
  const int64_t chunks = act_grad_chunks(a.M);
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t r0 = chunk * kChunkRows, r1 = r0 + kChunkRows < a.M ? r0 + kChunkRows : a.M;
    A sum_gate = 0, sum_up = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const A g = static_cast<A>(a.g[r * a.ldg + n]);
      const A z = static_cast<A>(a.gate[r * a.ld_gate + n]);
      const A u = static_cast<A>(a.up[r * a.ld_up + n]);
      const A y = activate(a.act, z);
      const A dgate = activation_grad(a.act, g * u, from_output ? y : z), dup = g * y;
      if (a.d != nullptr) {
        a.d[r * 2 * a.N + n] = static_cast<T>(dgate);
        a.d[r * 2 * a.N + a.N + n] = static_cast<T>(dup);
      }
      sum_gate += dgate;
      sum_up += dup;
    }
    if (a.partial != nullptr) {
      a.partial[chunk * a.N + n] = sum_gate;
      a.partial[(chunks + chunk) * a.N + n] = sum_up;
    }
  }
}

// d (when set) = [dgate | dup], and db_gate, db_up (each when set, with partial) = their column sums.
template <typename T>
void glu_grad(const GluGradArgs<T>& a, T* db_gate, T* db_up, cudaStream_t stream) {
  if (a.N == 0) return;
  const int64_t chunks = act_grad_chunks(a.M);
  const unsigned col_blocks = static_cast<unsigned>((a.N + kColThreads - 1) / kColThreads);
  if (chunks > 0 && (a.d != nullptr || a.partial != nullptr))
    launch_kernel(glu_grad_kernel<T>, dim3(col_blocks, static_cast<unsigned>(std::min(chunks, kMaxGridY))),
                  dim3(kColThreads), stream, a);
  const auto sum = [&](acc_t<T>* partial, T* db) {
    ActGradArgs<T> sums{};
    sums.partial = partial;
    sums.db = db;
    sums.M = a.M;
    sums.N = a.N;
    launch_kernel(bias_grad_kernel<T>, dim3(col_blocks), dim3(kColThreads), stream, sums);
  };
  if (db_gate != nullptr) sum(a.partial, db_gate);
  if (db_up != nullptr) sum(a.partial + chunks * a.N, db_up);
}

}  // namespace customlayers::cuda
