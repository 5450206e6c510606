// Which GEMMs this tier's kernels run on this machine, and why, for customlayers.backend_report()
// (customlayers/_ops.py reads it through ctypes from the tier library that was loaded).
#include "cpu/gemm_f32.h"
#include "cpu/linear_act_bf16.h"
#include "cpu/linear_act_widen.h"
#include "customlayers/customlayers.h"

#include <exception>
#include <string>

namespace customlayers::cpu {
namespace {

std::string sixteen_bit(bool in_float, const char* dtype) {
  return in_float ? std::string("float32 GEMMs (this CPU has no fast ") + dtype +
                        " GEMMs, or CUSTOMLAYERS_CPU_BLAS16=float)"
                  : std::string("BLAS's ") + dtype + " GEMMs";
}

std::string bf16_once() {
  switch (bf16_kernel("backend_report")) {
    case Bf16Kernel::kAmx: return "AMX tiles";
    case Bf16Kernel::kDot: return "AVX512-BF16 dot products";
    case Bf16Kernel::kNone: break;
  }
  return "float32 GEMMs";
}

// f()'s text, or the error it raised (a bad CUSTOMLAYERS_CPU_BLAS16/32 setting, a forced kernel the CPU lacks).
template <typename F>
std::string or_error(const F& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    const std::string what = e.what();
    return "error: " + what.substr(0, what.find('\n'));  // its first line: not torch's C++ stack trace
  }
}

}  // namespace
}  // namespace customlayers::cpu

// "dtype=how" a line each: float32, bfloat16 (and its forwards that round once), float16.
extern "C" CUSTOMLAYERS_API const char* customlayers_cpu_gemm_report() {
  using namespace customlayers::cpu;
  static const std::string text =
      "float32=" + or_error([] { return std::string(gemm_f32_choice().why); }) +
      "\nbfloat16=" + or_error([] { return sixteen_bit(blas_in_float<at::BFloat16>(), "bfloat16"); }) +
      "; the forwards that round once: " + or_error(bf16_once) +
      "\nfloat16=" + or_error([] { return sixteen_bit(blas_in_float<at::Half>(), "float16"); });
  return text.c_str();
}
