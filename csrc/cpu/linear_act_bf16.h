// The bfloat16 forward of the CPU linear_act kernels on AVX512-BF16 dot products (linear_act_bf16.cpp), for
// the activations that must not be applied to a rounded pre-activation (all but none and relu): ATen's
// bfloat16 GEMMs round their output, so the BLAS path otherwise runs these in float32 (about 4x slower
// where the CPU has bfloat16 dot products). Here the products accumulate in float32 registers over the
// whole reduction, and the bias, the activation and the one rounding run on them.
#pragma once

#include "common/linear_act.h"
#include "common/linear_glu.h"

namespace customlayers::cpu {

// Whether bf16_dot_forward runs here: the AVX512 tier's library on a CPU with AVX512-BF16.
bool bf16_dot_supported();

// Whether the bfloat16 forwards that round once run on these kernels: where supported, unless
// CUSTOMLAYERS_CPU_BLAS16 says otherwise (=dot where unsupported: a ValueError naming op).
bool bf16_dot_enabled(const char* op);

// out = act(x2 @ weight + bias), all bfloat16 (out (M, N) contiguous); only where bf16_dot_supported().
void bf16_dot_forward(const LinearForward& args, at::Tensor& out);

// out = act(x2 @ weight_gate + bias_gate) * (x2 @ weight_up + bias_up), all bfloat16 (out (M, N)
// contiguous), both products' sums in float32 and each output rounded once; only where bf16_dot_supported().
// gate and up, when not null, get the pre-activations (bias added), each rounded once.
void bf16_dot_glu_forward(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up);

}  // namespace customlayers::cpu
