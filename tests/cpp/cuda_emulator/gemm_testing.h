// What the emulated tests of the CUDA GEMM (linear_act's, and linear_glu's gated one) share: strided
// matrices inside padded buffers, the GEMM's host side run with a NaN-filled split-K workspace, and what it
// chose (tiles, split K).
#pragma once

#include "cuda/linear_act_gemm.cuh"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace customlayers::testing {

// A rows x cols matrix inside a larger buffer: row- or column-major with a padded leading dimension,
// optionally starting one element past an aligned address (no vector loads then).
template <typename T>
struct Strided {
  std::vector<T> buffer;
  T* p = nullptr;
  int64_t rows = 0, cols = 0, s0 = 0, s1 = 0;

  Strided(int64_t r, int64_t c, bool row_major, bool misalign, T fill) : rows(r), cols(c) {
    const int64_t ld = (row_major ? c : r) + 8;  // padding a multiple of every vector width
    s0 = row_major ? ld : 1;
    s1 = row_major ? 1 : ld;
    const int64_t offset = (misalign ? 1 : 0) + 64;  // 64 elements: a 16-byte aligned start in any dtype
    buffer.assign(offset + (row_major ? r : c) * ld + 64, fill);
    // std::vector's storage is at least 16-byte aligned (operator new).
    p = buffer.data() + offset;
  }
  T& at(int64_t i, int64_t j) { return p[i * s0 + j * s1]; }

  // Buffer elements outside the matrix that no longer hold `fill`: writes outside it.
  int64_t changed_outside(T fill) {
    int64_t touched = 0, inside = 0;
    const float unchanged = static_cast<float>(fill);
    for (const T& v : buffer) touched += static_cast<float>(v) != unchanged;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) inside += static_cast<float>(at(i, j)) != unchanged;
    return touched - inside;
  }
};

// The GEMM (gemm<kGated>) through its host side, with a NaN-filled split-K workspace.
template <typename T, bool kGated = false>
void run_gemm(const cuda::GemmArgs<T>& args) {
  std::vector<double> workspace;  // 8-byte aligned
  cuda::gemm<kGated>(args, nullptr, [&](size_t bytes) {
    workspace.assign((bytes + sizeof(double) - 1) / sizeof(double), std::numeric_limits<double>::quiet_NaN());
    return static_cast<void*>(workspace.data());
  });
}

// What the host side chose for the last GEMM, of an (M, cols) output (a gated GEMM's cols = 2N): large tiles
// (BM = BN = 128), split K.
struct Chosen {
  bool large = false, split = false;
};

inline Chosen chosen(int64_t M, int64_t cols) {
  const auto& log = cuda_emulator::launches;
  Chosen c;
  if (log.empty()) return c;
  const dim3 grid = log.front().grid;  // the GEMM kernel; with split K, the reduction follows
  c.large = (M > 64 || cols > 64) && grid.x == unsigned((M + 127) / 128) && grid.y == unsigned((cols + 127) / 128);
  c.split = grid.z > 1;
  EXPECT_EQ(log.size(), c.split ? 2u : 1u) << "a split GEMM is one GEMM and one reduction";
  return c;
}

}  // namespace customlayers::testing
