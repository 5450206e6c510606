// What the emulated CUDA kernel tests share.
#pragma once

#include "cuda_emulator.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace customlayers::testing {

// The unit roundoff of T: the largest relative error of one rounding to T.
template <typename T>
double unit_roundoff() {
  if constexpr (std::is_same_v<T, c10::Half>) return std::ldexp(1.0, -11);
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return std::ldexp(1.0, -8);
  else return std::numeric_limits<T>::epsilon() / 2;
}

// Sets the emulated SM count for a scope and restores the one before on leaving it, by a failed
// assertion's early return too, so that one test's SM count never leaks into the next.
class ScopedSmCount {
 public:
  explicit ScopedSmCount(int count) : saved_(cuda_emulator::emulated_sm_count) {
    cuda_emulator::emulated_sm_count = count;
  }
  ~ScopedSmCount() { cuda_emulator::emulated_sm_count = saved_; }
  ScopedSmCount(const ScopedSmCount&) = delete;
  ScopedSmCount& operator=(const ScopedSmCount&) = delete;

 private:
  int saved_;
};

}  // namespace customlayers::testing
