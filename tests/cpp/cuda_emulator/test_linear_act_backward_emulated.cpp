// The CUDA kernels of linear_act's masked gradient and bias gradient (csrc/cuda/linear_act_backward.cuh), run on
// the CPU emulator and compared with a float64 computation: ReLU mask (including out == 0, a NaN
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

template <typename T>
void check(int64_t M, int64_t N, bool relu, bool want_gp, bool want_db, std::mt19937& rng) {
  SCOPED_TRACE(std::to_string(M) + "x" + std::to_string(N) + (relu ? " relu" : " none") + (want_gp ? " g'" : "") +
               (want_db ? " db" : ""));
  using A = cl::acc_t<T>;
  const int64_t ldg = N + 3, ldo = N + 5;  // row strides with padding
  std::normal_distribution<float> normal;
  std::vector<T> g(M * ldg + 1, T(std::numeric_limits<float>::quiet_NaN())), out(M * ldo + 1, T(0.0f));
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) {
      g[r * ldg + n] = T(normal(rng));
      const float o = normal(rng);
      out[r * ldo + n] = T((r + n) % 7 == 0 ? 0.0f : o);  // out == 0 masks, like out < 0
    }
  if (relu && M > 1 && N > 1) {  // a NaN gradient where the unit is off does not leak into db
    g[1 * ldg + 1] = T(std::numeric_limits<float>::quiet_NaN());
    out[1 * ldo + 1] = T(-1.0f);
  }
  if (relu && N > 2) out[2] = T(std::numeric_limits<float>::quiet_NaN());  // a NaN output passes g, as in torch.relu
  const T sentinel = T(7.0f);
  std::vector<T> gp(want_gp ? M * N : 0, sentinel), db(want_db ? N : 0, sentinel);
  std::vector<A> partial(want_db ? cl::relu_grad_chunks(M) * N : 0);
  cl::ReluGradArgs<T> args{g.data(), ldg, relu ? out.data() : nullptr, relu ? ldo : 0,
                           want_gp ? gp.data() : nullptr, want_db ? partial.data() : nullptr,
                           want_db ? db.data() : nullptr, M, N, relu};
  cl::relu_grad(args, nullptr);

  for (int64_t n = 0; n < N; ++n) {
    double sum = 0, mag = 0;
    for (int64_t r = 0; r < M; ++r) {
      const bool on = !relu || !(static_cast<double>(out[r * ldo + n]) <= 0);
      const double v = on ? static_cast<double>(g[r * ldg + n]) : 0.0;
      sum += v;
      mag += std::abs(v);
      if (want_gp && relu) {
        ASSERT_EQ(static_cast<double>(gp[r * N + n]), v) << "g'(" << r << ", " << n << ")";
      }
    }
    if (want_db) {
      // Chunks are summed in A (kChunkRows terms each), then in double, and db rounded once to T.
      const double allowed = customlayers::testing::unit_roundoff<T>() * std::abs(sum) + std::numeric_limits<A>::epsilon() * cl::kChunkRows * mag;
      ASSERT_LE(std::abs(static_cast<double>(db[n]) - sum), allowed) << "db(" << n << ")";
    }
  }
  if (want_gp && !relu) {  // without ReLU g' is g itself: nothing is written
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
      for (bool relu : {true, false})
        for (int want = 1; want < 4; ++want) {
          check<T>(M, N, relu, (want & 1) != 0, (want & 2) != 0, rng);
          if (::testing::Test::HasFatalFailure()) return;
        }
}

TEST(EmulatedCudaReluGrad, Float32) { run_all<float>(); }
TEST(EmulatedCudaReluGrad, Float64) { run_all<double>(); }
TEST(EmulatedCudaReluGrad, Float16) { run_all<c10::Half>(); }
TEST(EmulatedCudaReluGrad, BFloat16) { run_all<c10::BFloat16>(); }

}  // namespace
