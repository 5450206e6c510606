// float16/bfloat16 GEMMs of the CPU linear_act kernels in float32. BLAS's float16/bfloat16 GEMMs are
// fast only where the CPU has dot products for them (AVX512-BF16 or AMX-BF16, AVX512-FP16); elsewhere
// ATen runs them in a generic GEMM about 10x slower than float32 BLAS. There the BLAS path runs in
// float32 instead: operands widened once (exactly), the GEMMs and the epilogue in float32 (as the
// reduced-precision GEMMs accumulate), each output rounded once.
#pragma once

#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "cpu/linear_act_rows.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <string_view>

namespace customlayers::cpu {

// How float16/bfloat16 GEMMs run, CUSTOMLAYERS_CPU_BLAS16 (read once): unset, the CPU decides (below);
// 'native' or 'float' forces BLAS's 16-bit GEMMs or float32 ones on any CPU, so that tests run both
// everywhere (native then runs ATen's generic GEMM where the CPU has no 16-bit dot products: slow, but
// rounded once like the others); 'dot' and 'amx' ask for the AVX512-BF16 or the AMX kernel of the bfloat16
// forwards that round once (linear_act_bf16.h) where it may run, and refuse to run elsewhere.
enum class Blas16 { kAuto, kNative, kFloat, kDot, kAmx };

inline Blas16 blas16_setting() {
  static const Blas16 setting = [] {
    const char* env = std::getenv("CUSTOMLAYERS_CPU_BLAS16");
    const std::string_view forced = env != nullptr ? env : "";
    if (forced == "native") return Blas16::kNative;
    if (forced == "float") return Blas16::kFloat;
    if (forced == "dot") return Blas16::kDot;
    if (forced == "amx") return Blas16::kAmx;
    TORCH_CHECK_VALUE(forced.empty(), "linear_act: CUSTOMLAYERS_CPU_BLAS16 must be 'native', 'float', 'dot' or 'amx' (or "
                      "unset), but got '", std::string(forced), "'");
    return Blas16::kAuto;
  }();
  return setting;
}

// Whether T's BLAS GEMMs run in float32 on this CPU: unless forced, where it lacks dot products for T.
template <typename T>
bool blas_in_float() {
  static const bool in_float = [] {
    switch (blas16_setting()) {
      case Blas16::kNative: return false;
      case Blas16::kFloat: return true;
      case Blas16::kAuto:
      case Blas16::kDot:
      case Blas16::kAmx: break;
    }
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
    const bool native = std::is_same_v<T, at::BFloat16>
                            ? __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16")
                            : __builtin_cpu_supports("avx512fp16");
    return !native;
#else
    return false;  // other compilers and CPUs: BLAS's own float16/bfloat16 GEMMs
#endif
  }();
  return in_float;
}

// dst[i] = float(src[i]) or dst[i] = T(src[i]) for i < n (T float16/bfloat16), vectorized, in parallel.
template <typename T, typename S, typename D>
void convert_span(const S* src, D* dst, int64_t n) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kW = Vec::size();
  at::parallel_for(0, n, kTaskElems, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += L::kStep) {
      const int64_t m = std::min(L::kStep, end - i);
      Vec v[L::kVecs];
      if constexpr (std::is_same_v<S, T>) {
        L::load(src + i, m, v);
        for (int j = 0; j < L::kVecs; ++j)
          if (m > j * kW) v[j].store(dst + i + j * kW, std::min(kW, m - j * kW));
      } else {
        for (int j = 0; j < L::kVecs; ++j) v[j] = m > j * kW ? Vec::loadu(src + i + j * kW, std::min(kW, m - j * kW)) : Vec(0);
        L::store(dst + i, m, v);
      }
    }
  });
}

// A float32 copy of t (float16/bfloat16): with t's strides when t is dense, else row-major.
template <typename T>
at::Tensor widened(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return widened<T>(t.contiguous());
  at::Tensor f = cpu::empty_strided(t.sizes(), t.strides(), at::kFloat);
  convert_span<T>(t.const_data_ptr<T>(), f.mutable_data_ptr<float>(), t.numel());
  return f;
}

// An uninitialized float32 tensor of t's sizes and strides (t undefined: undefined).
inline at::Tensor float_like(const at::Tensor& t) {
  return t.defined() ? cpu::empty_strided(t.sizes(), t.strides(), at::kFloat) : at::Tensor();
}

// dst = src rounded to T, both dense with the same strides.
template <typename T>
void narrowed_into(const at::Tensor& src, at::Tensor& dst) {
  convert_span<T>(src.const_data_ptr<float>(), dst.mutable_data_ptr<T>(), dst.numel());
}

}  // namespace customlayers::cpu
