// What the emulated CUDA kernel tests share.
#pragma once

#include "common/activation.h"
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

constexpr Activation kActivations[] = {Activation::kNone, Activation::kRelu,  Activation::kGelu,   Activation::kGeluTanh,
                                       Activation::kSilu, Activation::kTanh, Activation::kSigmoid};

// The float64 reference of each activation and of its derivative (written out from the math, not from
// common/activation.h): act(z), and act'(z) from the pre-activation z.
inline double reference_act(Activation act, double z) {
  switch (act) {
    case Activation::kNone: return z;
    case Activation::kRelu: return z > 0 || z != z ? z : 0.0;
    case Activation::kGelu: return z * 0.5 * std::erfc(-z / std::sqrt(2.0));
    case Activation::kGeluTanh:
      return 0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
    case Activation::kSilu: return z / (1 + std::exp(-z));
    case Activation::kTanh: return std::tanh(z);
    case Activation::kSigmoid: return 1 / (1 + std::exp(-z));
  }
  return z;
}

inline double reference_act_derivative(Activation act, double z) {
  const double s = 1 / (1 + std::exp(-z));
  switch (act) {
    case Activation::kNone: return 1.0;
    case Activation::kRelu: return z > 0 ? 1.0 : 0.0;
    case Activation::kGelu: return 0.5 * std::erfc(-z / std::sqrt(2.0)) + z * std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
    case Activation::kGeluTanh: {
      const double b = std::sqrt(2 / M_PI), u = b * (z + 0.044715 * z * z * z), t = std::tanh(u);
      return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * b * (1 + 3 * 0.044715 * z * z);
    }
    case Activation::kSilu: return s * (1 + z * (1 - s));
    case Activation::kTanh: return 1 - std::tanh(z) * std::tanh(z);
    case Activation::kSigmoid: return s * (1 - s);
  }
  return 1.0;
}

inline const char* act_label(Activation act) {
  static const char* names[] = {"none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"};
  return names[static_cast<int>(act)];
}

}  // namespace customlayers::testing
