// A hand-written float32 GEMM for one thread: out = a @ b [+ bias], the operands packed into cache-sized
// panels and multiplied by a register-blocked micro-kernel (at::vec: 512-bit vectors on the avx512 tier,
// 256-bit below). The BLAS tiles of blas_tiles.h call it in place of BLAS where it is the faster one
// (gemm_f32_choice: on the avx512 tier of CPUs where BLAS runs narrower vectors, see the .cpp).
#pragma once

#include "cpu/linear_act_rows.h"

namespace customlayers::cpu {

struct GemmF32 {
  Strided<float> out;      // (M, N), any strides
  Strided<const float> a;  // (M, K), any strides
  Strided<const float> b;  // (K, N), any strides
  const float* bias;       // (N,) added to every row, or null
  int64_t M, N, K;
  bool accumulate = false;  // out += a @ b (no bias) instead
};

// out = a @ b [+ bias] (or out += a @ b) on the calling thread; sums in float32, in an order that depends
// on the shapes alone. The avx2 and avx512 tiers only (fused multiply-adds).
void gemm_f32(const GemmF32& g);

// Whether the BLAS tiles' float32 products run gemm_f32, and why in words: CUSTOMLAYERS_CPU_BLAS32 'native'
// (BLAS) or 'own' (gemm_f32; refused on the default tier) forces it; unset, gemm_f32 where it is measured
// faster than BLAS (see the .cpp). A bad setting: a ValueError.
struct GemmF32Choice {
  bool own;
  const char* why;
};
const GemmF32Choice& gemm_f32_choice();
inline bool gemm_f32_wanted() { return gemm_f32_choice().own; }

}  // namespace customlayers::cpu
