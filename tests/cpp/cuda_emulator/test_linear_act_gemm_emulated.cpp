// The CUDA GEMM kernels of csrc/cuda/linear_act_gemm.cuh (both tile sizes, CUDA cores and tensor cores, split K,
// every operand layout the host side can pick, aligned and unaligned operands, edges, K = 0, bias and
// every activation), run on the CPU emulator (cuda_emulator.h) and compared with a float64 GEMM of the same values. C is
// surrounded by sentinels to catch writes outside it, and the operands' padding holds NaN, which any
// read of it would carry into the result.
#include "emulated_testing.h"
#include "gemm_testing.h"

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
namespace ct = customlayers::testing;

using customlayers::testing::run_gemm;
using customlayers::testing::Strided;

// c(m, n) equals act(sum over k of a(m, k) b(k, n) + bias[n]) of float64 within one rounding to T plus A's
// rounding over the K terms (and, with split K, the slice sums, at most kMaxSlices of them).
template <typename T, typename GetA, typename GetB, typename GetC>
void expect_gemm_result(GetA a, GetB b, GetC c, const T* bias, customlayers::Activation act, int64_t M, int64_t N,
                        int64_t K) {
  const double eps = customlayers::testing::unit_roundoff<T>(), acc_eps = std::numeric_limits<cl::acc_t<T>>::epsilon();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double ref = bias != nullptr ? static_cast<double>(bias[j]) : 0.0, mag = std::abs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(a(i, k)) * static_cast<double>(b(k, j));
        ref += p;
        mag += std::abs(p);
      }
      // The activation's slope is at most 1.13 (gelu), and it is evaluated in A within a few of A's ulps.
      ref = customlayers::testing::reference_act(act, ref);
      const double got = static_cast<double>(c(i, j));
      ASSERT_LE(std::abs(got - ref), (eps + 4 * acc_eps) * std::abs(ref) + 1.2 * acc_eps * (K + 2 + cl::kMaxSlices) * mag + 1e-30)
          << "C(" << i << ", " << j << ") = " << got << ", expected " << ref;
    }
}

struct Case {
  int64_t M, N, K;
  bool a_row_major, b_row_major, misalign, c_row_major, bias;
  customlayers::Activation act;
};

std::string describe(const Case& c) {
  return std::to_string(c.M) + "x" + std::to_string(c.K) + "->" + std::to_string(c.N) + " A " +
         (c.a_row_major ? "row" : "col") + " B " + (c.b_row_major ? "row" : "col") + (c.misalign ? " misaligned" : "") +
         " C " + (c.c_row_major ? "row" : "col") + (c.bias ? " bias" : "") + " " +
         customlayers::testing::act_label(c.act);
}

template <typename T>
void check_gemm(const Case& c, std::mt19937& rng) {
  SCOPED_TRACE(describe(c));
  const T nan = T(std::numeric_limits<float>::quiet_NaN());
  std::normal_distribution<float> normal;
  Strided<T> a(c.M, c.K, c.a_row_major, c.misalign, nan), b(c.K, c.N, c.b_row_major, c.misalign, nan);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t k = 0; k < c.K; ++k) a.at(i, k) = T(normal(rng));
  for (int64_t k = 0; k < c.K; ++k)
    for (int64_t j = 0; j < c.N; ++j) b.at(k, j) = T(normal(rng));
  std::vector<T> bias(c.N);
  for (auto& v : bias) v = T(normal(rng));
  const T sentinel = T(12345.0f);
  Strided<T> out(c.M, c.N, c.c_row_major, false, sentinel);

  run_gemm<T>({.a = {a.p, a.s1, a.s0},
               .b = {b.p, b.s0, b.s1},
               .c = out.p,
               .scm = out.s0,
               .scn = out.s1,
               .bias = c.bias ? bias.data() : nullptr,
               .M = c.M,
               .N = c.N,
               .K = c.K,
               .act = c.act});
  expect_gemm_result([&](int64_t i, int64_t k) { return a.at(i, k); }, [&](int64_t k, int64_t j) { return b.at(k, j); },
                     [&](int64_t i, int64_t j) { return out.at(i, j); }, c.bias ? bias.data() : nullptr, c.act, c.M,
                     c.N, c.K);
  if (::testing::Test::HasFatalFailure()) return;
  // Nothing written outside C: the padding and the margins still hold the sentinel.
  EXPECT_EQ(out.changed_outside(sentinel), 0) << "values written outside C";
}

