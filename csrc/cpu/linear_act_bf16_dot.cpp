// The sums of the bfloat16 forward on AVX512-BF16 dot products (linear_act_bf16_kernels.h):
//  * A register block of up to 8 rows x 32 columns (two kPanelWidth panels) keeps its sums in 16 float32
//    vectors over the whole reduction: each output is one fixed sequence of dot-product steps, so its bits
//    depend on neither the blocking nor the thread count. Then the shared epilogue from an L1 scratch tile.
//  * Parallel tasks of 64 rows x 256 columns: their 64 rows (64 x K) stay in L2 while the register blocks
//    walk the task's panels.
//  * Gated: a register block's two panels are the gate and up sums of the same 16 outputs.
#include "cpu/linear_act_bf16_kernels.h"

#if CUSTOMLAYERS_BF16_KERNELS

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace customlayers::cpu {
namespace {

constexpr int64_t kPanelRow = 2 * kPanelWidth;  // bfloat16 elements per pair row of a panel
constexpr int kBlockRows = 8;                 // rows per register block (8 x 2 vectors of sums)
constexpr int kBlockVecs = 2;                 // vectors (panels) per register block: 32 columns
constexpr int64_t kSumsLd = kBlockVecs * kPanelWidth;
constexpr int64_t kTaskRows = 64;
constexpr int64_t kTaskPanels = 16;  // 256 columns

#define CUSTOMLAYERS_BF16_TARGET __attribute__((target("avx512bf16")))

// One step: acc[r][v] += the dot products of pairs[r] (row r's pair q) with panel v's pair row q.
template <int R, int V>
CUSTOMLAYERS_BF16_TARGET inline __attribute__((always_inline)) void dot_step(__m512 (&acc)[R][V], const uint32_t* pairs,
                                                                            const uint16_t* b, int64_t panel_elems) {
  __m512bh w[V];
  for (int v = 0; v < V; ++v) w[v] = (__m512bh)_mm512_loadu_si512(b + v * panel_elems);
  for (int r = 0; r < R; ++r) {
    const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[r]));
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
  }
}

// sums[r][16 v + i] = sum over k of x[r, k] W[k, 16 (p + v) + i] for R rows of x (a, row stride lda) and V
// panels from `b` (panel stride panel_elems), in the dot products' fixed order: pairs q = 0, 1, ..., the
// last one (odd K) read as a single element (the panel's zero pads its partner).
template <int R, int V>
CUSTOMLAYERS_BF16_TARGET void dot_block(const uint16_t* a, int64_t lda, int64_t K, const uint16_t* b,
                                        int64_t panel_elems, float* sums) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t full = K / 2;
  uint32_t pairs[R];
  for (int64_t q = 0; q < full; ++q) {
    for (int r = 0; r < R; ++r) std::memcpy(&pairs[r], a + r * lda + 2 * q, sizeof(uint32_t));
    dot_step<R, V>(acc, pairs, b + q * kPanelRow, panel_elems);
  }
  if (K % 2 != 0) {
    for (int r = 0; r < R; ++r) pairs[r] = a[r * lda + K - 1];  // the pair (x[r, K - 1], 0)
    dot_step<R, V>(acc, pairs, b + full * kPanelRow, panel_elems);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(sums + r * kSumsLd + v * kPanelWidth, acc[r][v]);
}

using DotBlockFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, float*);

template <int V, int... R>
constexpr std::array<DotBlockFn, sizeof...(R)> dot_blocks(std::integer_sequence<int, R...>) {
  return {&dot_block<R + 1, V>...};
}

// dot_block<rows, vecs>.
DotBlockFn dot_block_for(int rows, int vecs) {
  static constexpr auto kOne = dot_blocks<1>(std::make_integer_sequence<int, kBlockRows>{});
  static constexpr auto kTwo = dot_blocks<2>(std::make_integer_sequence<int, kBlockRows>{});
  return (vecs == 1 ? kOne : kTwo)[rows - 1];
}

void run_task(const Bf16Forward& f, int64_t task) {
  const int64_t task_cols = (f.b.panels + kTaskPanels - 1) / kTaskPanels;
  const int64_t r_begin = task / task_cols * kTaskRows, r_end = std::min(f.rows, r_begin + kTaskRows);
  const int64_t p_begin = task % task_cols * kTaskPanels, p_end = std::min(f.b.panels, p_begin + kTaskPanels);
  alignas(64) float sums[kBlockRows * kSumsLd];
  for (int64_t p = p_begin; p < p_end; p += kBlockVecs) {
    const int vecs = static_cast<int>(std::min<int64_t>(kBlockVecs, p_end - p));
    for (int64_t r = r_begin; r < r_end; r += kBlockRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, r_end - r));
      dot_block_for(rows, vecs)(f.a + r * f.lda, f.lda, f.K, f.b.panel(p), f.b.panel_elems(), sums);
      if (f.gated) {
        const int64_t c0 = p / 2 * kPanelWidth;
        finish_gated_block(f, sums, sums + kPanelWidth, kSumsLd, r, rows, c0, std::min(kPanelWidth, f.N - c0));
      } else {
        const int64_t c0 = p * kPanelWidth;
        finish_block(f, sums, kSumsLd, r, rows, c0, std::min<int64_t>(vecs * kPanelWidth, f.cols - c0));
      }
    }
  }
}

}  // namespace

void run_dot(const Bf16Forward& f) {
  TORCH_INTERNAL_ASSERT(f.b.pairs == (f.K + 1) / 2);
  const int64_t tasks = (f.rows + kTaskRows - 1) / kTaskRows * ((f.b.panels + kTaskPanels - 1) / kTaskPanels);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) run_task(f, t);
  });
}

}  // namespace customlayers::cpu

#endif
