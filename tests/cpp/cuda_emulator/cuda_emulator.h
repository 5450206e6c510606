// A CPU emulator for the part of CUDA that the kernels of csrc/cuda/*.cuh use, so that they, compiled as
// host C++, can be tested without a GPU (see common/cuda_device.cuh).
//
//  * Every thread of a block is a std::thread; the blocks of a grid run one after another, so a
//    __shared__ variable can be a function-local static (aligned as __align__ asks, no more, so that
//    misaligned vector or WMMA accesses fail: WMMA operands are checked, UndefinedBehaviorSanitizer
//    checks the rest in the tests' build), and every block starts from the previous
//    block's shared memory (stale data, as on a GPU). __syncthreads() is a barrier over the block,
//    __syncwarp() one over the thread's warp, so a missing barrier shows up as wrong results here and as
//    a data race under ThreadSanitizer. __shfl_xor_sync() exchanges values through per-warp slots
//    between two warp barriers.
//  * WMMA fragments hold whole 16 x 16 tiles: every lane loads and multiplies the whole tile itself, in
//    float (exact products of 16-bit values, float sums, as on tensor cores up to summation order);
//    store_matrix_sync splits the stores between the warp's lanes, so reading them back needs a
//    __syncwarp(), as it does on a GPU.
//  * Kernel launches run to completion before launch_kernel() returns; sm_count() is settable, so tests
//    pick which tile sizes the host side chooses.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
using std::fma;
using std::isfinite;
using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace customlayers::cuda_emulator {

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local uint64_t* warp_slots = nullptr;  // 32 values, one per lane: shuffles pass through them

struct Launch {
  dim3 grid, block;
};
// What launch_kernel() ran, for tests that check which kernels the host side chose (tests clear it).
inline std::vector<Launch> launches;
inline int emulated_sm_count = 132;

inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Runs body() as every thread of every block of the grid.
template <typename Body>
void run(dim3 grid, dim3 block, const Body& body) {
  const unsigned n = block.x * block.y * block.z;
  blockDim = block;
  gridDim = grid;
  launches.push_back({grid, block});
  std::barrier<> block_sync(n);
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  for (unsigned w = 0; w * 32 < n; ++w) warp_sync.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
  std::vector<uint64_t> slots((n + 31) / 32 * 32);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      block_barrier = &block_sync;
      warp_barrier = warp_sync[t / 32].get();
      warp_slots = slots.data() + t / 32 * 32;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            body();
            block_sync.arrive_and_wait();  // the block is done before the next one reuses shared memory
          }
    });
  }
  for (auto& thread : threads) thread.join();
}

}  // namespace customlayers::cuda_emulator

inline void __syncthreads() { customlayers::cuda_emulator::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { customlayers::cuda_emulator::warp_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }

// Every lane of the warp must call it (mask: all 32 lanes), as the kernels here do.
template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(uint64_t) && std::is_trivially_copyable_v<V>, "a register-sized value");
  namespace emu = customlayers::cuda_emulator;
  const unsigned lane = emu::linear_thread() % 32;
  std::memcpy(&emu::warp_slots[lane], &v, sizeof(V));
  emu::warp_barrier->arrive_and_wait();
  V result;
  std::memcpy(&result, &emu::warp_slots[lane ^ static_cast<unsigned>(lane_mask)], sizeof(V));
  emu::warp_barrier->arrive_and_wait();  // the slots are rewritten by the next shuffle
  return result;
}

namespace customlayers::cuda {

inline int sm_count() { return cuda_emulator::emulated_sm_count; }

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, const Args&... args) {
  cuda_emulator::run(grid, block, [&] { kernel(args...); });
}

}  // namespace customlayers::cuda

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// A whole tile in float: element (r, c) at x[r * kCols + c].
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[kRows * kCols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  std::fill(std::begin(f.x), std::end(f.x), v);
}

// WMMA's requirements on memory operands: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
inline void check_operand(const void* p, unsigned ldm, unsigned element_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * element_bytes) % 16 != 0) {
    std::fprintf(stderr, "%s: pointer %p or ldm %u breaks WMMA's alignment rules\n", what, p, ldm);
    std::abort();
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>, "a or b fragment");
  check_operand(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = static_cast<float>(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  for (unsigned i = customlayers::cuda_emulator::linear_thread() % 32; i < unsigned(M * N); i += 32) {
    const unsigned r = i / N, c = i % N;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[i];
  }
}

// Only registers (the thread's own fragments): left out of ThreadSanitizer's instrumentation, which would
// make it the slowest part of the emulated tensor-core kernels.
template <int M, int N, int K, typename T, typename LA, typename LB>
__attribute__((no_sanitize("thread"))) void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::copy(std::begin(out), std::end(out), d.x);
}

}  // namespace nvcuda::wmma