// (M, N, K): 1-row and 1-column outputs, the book's 20 -> 256, tile edges in every dimension, K not a
// multiple of the K tile, K = 0, and shapes that take several large tiles.
// The ThreadSanitizer build (about 10x slower) takes two of them, aligned operands only.
const std::vector<std::tuple<int64_t, int64_t, int64_t>>& shapes() {
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  static const std::vector<std::tuple<int64_t, int64_t, int64_t>> s{{7, 13, 5}, {130, 70, 41}};
#else
  static const std::vector<std::tuple<int64_t, int64_t, int64_t>> s{
      {1, 1, 1}, {1, 256, 20}, {7, 13, 5}, {3, 5, 0}, {65, 129, 33}, {130, 70, 41}, {257, 136, 24}};
#endif
  return s;
}


template <typename T>
ct::Chosen run_cases(const std::vector<std::tuple<int64_t, int64_t, int64_t>>& shapes, int sm_count) {
  std::mt19937 rng(1234);
  const customlayers::testing::ScopedSmCount sms(sm_count);
  ct::Chosen any;
  int variant = 0;
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<bool> alignments{false};  // barriers and races do not depend on it
#else
  const std::vector<bool> alignments{false, true};
#endif
  for (const auto& [M, N, K] : shapes)
    for (int layouts = 0; layouts < 4; ++layouts)
      for (bool misalign : alignments) {
        ++variant;
        const Case c{M, N, K, (layouts & 2) != 0, (layouts & 1) != 0, misalign, variant % 3 != 0, variant % 4 != 1,
                     customlayers::testing::kActivations[variant % 7]};
        emu::launches.clear();
        check_gemm<T>(c, rng);
        if (::testing::Test::HasFatalFailure()) return any;
        const ct::Chosen now = ct::chosen(M, N);
        any.large |= now.large;
        any.split |= now.split;
      }
  return any;
}

template <typename T>
void run_all(int sm_count, bool expect_large_somewhere) {
  const ct::Chosen any = run_cases<T>(shapes(), sm_count);
  EXPECT_EQ(any.large, expect_large_somewhere) << "the tile size chosen for the SM count";
}

// Long K with few output tiles: split K (an SM count of 64 against 2-6 small tiles), including a last slice
// shorter than the others and K not a multiple of the K tile.
template <typename T>
void run_split() {
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> split_shapes{{65, 70, 600}};
#else
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> split_shapes{{65, 70, 1100}, {1, 256, 700}, {130, 33, 555}};
#endif
  EXPECT_TRUE(run_cases<T>(split_shapes, 64).split) << "split K was not chosen";
}

