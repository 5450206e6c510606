// The CUDA kernels of centered (csrc/cuda/centered.cuh) run on the CPU emulator and compared with a
// float64 x - mean: both on-chip row paths (a warp per row, a block per row) and the partial-sums path
// for rows (one and several chunks) and columns (several chunks, several 256-column tiles), with every
// subtract indexing (one mean, a mean per row, general), and a GPU of 1 SM so that every grid-stride
// loop takes several steps. Values near the dtype's maximum check that sums never overflow where the mean
// is finite.
#include "cuda/centered.cuh"
#include "emulated_testing.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

namespace cl = customlayers::cuda;
namespace emu = customlayers::cuda_emulator;

// x ~ N(3, 2) (a mean far from 0), or with near_max uniform in [max / 2, max] of T.
template <typename T>
void check(int64_t outer, int64_t reduce, int64_t inner, std::mt19937& rng, bool near_max = false) {
  SCOPED_TRACE("[" + std::to_string(outer) + ", " + std::to_string(reduce) + ", " + std::to_string(inner) + "]");
  const int64_t n = outer * reduce * inner;
  std::normal_distribution<float> normal(3.0f, 2.0f);
  std::uniform_real_distribution<double> upper(0.5, 1.0);
  const double largest = static_cast<double>(std::numeric_limits<T>::max());
  std::vector<T> x(n), y(n + 1, T(7.0f));
  for (auto& v : x) v = near_max ? T(upper(rng) * largest) : T(normal(rng));
  std::vector<unsigned char> workspace(cl::centered_workspace_bytes<T>(outer, reduce, inner) + 8);
  cl::centered_block(x.data(), y.data(), outer, reduce, inner, workspace.data(), nullptr);
  ASSERT_EQ(static_cast<float>(y[n]), 7.0f) << "wrote past the output";
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      double sum = 0;
      for (int64_t r = 0; r < reduce; ++r) sum += static_cast<double>(x[(o * reduce + r) * inner + i]);
      const double mean = sum / static_cast<double>(reduce);
      for (int64_t r = 0; r < reduce; ++r) {
        const int64_t e = (o * reduce + r) * inner + i;
        const double xe = static_cast<double>(x[e]), expected = xe - mean;
        // One rounding of the result, plus float arithmetic on |x| + |mean| for 16-bit types.
        const double allowed = 2 * customlayers::testing::unit_roundoff<T>() * std::abs(expected) +
                               (sizeof(T) < 4 ? std::ldexp(1.0, -23) * (std::abs(xe) + std::abs(mean)) : 0.0) + 1e-300;
        ASSERT_TRUE(std::isfinite(static_cast<double>(y[e]))) << "y at " << e;
        ASSERT_LE(std::abs(static_cast<double>(y[e]) - expected), allowed) << "y at " << e;
      }
    }
}

template <typename T>
void run_all(int sm_count, bool near_max = false) {
  std::mt19937 rng(7);
  const customlayers::testing::ScopedSmCount sms(sm_count);
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  // The ThreadSanitizer build: one case per kernel, with more rows (or tasks) than 8 blocks on 1 SM, so
  // that a block reduces again through the same shared memory.
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> blocks{{70, 100, 1}, {20, 1000, 1}, {5, 9000, 1}, {2, 130, 5}};
#else
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> blocks{
      {1, 1, 1},     {3, 7, 1},      {70, 300, 1},  {1, 512, 1},   {5, 1000, 1}, {1, 4096, 1},  {1, 4097, 1},
      {1, 20000, 1}, {3, 9000, 1},   {4, 130, 5},   {2, 70, 300},  {1, 5, 3},    {3, 1, 4}};
#endif
  for (const auto& [outer, reduce, inner] : blocks) {
    check<T>(outer, reduce, inner, rng, near_max);
    if (::testing::Test::HasFatalFailure()) break;
  }
}

// Columns of few rows (x of shape (2, 2^27) centered over dim 0) need no memory beyond the output; few long
// columns take the partial sums, whose memory is a few percent of the input's.
TEST(EmulatedCudaCentered, ShortColumnsNeedNoWorkspace) {
  const customlayers::testing::ScopedSmCount sms(132);
  EXPECT_EQ(cl::centered_workspace_bytes<float>(1, 2, int64_t(1) << 27), 0u);
  EXPECT_EQ(cl::centered_workspace_bytes<float>(1, 64, 1 << 20), 0u);
  EXPECT_GT(cl::centered_workspace_bytes<float>(1, 1000, 512), 0u);
}

TEST(EmulatedCudaCentered, Float32) { run_all<float>(132); }
TEST(EmulatedCudaCentered, Float32OneSM) { run_all<float>(1); }
TEST(EmulatedCudaCentered, Float64) { run_all<double>(1); }
TEST(EmulatedCudaCentered, Float16) { run_all<c10::Half>(1); }
TEST(EmulatedCudaCentered, BFloat16) { run_all<c10::BFloat16>(132); }
TEST(EmulatedCudaCentered, Float32NearMax) { run_all<float>(1, true); }
TEST(EmulatedCudaCentered, BFloat16NearMax) { run_all<c10::BFloat16>(1, true); }

}  // namespace
