// The CUDA kernels of linear_glu, run on the CPU emulator (cuda_emulator.h) and compared with float64:
//  * the gated GEMM of csrc/cuda/linear_act_gemm.cuh (gemm<true>): out = act(A Bg + bg) * (A Bu + bu) and
//    the pre-activations, for both tile sizes on CUDA cores and tensor cores, split K, every operand layout,
//    aligned and unaligned operands, output columns that end inside a gate/up segment, K = 0, each bias
//    alone and every activation; outputs are surrounded by sentinels and the operands' padding holds NaN;
//  * the gated gradients of csrc/cuda/linear_glu_backward.cuh: [dgate | dup] and both bias gradients, row
//    counts around the 64-row chunks, columns around the 256-thread blocks, strided inputs, each output
//    asked for alone.
#include "cuda/linear_glu_backward.cuh"
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
namespace ct = customlayers::testing;
namespace emu = customlayers::cuda_emulator;
using customlayers::Activation;

struct GatedCase {
  int64_t M, N, K;
  bool a_row_major, b_row_major, misalign, c_row_major, bias_gate, bias_up, save;
  Activation act;
};

std::string describe(const GatedCase& c) {
  return std::to_string(c.M) + "x" + std::to_string(c.K) + "->" + std::to_string(c.N) + " A " +
         (c.a_row_major ? "row" : "col") + " B " + (c.b_row_major ? "row" : "col") + (c.misalign ? " misaligned" : "") +
         " C " + (c.c_row_major ? "row" : "col") + (c.bias_gate ? " bias_gate" : "") + (c.bias_up ? " bias_up" : "") +
         (c.save ? " saving gate and up" : "") + " " + ct::act_label(c.act);
}

// A product's float64 value and the bound on its error in the accumulation type: the K terms' rounding
// (and, with split K, the slice sums', at most kMaxSlices of them), bias included.
struct Sum {
  double value, error;
};

template <typename T, typename GetA, typename GetB>
Sum reference_sum(GetA a, GetB b, const std::vector<T>* bias, int64_t m, int64_t n, int64_t K) {
  const double acc_eps = std::numeric_limits<cl::acc_t<T>>::epsilon();
  double v = bias != nullptr ? static_cast<double>((*bias)[n]) : 0.0, mag = std::abs(v);
  for (int64_t k = 0; k < K; ++k) {
    const double p = static_cast<double>(a(m, k)) * static_cast<double>(b(k, n));
    v += p;
    mag += std::abs(p);
  }
  return {v, 1.2 * acc_eps * (K + 2 + cl::kMaxSlices) * mag + 1e-30};
}

