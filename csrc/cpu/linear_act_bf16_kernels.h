// What the two bfloat16 kernels of linear_act_bf16.h share: the packed operand, the problem as the kernels
// see it, and the epilogue that turns a block of float32 sums into rounded outputs. linear_act_bf16.cpp
// prepares the operands and finishes the blocks; linear_act_bf16_dot.cpp (AVX512-BF16 dot products) and
// linear_act_bf16_amx.cpp (AMX tiles) compute the sums. Only the AVX512 tier's library has them.
#pragma once

#include "common/activation.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__) && defined(__GNUC__)
#define CUSTOMLAYERS_BF16_KERNELS 1
#else
#define CUSTOMLAYERS_BF16_KERNELS 0
#endif

namespace customlayers::cpu {

#if CUSTOMLAYERS_BF16_KERNELS

constexpr int64_t kPanelWidth = 16;  // columns per packed panel: one float32 vector, one AMX tile
constexpr int64_t kMaxBlockRows = 32, kMaxBlockCols = 32;  // the largest block of sums a kernel finishes

// A (K, C) bfloat16 operand packed in pairs along the reduction: panel p holds its columns
// [16 p, 16 p + 16) as `pairs` rows (at least ceil(K / 2)) of 16 pairs (B[2q, c], B[2q + 1, c]), zero past
// K and C: the layout VDPBF16PS multiplies a broadcast pair by, and AMX's VNNI layout of a B tile.
struct PackedPairs {
  at::Tensor buffer;
  int64_t pairs = 0, panels = 0;
  int64_t panel_elems() const { return pairs * 2 * kPanelWidth; }
  const uint16_t* panel(int64_t p) const {
    return reinterpret_cast<const uint16_t*>(buffer.const_data_ptr<at::BFloat16>()) + p * panel_elems();
  }
};

// The product as the kernels run it: sums = A (rows, K) @ B (K, cols), B packed. Normally A is x and B the
// weight; when `transposed`, A is nn.Linear's weight (N, K) and B is x^T, so that the sums are out^T: the
// weight is then read in place and x, the smaller operand, packed.
struct Bf16Forward {
  const uint16_t* a;  // rows of K elements, row stride lda
  int64_t lda;
  PackedPairs b;
  int64_t rows, cols, K;
  bool transposed;
  Activation act;
  const float* bias;  // (N,), padded to whole panels when not transposed; or null
  at::BFloat16* out;  // (M, N) contiguous
  int64_t N;
  // Gated (not transposed): b's panels alternate, 2p the gate weight's columns and 2p + 1 the up weight's
  // same columns; out = act(gate + bias) * (up + bias_up).
  bool gated = false;
  const float* bias_up = nullptr;  // (N,), padded to whole panels; or null
  at::BFloat16* gate = nullptr;    // (M, N) contiguous: the pre-activations, or null
  at::BFloat16* up = nullptr;
};

// The outputs of a block of sums (row r, column c at sums[r * ld + c]) for rows [r0, r0 + rows) and columns
// [c0, c0 + cols) of the product: act(sums + bias) rounded once into out (transposed: into out^T's block).
void finish_block(const Bf16Forward& f, const float* sums, int64_t ld, int64_t r0, int64_t rows, int64_t c0,
                  int64_t cols);

// The gated outputs of the sums of a gate panel and its up panel (both with row stride ld) for output rows
// [r0, r0 + rows) and columns [c0, c0 + cols): act(gate + bias) * (up + bias_up) rounded once, and the
// pre-activations into f.gate and f.up when set.
void finish_gated_block(const Bf16Forward& f, const float* gate, const float* up, int64_t ld, int64_t r0,
                        int64_t rows, int64_t c0, int64_t cols);

// Every output of f, in parallel: on AVX512-BF16 dot products (b with ceil(K / 2) pairs), or on AMX tiles
// (b with amx_pairs(K) pairs and an even number of panels; only where amx_usable()).
void run_dot(const Bf16Forward& f);
void run_amx(const Bf16Forward& f);

// The pair rows of the AMX kernel's panels: K padded to a multiple of 32.
int64_t amx_pairs(int64_t K);

// Whether run_amx may run: the CPU has AMX-BF16 and the OS lets this process use the tiles.
bool amx_usable();

#endif

}  // namespace customlayers::cpu
