// The CUDA kernel of masked_uniform_ (csrc/cuda/masked_uniform.cuh) run on the CPU emulator and compared
// element by element with common/masked_uniform.h evaluated on the host (the math the CPU kernel shares):
// sizes around the values per Philox call, vector and scalar stores (aligned and misaligned output),
// grid-stride loops on 1 SM, nothing written past the end. That the CPU and CUDA kernels agree bit for bit
// on a GPU is checked by the Python tests and benchmarks/cuda_exercise.py.
#include "cuda/masked_uniform.cuh"
#include "emulated_testing.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

namespace cl = customlayers::cuda;
namespace mu = customlayers::masked_uniform;
namespace emu = customlayers::cuda_emulator;

struct FixedSeeds {
  cl::SeedOffset value;
  cl::SeedOffset get() const { return value; }
};

// The book's initializer: uniform(-10, 10), zeroed where |w| < 5 (kept values clamped into [5, 10]).
mu::Bounds book_bounds() { return {-10.0, 20.0, 5.0, -5.0, 5.0, 10.0, -10.0, -5.0}; }

template <typename T>
void check(int64_t numel, bool misalign, uint64_t seed, uint64_t offset) {
  SCOPED_TRACE(std::to_string(numel) + (misalign ? " misaligned" : "") + " seed " + std::to_string(seed) +
               " offset " + std::to_string(offset));
  using A = cl::acc_t<T>;
  constexpr int kPer = mu::kPerCall<A>;
  const mu::Params<A> params(book_bounds());
  const T sentinel = T(123.0f);
  std::vector<T> buffer(numel + 16, sentinel);
  // std::vector's storage is 16-byte aligned; one element in, it is not aligned for a vector store.
  T* out = buffer.data() + (misalign ? 1 : 0);
  cl::masked_uniform_fill(out, numel, params, FixedSeeds{{seed, offset}}, nullptr);

  uint32_t k0, k1;
  mu::key(seed, k0, k1);
  for (int64_t g = 0; g * kPer < numel; ++g) {
    uint32_t c0, c1, c2, c3;
    mu::counter(static_cast<uint64_t>(g), offset, c0, c1, c2, c3);
    customlayers::philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
    A values[kPer];
    mu::masked_values(c0, c1, c2, c3, params, values);
    for (int k = 0; k < kPer && g * kPer + k < numel; ++k) {
      const T expected = static_cast<T>(values[k]);
      ASSERT_EQ(std::memcmp(&out[g * kPer + k], &expected, sizeof(T)), 0) << "element " << g * kPer + k;
    }
  }
  for (T* p = out + numel; p < buffer.data() + buffer.size(); ++p)
    ASSERT_EQ(std::memcmp(p, &sentinel, sizeof(T)), 0) << "wrote past the end";
  if (misalign) ASSERT_EQ(std::memcmp(buffer.data(), &sentinel, sizeof(T)), 0) << "wrote before the start";
}

template <typename T>
void run_all() {
  const customlayers::testing::ScopedSmCount sms(1);  // 8 blocks of 256 threads at most: larger fills loop
#ifdef CUSTOMLAYERS_EMULATOR_FEW_CASES
  const std::vector<int64_t> sizes{4099, 9001};
#else
  const std::vector<int64_t> sizes{1, 2, 3, 4, 5, 7, 8, 9, 1000, 4099, 9001};
#endif
  for (int64_t numel : sizes)
    for (bool misalign : {false, true}) {
      check<T>(numel, misalign, 1234, 0);
      if (::testing::Test::HasFatalFailure()) break;
    }
  check<T>(1000, false, 0xfedcba9876543210ull, 0x100000004ull);  // both words of seed and offset
}

TEST(EmulatedCudaMaskedUniform, Float32) { run_all<float>(); }
TEST(EmulatedCudaMaskedUniform, Float64) { run_all<double>(); }
TEST(EmulatedCudaMaskedUniform, Float16) { run_all<c10::Half>(); }
TEST(EmulatedCudaMaskedUniform, BFloat16) { run_all<c10::BFloat16>(); }

}  // namespace