template <typename T>
void check_gated(const GatedCase& c, std::mt19937& rng) {
  SCOPED_TRACE(describe(c));
  const T nan = T(std::numeric_limits<float>::quiet_NaN());
  std::normal_distribution<float> normal;
  ct::Strided<T> a(c.M, c.K, c.a_row_major, c.misalign, nan);
  ct::Strided<T> bg(c.K, c.N, c.b_row_major, c.misalign, nan), bu(c.K, c.N, c.b_row_major, c.misalign, nan);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t k = 0; k < c.K; ++k) a.at(i, k) = T(normal(rng));
  for (int64_t k = 0; k < c.K; ++k)
    for (int64_t j = 0; j < c.N; ++j) {
      bg.at(k, j) = T(normal(rng));
      bu.at(k, j) = T(normal(rng));
    }
  std::vector<T> bias_gate(c.N), bias_up(c.N);
  for (auto* b : {&bias_gate, &bias_up})
    for (auto& v : *b) v = T(normal(rng));
  const T sentinel = T(12345.0f);
  ct::Strided<T> out(c.M, c.N, c.c_row_major, false, sentinel), gate(c.M, c.N, c.c_row_major, false, sentinel),
      up(c.M, c.N, c.c_row_major, false, sentinel);

  ct::run_gemm<T, true>({.a = {a.p, a.s1, a.s0},
                         .b = {bg.p, bg.s0, bg.s1},
                         .c = out.p,
                         .scm = out.s0,
                         .scn = out.s1,
                         .bias = c.bias_gate ? bias_gate.data() : nullptr,
                         .M = c.M,
                         .N = c.N,
                         .K = c.K,
                         .act = c.act,
                         .op = "linear_glu",
                         .b_up = {bu.p, bu.s0, bu.s1},
                         .bias_up = c.bias_up ? bias_up.data() : nullptr,
                         .gate_out = c.save ? gate.p : nullptr,
                         .up_out = c.save ? up.p : nullptr});

  const double eps = ct::unit_roundoff<T>(), acc_eps = std::numeric_limits<cl::acc_t<T>>::epsilon();
  const auto av = [&](int64_t i, int64_t k) { return a.at(i, k); };
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < c.N; ++j) {
      const Sum g = reference_sum<T>(av, [&](int64_t k, int64_t n) { return bg.at(k, n); },
                                     c.bias_gate ? &bias_gate : nullptr, i, j, c.K);
      const Sum u = reference_sum<T>(av, [&](int64_t k, int64_t n) { return bu.at(k, n); },
                                     c.bias_up ? &bias_up : nullptr, i, j, c.K);
      const double y = ct::reference_act(c.act, g.value), ref = y * u.value;
      // The activations' slopes are at most 1.13 (gelu) and |act(g)| <= 1.2 |g| + 1; act is evaluated in the
      // accumulation type within a few of its ulps; the product is rounded once to T.
      const double allowed = eps * std::abs(ref) + 1.2 * (g.error * (std::abs(u.value) + u.error) + (std::abs(y) + g.error) * u.error) +
                             8 * acc_eps * (1.2 * std::abs(g.value) + 1) * std::abs(u.value) + 1e-30;
      const double got = static_cast<double>(out.at(i, j));
      ASSERT_LE(std::abs(got - ref), allowed) << "out(" << i << ", " << j << ") = " << got << ", expected " << ref;
      if (c.save) {
        ASSERT_LE(std::abs(static_cast<double>(gate.at(i, j)) - g.value), eps * std::abs(g.value) + g.error)
            << "gate(" << i << ", " << j << ")";
        ASSERT_LE(std::abs(static_cast<double>(up.at(i, j)) - u.value), eps * std::abs(u.value) + u.error)
            << "up(" << i << ", " << j << ")";
      }
    }
  EXPECT_EQ(out.changed_outside(sentinel), 0) << "values written outside the output";
  EXPECT_EQ(gate.changed_outside(sentinel), 0) << "values written outside gate";
  EXPECT_EQ(up.changed_outside(sentinel), 0) << "values written outside up";
  if (!c.save) {
    for (auto* t : {&gate, &up})
      for (const T& v : t->buffer) ASSERT_EQ(static_cast<float>(v), static_cast<float>(sentinel)) << "unasked-for output";
  }
}

// (M, N, K): a single output, the book's 20 -> 256, N ending inside a 16-column (tensor cores) or 32/64-
// column (CUDA cores) segment, K not a multiple of the K tile, K = 0, several large tiles.
const std::vector<std::tuple<int64_t, int64_t, int64_t>>& gated_shapes() {
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  static const std::vector<std::tuple<int64_t, int64_t, int64_t>> s{{7, 13, 5}, {130, 70, 41}};
#else
  static const std::vector<std::tuple<int64_t, int64_t, int64_t>> s{
      {1, 1, 1}, {1, 256, 20}, {7, 13, 5}, {3, 5, 0}, {65, 40, 33}, {130, 70, 41}, {257, 136, 24}};
#endif
  return s;
}


template <typename T>
ct::Chosen run_gated_cases(const std::vector<std::tuple<int64_t, int64_t, int64_t>>& shapes, int sm_count) {
  std::mt19937 rng(4321);
  const ct::ScopedSmCount sms(sm_count);
  ct::Chosen any;
  int variant = 0;
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<bool> alignments{false};
#else
  const std::vector<bool> alignments{false, true};
#endif
  for (const auto& [M, N, K] : shapes)
    for (int layouts = 0; layouts < 4; ++layouts)
      for (bool misalign : alignments) {
        ++variant;
        const GatedCase c{M, N, K, (layouts & 2) != 0, (layouts & 1) != 0, misalign, variant % 3 != 0,
                          variant % 4 != 1, variant % 5 != 2, variant % 2 == 0, ct::kActivations[variant % 7]};
        emu::launches.clear();
        check_gated<T>(c, rng);
        if (::testing::Test::HasFatalFailure()) return any;
        const ct::Chosen now = ct::chosen(M, 2 * N);
        any.large |= now.large;
        any.split |= now.split;
      }
  return any;
}

