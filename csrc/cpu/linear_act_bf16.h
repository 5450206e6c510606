// The bfloat16 forwards of the CPU linear_act and linear_glu kernels that accumulate in float32 and round
// once: the activations that must not be applied to a rounded pre-activation (all but none and relu; every
// linear_glu) and, on CPUs with AMX, all of them. ATen's bfloat16 GEMMs round their output, so the BLAS
// path otherwise runs the former in float32 (several times slower where the CPU has bfloat16 dot
// products). Here the products accumulate in float32 over the whole reduction, and the bias, the
// activation and the one rounding run on the sums: on hand-written AMX tiles where the CPU has AMX-BF16,
// else on AVX512-BF16 dot products (linear_act_bf16_kernels.h).
#pragma once

#include "common/linear_act.h"
#include "common/linear_glu.h"

namespace customlayers::cpu {

enum class Bf16Kernel { kNone, kDot, kAmx };

// Whether the kernels run here: the AVX512 tier's library on a CPU with AVX512-BF16; AMX also needs
// AMX-BF16 and the OS's permission to use the tiles.
bool bf16_dot_supported();
bool bf16_amx_supported();

// The kernel for the bfloat16 forwards that round once: AMX where supported, else the dot products where
// supported, else none (float32), unless CUSTOMLAYERS_CPU_BLAS16 says otherwise ('dot' or 'amx' where
// unsupported: a ValueError naming op).
Bf16Kernel bf16_kernel(const char* op);

// out = act(x2 @ weight + bias), all bfloat16 (out (M, N) contiguous), on `kernel` (not kNone).
void bf16_forward(const LinearForward& args, at::Tensor& out, Bf16Kernel kernel);

// out = act(x2 @ weight_gate + bias_gate) * (x2 @ weight_up + bias_up), all bfloat16 (out (M, N)
// contiguous), both products' sums in float32 and each output rounded once, on `kernel` (not kNone).
// gate and up, when not null, get the pre-activations (bias added), each rounded once.
void bf16_glu_forward(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up, Bf16Kernel kernel);

}  // namespace customlayers::cpu
