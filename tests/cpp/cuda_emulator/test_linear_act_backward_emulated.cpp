// The CUDA kernels of linear_act's masked gradient and bias gradient (csrc/cuda/linear_act_backward.cuh), run on
// the CPU emulator and compared with a float64 computation: every activation (ReLU: the mask, including out == 0, a NaN
// output and a NaN gradient), row counts around the 64-row chunks, columns around the 256-thread blocks, a strided
// gradient, and each output asked for alone.
#include "cuda/linear_act_backward.cuh"
#include "emulated_testing.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

namespace cl = customlayers::cuda;

// saved: the forward's output (relu, tanh, sigmoid) or the pre-activation z (gelu, gelu_tanh, silu), here
// computed in float64 from z and rounded to T; the reference derivative is taken at that z.
template <typename T>
void check(int64_t M, int64_t N, customlayers::Activation act, bool want_gp, bool want_db, std::mt19937& rng) {
  namespace ct = customlayers::testing;
  SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(N) + " " + ct::act_label(act) + (want_gp ? " g'" : "") +
               (want_db ? " db" : ""));
  using A = cl::acc_t<T>;
  const bool relu = act == customlayers::Activation::kRelu, masked = act != customlayers::Activation::kNone;
  const bool from_output = customlayers::act_saved(act) == customlayers::ActSaved::kOutput;
  const int64_t ldg = N + 3, lds = N + 5;  // row strides with padding
  std::normal_distribution<float> normal;
  std::vector<T> g(M * ldg + 1, T(std::numeric_limits<float>::quiet_NaN())), saved(M * lds + 1, T(0.0f));
  std::vector<double> z(M * N);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) {
      g[r * ldg + n] = T(normal(rng));
      z[r * N + n] = (r + n) % 7 == 0 ? 0.0 : static_cast<double>(T(normal(rng)));  // relu: out == 0 masks
      saved[r * lds + n] = T(from_output ? ct::reference_act(act, z[r * N + n]) : z[r * N + n]);
    }
  if (relu && M > 1 && N > 1) {  // a NaN gradient where the unit is off does not leak into db
    g[1 * ldg + 1] = T(std::numeric_limits<float>::quiet_NaN());
    saved[1 * lds + 1] = T(-1.0f);
    z[1 * N + 1] = -1.0;
  }
  const bool nan_out = relu && N > 2;
  if (nan_out) saved[2] = T(std::numeric_limits<float>::quiet_NaN());  // a NaN output passes g, as in torch.relu
  const T sentinel = T(7.0f);
  std::vector<T> gp(want_gp ? M * N : 0, sentinel), db(want_db ? N : 0, sentinel);
  std::vector<A> partial(want_db ? cl::act_grad_chunks(M) * N : 0);
  cl::act_grad(cl::ActGradArgs<T>{.g = g.data(),
                                  .ldg = ldg,
                                  .saved = masked ? saved.data() : nullptr,
                                  .lds = masked ? lds : 0,
                                  .gp = want_gp ? gp.data() : nullptr,
                                  .partial = want_db ? partial.data() : nullptr,
                                  .db = want_db ? db.data() : nullptr,
                                  .M = M,
                                  .N = N,
                                  .act = act},
               nullptr);

  // g' = g * act'(z) in A: within a few of A's ulps (the derivative's evaluation, and for tanh/sigmoid its
  // output rounded to T), then rounded to T.
  const double slack = relu || !masked ? 0.0 : (from_output ? 4 * ct::unit_roundoff<T>() : 64 * std::numeric_limits<A>::epsilon());
  const double tiny = static_cast<double>(std::numeric_limits<T>::denorm_min()) / 2;  // float16's subnormals
  for (int64_t n = 0; n < N; ++n) {
    double sum = 0, mag = 0, dev = 0;  // dev: the derivative's evaluation error, summed
    for (int64_t r = 0; r < M; ++r) {
      const double gv = static_cast<double>(g[r * ldg + n]);
      double v = gv;
      if (relu) v = !(static_cast<double>(saved[r * lds + n]) <= 0) ? gv : 0.0;
      else if (masked) v = gv * ct::reference_act_derivative(act, z[r * N + n]);
      sum += v;
      mag += std::abs(v);
      if (slack > 0) dev += slack * std::abs(gv);  // (relu's NaN gradient is masked: no slack)
      if (want_gp && masked) {
        const double got = static_cast<double>(gp[r * N + n]);
        if (relu) {
          ASSERT_EQ(got, v) << "g'(" << r << ", " << n << ")";
        } else {
          ASSERT_LE(std::abs(got - v), ct::unit_roundoff<T>() * std::abs(v) + slack * std::abs(gv) + tiny)
              << "g'(" << r << ", " << n << ")";
        }
      }
    }
    if (want_db) {
      // Chunks are summed in A (kChunkRows terms each), then in double, and db rounded once to T.
      const double allowed = ct::unit_roundoff<T>() * std::abs(sum) + std::numeric_limits<A>::epsilon() * cl::kChunkRows * (mag + dev) + dev + tiny;
      ASSERT_LE(std::abs(static_cast<double>(db[n]) - sum), allowed) << "db(" << n << ")";
    }
  }
  if (want_gp && !masked) {  // without an activation g' is g itself: nothing is written
    for (const T& v : gp) ASSERT_EQ(static_cast<float>(v), static_cast<float>(sentinel));
  }
}

// The ThreadSanitizer build takes one shape (several chunks and column blocks).
template <typename T>
void run_all() {
  std::mt19937 rng(99);
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<int64_t> rows{130}, cols{257};
#else
  const std::vector<int64_t> rows{0, 1, 63, 64, 65, 200}, cols{1, 7, 257};
#endif
  for (int64_t M : rows)
    for (int64_t N : cols)
      for (customlayers::Activation act : customlayers::testing::kActivations)
        for (int want = 1; want < 4; ++want) {
          check<T>(M, N, act, (want & 1) != 0, (want & 2) != 0, rng);
          if (::testing::Test::HasFatalFailure()) return;
        }
}

TEST(EmulatedCudaActGrad, Float32) { run_all<float>(); }
TEST(EmulatedCudaActGrad, Float64) { run_all<double>(); }
TEST(EmulatedCudaActGrad, Float16) { run_all<c10::Half>(); }
TEST(EmulatedCudaActGrad, BFloat16) { run_all<c10::BFloat16>(); }

}  // namespace