template <typename T>
void run_gated(int sm_count, bool expect_large_somewhere) {
  EXPECT_EQ(run_gated_cases<T>(gated_shapes(), sm_count).large, expect_large_somewhere)
      << "the tile size chosen for the SM count";
}

template <typename T>
void run_gated_split() {
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> split_shapes{{65, 40, 600}};
#else
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> split_shapes{{65, 40, 1100}, {1, 100, 700}, {130, 33, 555}};
#endif
  EXPECT_TRUE(run_gated_cases<T>(split_shapes, 64).split) << "split K was not chosen";
}

TEST(EmulatedCudaGatedGemm, Float64) { run_gated<double>(1, false); }
TEST(EmulatedCudaGatedGemm, Float32LargeTiles) { run_gated<float>(1, true); }
TEST(EmulatedCudaGatedGemm, Float32SmallTiles) { run_gated<float>(1 << 30, false); }
TEST(EmulatedCudaGatedGemm, Float16LargeTiles) { run_gated<c10::Half>(1, true); }
TEST(EmulatedCudaGatedGemm, Float16SmallTiles) { run_gated<c10::Half>(1 << 30, false); }
TEST(EmulatedCudaGatedGemm, BFloat16LargeTiles) { run_gated<c10::BFloat16>(1, true); }
TEST(EmulatedCudaGatedGemm, BFloat16SmallTiles) { run_gated<c10::BFloat16>(1 << 30, false); }
TEST(EmulatedCudaGatedGemm, Float64SplitK) { run_gated_split<double>(); }
TEST(EmulatedCudaGatedGemm, Float32SplitK) { run_gated_split<float>(); }
TEST(EmulatedCudaGatedGemm, BFloat16SplitK) { run_gated_split<c10::BFloat16>(); }

// ---------------------------------------------------------------------------------------------------
// The gated gradients.