// Random operand strides, as strided tensor views give them: row- or column-major with padding that is
// not a multiple of the vector width, broadcast (stride 0) in either dimension, other (overlapping)
// strides; start offsets of 0-8 elements; random shapes (K up to 1100) and SM counts.
template <typename T>
void fuzz_strides(int cases, unsigned seed) {
  std::mt19937 rng(seed);
  const customlayers::testing::ScopedSmCount sms(emu::emulated_sm_count);  // each case sets its own
  std::normal_distribution<float> normal;
  auto pick = [&](std::initializer_list<int64_t> values) { return *(values.begin() + rng() % values.size()); };
  for (int it = 0; it < cases; ++it) {
    const int64_t M = pick({1, 2, 5, 17, 64, 70, 130}), N = pick({1, 3, 8, 33, 64, 100});
    const int64_t K = pick({0, 1, 2, 7, 32, 40, 513, 777, 1100});
    auto strides = [&](int64_t X, int64_t& sk, int64_t& sx) {
      const int64_t pad = pick({0, 1, 2, 3, 4, 8});
      switch (rng() % 5) {
        case 0: sk = 1, sx = K + pad; break;   // X x K row-major
        case 1: sx = 1, sk = X + pad; break;   // K-major
        case 2: sk = 0, sx = 1; break;         // broadcast along K
        case 3: sk = 1, sx = 0; break;         // broadcast along X
        default: sk = pick({1, 2, 3, 8, 12}), sx = pick({1, 5, 8, 16});
      }
    };
    int64_t ask, asx, bsk, bsx;
    strides(M, ask, asx);
    strides(N, bsk, bsx);
    const int64_t aoff = pick({0, 0, 1, 2, 4, 8}), boff = pick({0, 0, 1, 3, 8});
    emu::emulated_sm_count = static_cast<int>(pick({1, 4, 64, 132}));
    SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(K) + "->" + std::to_string(N) + " A strides (" +
                 std::to_string(ask) + ", " + std::to_string(asx) + ") +" + std::to_string(aoff) + " B strides (" +
                 std::to_string(bsk) + ", " + std::to_string(bsx) + ") +" + std::to_string(boff) + " SMs " +
                 std::to_string(emu::emulated_sm_count));
    auto extent = [](int64_t K, int64_t X, int64_t sk, int64_t sx) {
      return (K ? (K - 1) * sk : 0) + (X ? (X - 1) * sx : 0) + 1;
    };
    std::vector<T> a(aoff + extent(K, M, ask, asx)), b(boff + extent(K, N, bsk, bsx)), c(M * N, T(0.0f));
    for (auto& v : a) v = T(normal(rng));
    for (auto& v : b) v = T(normal(rng));
    const T* ap = a.data() + aoff;
    const T* bp = b.data() + boff;
    run_gemm<T>({.a = {ap, ask, asx}, .b = {bp, bsk, bsx}, .c = c.data(), .scm = N, .scn = 1, .bias = nullptr, .M = M,
                 .N = N, .K = K});
    expect_gemm_result([&](int64_t m, int64_t k) { return ap[k * ask + m * asx]; },
                       [&](int64_t k, int64_t n) { return bp[k * bsk + n * bsx]; },
                       [&](int64_t m, int64_t n) { return c[m * N + n]; }, static_cast<const T*>(nullptr), customlayers::Activation::kNone, M, N,
                       K);
    if (::testing::Test::HasFatalFailure()) break;
  }
}

#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
constexpr int kFuzzCases = 4;
#else
constexpr int kFuzzCases = 40;
#endif

TEST(EmulatedCudaGemm, Float32Strides) { fuzz_strides<float>(kFuzzCases, 1); }
TEST(EmulatedCudaGemm, Float64Strides) { fuzz_strides<double>(kFuzzCases / 2, 2); }
TEST(EmulatedCudaGemm, Float16Strides) { fuzz_strides<c10::Half>(kFuzzCases, 3); }
TEST(EmulatedCudaGemm, BFloat16Strides) { fuzz_strides<c10::BFloat16>(kFuzzCases / 2, 4); }

// float64 always takes the small tiles; float32 / float16 / bfloat16 take the large ones when they alone
// fill the (emulated) GPU: an SM count of 1 makes every shape take them, a huge one none.
TEST(EmulatedCudaGemm, Float64) { run_all<double>(1, false); }
TEST(EmulatedCudaGemm, Float32LargeTiles) { run_all<float>(1, true); }
TEST(EmulatedCudaGemm, Float32SmallTiles) { run_all<float>(1 << 30, false); }
TEST(EmulatedCudaGemm, Float16LargeTiles) { run_all<c10::Half>(1, true); }
TEST(EmulatedCudaGemm, Float16SmallTiles) { run_all<c10::Half>(1 << 30, false); }
TEST(EmulatedCudaGemm, BFloat16LargeTiles) { run_all<c10::BFloat16>(1, true); }
TEST(EmulatedCudaGemm, BFloat16SmallTiles) { run_all<c10::BFloat16>(1 << 30, false); }
TEST(EmulatedCudaGemm, Float64SplitK) { run_split<double>(); }
TEST(EmulatedCudaGemm, Float32SplitK) { run_split<float>(); }
TEST(EmulatedCudaGemm, Float16SplitK) { run_split<c10::Half>(); }
TEST(EmulatedCudaGemm, BFloat16SplitK) { run_split<c10::BFloat16>(); }

}  // namespace