template <typename T>
void check_glu_grad(int64_t M, int64_t N, Activation act, bool want_d, bool want_db_gate, bool want_db_up,
                    std::mt19937& rng) {
  SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(N) + " " + ct::act_label(act) + (want_d ? " d" : "") +
               (want_db_gate ? " db_gate" : "") + (want_db_up ? " db_up" : ""));
  using A = cl::acc_t<T>;
  const int64_t ldg = N + 3, ld_gate = N + 5, ld_up = N + 1;  // row strides with padding
  const T nan = T(std::numeric_limits<float>::quiet_NaN());
  std::normal_distribution<float> normal;
  std::vector<T> g(M * ldg + 1, nan), gate(M * ld_gate + 1, nan), up(M * ld_up + 1, nan);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) {
      g[r * ldg + n] = T(normal(rng));
      gate[r * ld_gate + n] = (r + n) % 7 == 0 ? T(0.0f) : T(normal(rng));  // relu's kink
      up[r * ld_up + n] = T(normal(rng));
    }
  const T sentinel = T(7.0f);
  const int64_t chunks = cl::act_grad_chunks(M);
  const bool sums = want_db_gate || want_db_up;
  std::vector<T> d(want_d ? M * 2 * N : 0, sentinel), db_gate(N, sentinel), db_up(N, sentinel);
  std::vector<A> partial(sums ? 2 * chunks * N : 0);
  cl::glu_grad(cl::GluGradArgs<T>{.g = g.data(),
                                  .gate = gate.data(),
                                  .up = up.data(),
                                  .ldg = ldg,
                                  .ld_gate = ld_gate,
                                  .ld_up = ld_up,
                                  .d = want_d ? d.data() : nullptr,
                                  .partial = sums ? partial.data() : nullptr,
                                  .M = M,
                                  .N = N,
                                  .act = act},
               want_db_gate ? db_gate.data() : nullptr, want_db_up ? db_up.data() : nullptr, nullptr);

  // dgate = g * up * act'(z) and dup = g * act(z) in A (each within a few dozen of A's ulps: the products
  // and the activation's evaluation), rounded once to T; the sums in A per 64-row chunk, then in double.
  const double eps = ct::unit_roundoff<T>(), slack = 64 * std::numeric_limits<A>::epsilon();
  const double tiny = static_cast<double>(std::numeric_limits<T>::denorm_min()) / 2;
  for (int64_t n = 0; n < N; ++n) {
    double sum_gate = 0, mag_gate = 0, dev_gate = 0, sum_up = 0, mag_up = 0, dev_up = 0;  // dev: the bounds summed
    for (int64_t r = 0; r < M; ++r) {
      const double gv = static_cast<double>(g[r * ldg + n]), z = static_cast<double>(gate[r * ld_gate + n]);
      const double u = static_cast<double>(up[r * ld_up + n]);
      const double dgate = gv * u * ct::reference_act_derivative(act, z), dup = gv * ct::reference_act(act, z);
      const double err_gate = slack * std::abs(gv * u) * 1.2, err_up = slack * std::abs(gv) * (1.2 * std::abs(z) + 1);
      sum_gate += dgate;
      mag_gate += std::abs(dgate);
      dev_gate += err_gate;
      sum_up += dup;
      mag_up += std::abs(dup);
      dev_up += err_up;
      if (want_d) {
        ASSERT_LE(std::abs(static_cast<double>(d[r * 2 * N + n]) - dgate), eps * std::abs(dgate) + err_gate + tiny)
            << "dgate(" << r << ", " << n << ")";
        ASSERT_LE(std::abs(static_cast<double>(d[r * 2 * N + N + n]) - dup), eps * std::abs(dup) + err_up + tiny)
            << "dup(" << r << ", " << n << ")";
      }
    }
    const double a_eps = std::numeric_limits<A>::epsilon() * cl::kChunkRows;
    if (want_db_gate)
      ASSERT_LE(std::abs(static_cast<double>(db_gate[n]) - sum_gate), eps * std::abs(sum_gate) + a_eps * (mag_gate + dev_gate) + dev_gate + tiny)
          << "db_gate(" << n << ")";
    else
      ASSERT_EQ(static_cast<float>(db_gate[n]), static_cast<float>(sentinel)) << "db_gate written";
    if (want_db_up)
      ASSERT_LE(std::abs(static_cast<double>(db_up[n]) - sum_up), eps * std::abs(sum_up) + a_eps * (mag_up + dev_up) + dev_up + tiny)
          << "db_up(" << n << ")";
    else
      ASSERT_EQ(static_cast<float>(db_up[n]), static_cast<float>(sentinel)) << "db_up written";
  }
}

template <typename T>
void run_glu_grad() {
  std::mt19937 rng(77);
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<int64_t> rows{130}, cols{257};
#else
  const std::vector<int64_t> rows{0, 1, 63, 64, 65, 200}, cols{1, 7, 257};
#endif
  // Every combination of outputs for every shape, the activations in turn; then every activation on a
  // shape of several chunks and column blocks.
  int variant = 0;
  for (int64_t M : rows)
    for (int64_t N : cols)
      for (int want = 1; want < 8; ++want) {
        check_glu_grad<T>(M, N, ct::kActivations[variant++ % 7], (want & 1) != 0, (want & 2) != 0, (want & 4) != 0, rng);
        if (::testing::Test::HasFatalFailure()) return;
      }
  for (Activation act : ct::kActivations) {
    check_glu_grad<T>(130, 257, act, true, true, true, rng);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(EmulatedCudaGluGrad, Float32) { run_glu_grad<float>(); }
TEST(EmulatedCudaGluGrad, Float64) { run_glu_grad<double>(); }
TEST(EmulatedCudaGluGrad, Float16) { run_glu_grad<c10::Half>(); }
TEST(EmulatedCudaGluGrad, BFloat16) { run_glu_grad<c10::BFloat16>(); }

}  // namespace
