// The bfloat16 forward on AVX512-BF16 dot products (see linear_act_bf16.h).
//  * One operand (K, C) is packed per call: panel p holds its columns [16p, 16p + 16) as ceil(K / 2) rows of
//    16 pairs (B[2q, c], B[2q + 1, c]), zero past K and C, the layout VDPBF16PS multiplies a broadcast pair
//    of the other operand's row by. It is the weight, or x^T when x has fewer rows than the weight has
//    columns and the weight is nn.Linear's (out, in): the sums are then out^T, the weight's rows read in
//    place (DotForward).
//  * A register block of up to 8 rows x 32 columns keeps its sums in 16 float32 vectors over the whole
//    reduction (each output a fixed sequence of dot-product steps: the bits do not depend on the blocking
//    or the thread count); then bias, activation and the one rounding, from an L1 scratch tile.
//  * Parallel tasks of 64 rows x 256 columns: their 64 rows (64 x K) stay in L2 while the register blocks
//    walk the task's panels.
//  * The gated unit (linear_glu): both weights packed into alternating panels (pack_gated_pairs), so that a
//    register block's two panels are the gate and up sums of the same 16 outputs; act(gate) * up rounded once.
// Only the AVX512 tier's library has the kernel (compiled for AVX512-BF16 as well, run only where CPUID
// has it); the others report it unsupported.
#include "cpu/linear_act_bf16.h"

#include "common/cpu_alloc.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_widen.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__) && defined(__GNUC__)
#define CUSTOMLAYERS_BF16_DOT 1
#include <immintrin.h>
#else
#define CUSTOMLAYERS_BF16_DOT 0
#endif

namespace customlayers::cpu {

#if CUSTOMLAYERS_BF16_DOT
namespace {

constexpr int64_t kLanes = 16;        // float32 sums per vector; columns per panel
constexpr int64_t kPanelRow = 2 * kLanes;  // bfloat16 elements per pair row of a panel
constexpr int kBlockRows = 8;         // rows per register block (8 x 2 vectors of sums)
constexpr int kBlockVecs = 2;         // vectors (panels) per register block: 32 columns
constexpr int64_t kTaskRows = 64;
constexpr int64_t kTaskPanels = 16;   // 256 columns

// A (K, N) operand packed for the dot products (see the top of the file): the weight, or x^T.
struct PackedPairs {
  at::Tensor buffer;
  int64_t pairs = 0, panels = 0;
  const uint16_t* panel(int64_t p) const {
    return reinterpret_cast<const uint16_t*>(buffer.const_data_ptr<at::BFloat16>()) + p * pairs * kPanelRow;
  }
};

// words[(q0 + i) * 16 + j] = pair word q0 + i of column j (16-bit elements cols + j * ld + 2 (q0 + i) and
// the next), for i < count pairs and j < lanes columns (0 for the others): a 16 x 16 transpose of words.
void transpose_pairs(const uint16_t* cols, int64_t ld, int64_t lanes, int64_t q0, int64_t count, uint32_t* words) {
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  __m512i r[kLanes], t[kLanes];
  for (int64_t j = 0; j < kLanes; ++j)
    r[j] = j < lanes ? _mm512_maskz_loadu_epi32(mask, cols + j * ld + 2 * q0) : _mm512_setzero_si512();
  // Per 128-bit lane L: t[2g], t[2g + 1] interleave rows 2g and 2g + 1 (words 4L, 4L + 1 and 4L + 2, 4L + 3);
  // then r[4g + c] holds rows 4g .. 4g + 3 of word 4L + c.
  for (int g = 0; g < 8; ++g) {
    t[2 * g] = _mm512_unpacklo_epi32(r[2 * g], r[2 * g + 1]);
    t[2 * g + 1] = _mm512_unpackhi_epi32(r[2 * g], r[2 * g + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // Word 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i lo01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), lo23 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i hi01 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    const __m512i out[4] = {_mm512_shuffle_i32x4(lo01, hi01, 0x88), _mm512_shuffle_i32x4(lo01, hi01, 0xDD),
                            _mm512_shuffle_i32x4(lo23, hi23, 0x88), _mm512_shuffle_i32x4(lo23, hi23, 0xDD)};
    for (int L = 0; L < 4; ++L)
      if (4 * L + c < count) _mm512_storeu_si512(words + (q0 + 4 * L + c) * kLanes, out[L]);
  }
}

// Columns [n0, n0 + lanes) of a (K, .) bfloat16 operand (element (k, n) at src[k * rs + n * cs]) as one
// panel at `out` (panel_elems elements, zero past K and the lanes).
void pack_panel(const uint16_t* src, int64_t rs, int64_t cs, int64_t K, int64_t n0, int64_t lanes, int64_t panel_elems,
                uint16_t* out) {
  if (lanes < kLanes) std::fill(out, out + panel_elems, uint16_t{0});  // the columns past N
  // Pair words (low half W[2q, n], high half W[2q + 1, n]) written whole, read in the weight's memory
  // order: along k for nn.Linear's (out, in) layout, along n otherwise.
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
  const int64_t full = K / 2;
  if (rs == 1) {
    for (int64_t q = 0; q < full; q += kLanes) transpose_pairs(src + n0 * cs, cs, lanes, q, std::min(kLanes, full - q), words);
    if (K % 2 != 0)
      for (int64_t j = 0; j < lanes; ++j) words[full * kLanes + j] = src[(n0 + j) * cs + K - 1];
  } else {
    for (int64_t q = 0; q < full; ++q) {
      const uint16_t* even = src + 2 * q * rs + n0 * cs;
      const uint16_t* odd = even + rs;
      for (int64_t j = 0; j < lanes; ++j)
        words[q * kLanes + j] = uint32_t{even[j * cs]} | uint32_t{odd[j * cs]} << 16;
    }
    if (K % 2 != 0) {
      const uint16_t* last = src + (K - 1) * rs + n0 * cs;
      for (int64_t j = 0; j < lanes; ++j) words[full * kLanes + j] = last[j * cs];
    }
  }
}

const uint16_t* bits_of(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }

// `panels` panels of K rows, panel p holding columns [n0, n0 + 16) of operand(p) -> (operand, n0): in parallel.
template <typename F>
PackedPairs pack_panels(int64_t K, int64_t N, int64_t panels, const F& operand) {
  PackedPairs packed;
  packed.pairs = (K + 1) / 2;
  packed.panels = panels;
  const int64_t panel_elems = packed.pairs * kPanelRow;
  packed.buffer = cpu::empty({packed.panels * panel_elems}, at::kBFloat16);
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.buffer.mutable_data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(panel_elems, 1));
  at::parallel_for(0, packed.panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const auto [w, n0] = operand(p);
      pack_panel(bits_of(*w), w->stride(0), w->stride(1), K, n0, std::min(kLanes, N - n0), panel_elems,
                 dst + p * panel_elems);
    }
  });
  return packed;
}

// The (K, N) operand w packed: panel p holds its columns [16p, 16p + 16).
PackedPairs pack_pairs(const at::Tensor& w, int64_t K, int64_t N) {
  return pack_panels(K, N, (N + kLanes - 1) / kLanes, [&](int64_t p) { return std::pair{&w, p * kLanes}; });
}

// Two (K, N) operands interleaved: panel 2p holds gate's columns [16p, 16p + 16), panel 2p + 1 up's, so that a
// register block of two panels has the gate and up sums of the same 16 outputs.
PackedPairs pack_gated_pairs(const at::Tensor& gate, const at::Tensor& up, int64_t K, int64_t N) {
  return pack_panels(K, N, 2 * ((N + kLanes - 1) / kLanes),
                     [&](int64_t p) { return std::pair{p % 2 == 0 ? &gate : &up, p / 2 * kLanes}; });
}

// sums[r][16 v + i] = sum over k of x[r, k] W[k, 16 (p + v) + i] for R rows of x (a, row stride lda) and V
// panels from `b` (panel stride panel_elems), in the dot products' fixed order: pairs q = 0, 1, ..., the
// last one (odd K) read as a single element (the panel's zero pads its partner).
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
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(sums + (r * kBlockVecs + v) * kLanes, acc[r][v]);
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

// The product as the kernel runs it: sums = A (rows, K) @ B (K, cols), B packed. Normally A is x and B the
// weight; when `transposed`, A is nn.Linear's weight (N, K) and B is x^T, so that the sums are out^T: the
// weight is then read in place and x, the smaller operand, packed.
struct DotForward {
  const uint16_t* a;  // rows of K elements, row stride lda
  int64_t lda;
  PackedPairs b;
  int64_t rows, cols, K;
  bool transposed;
  const float* bias;  // (N,), padded to whole panels when not transposed; or null
  at::BFloat16* out;  // (M, N) contiguous
  int64_t N;
  // Gated (b packed by pack_gated_pairs, not transposed): out = act(gate + bias) * (up + bias_up) from each
  // block's two panels, 16 outputs per block.
  bool gated = false;
  const float* bias_up = nullptr;  // (N,), padded to whole panels; or null
  at::BFloat16* gate = nullptr;    // (M, N) contiguous: the pre-activations, or null
  at::BFloat16* up = nullptr;
};

// The gated outputs of a block (see DotForward::gated): columns [16 (p / 2), + 16) of rows r0...
template <Activation kAct>
void finish_gated_block(const DotForward& f, const float* sums, int64_t r0, int rows, int64_t p) {
  using Vec = Vectorized<float>;
  const int64_t c0 = p / 2 * kLanes, cols = std::min<int64_t>(kLanes, f.N - c0);
  for (int r = 0; r < rows; ++r) {
    Vec gate = Vec::loadu(sums + r * kBlockVecs * kLanes), up = Vec::loadu(sums + (r * kBlockVecs + 1) * kLanes);
    if (f.bias != nullptr) gate = gate + Vec::loadu(f.bias + c0);
    if (f.bias_up != nullptr) up = up + Vec::loadu(f.bias_up + c0);
    const int64_t at = (r0 + r) * f.N + c0;
    at::vec::convert_from_float<at::BFloat16>(activate(kAct, gate) * up, Vec(0)).store(f.out + at, cols);
    if (f.gate != nullptr) {
      at::vec::convert_from_float<at::BFloat16>(gate, Vec(0)).store(f.gate + at, cols);
      at::vec::convert_from_float<at::BFloat16>(up, Vec(0)).store(f.up + at, cols);
    }
  }
}

// The outputs of the sums' block of `rows` rows from r0 and the columns of panels [p, p + vecs):
// act(sums + bias) rounded, into out (transposed: into out^T's block, through a bfloat16 scratch tile).
template <Activation kAct>
void finish_block(const DotForward& f, const float* sums, int64_t r0, int rows, int64_t p, int vecs) {
  using Vec = Vectorized<float>;
  using BVec = Vectorized<at::BFloat16>;
  static_assert(Vec::size() == kLanes && BVec::size() == kBlockVecs * kLanes);
  const int64_t c0 = p * kLanes, cols = std::min<int64_t>(vecs * kLanes, f.cols - c0);
  at::BFloat16 tile[kBlockRows][kBlockVecs * kLanes];
  for (int r = 0; r < rows; ++r) {
    Vec v[kBlockVecs] = {Vec(0), Vec(0)};
    for (int j = 0; j < vecs; ++j) {
      const Vec s = Vec::loadu(sums + (r * kBlockVecs + j) * kLanes);
      if (f.transposed) v[j] = activate(kAct, f.bias != nullptr ? s + Vec(f.bias[r0 + r]) : s);
      else v[j] = bias_act(s, f.bias != nullptr ? f.bias + c0 + j * kLanes : nullptr, kAct);
    }
    const BVec rounded = at::vec::convert_from_float<at::BFloat16>(v[0], v[1]);
    if (f.transposed) rounded.store(tile[r]);
    else rounded.store(f.out + (r0 + r) * f.N + c0, cols);
  }
  if (f.transposed)
    for (int64_t c = 0; c < cols; ++c)
      for (int r = 0; r < rows; ++r) f.out[(c0 + c) * f.N + r0 + r] = tile[r][c];
}

template <Activation kAct>
void run_task(const DotForward& f, int64_t task) {
  const int64_t task_cols = (f.b.panels + kTaskPanels - 1) / kTaskPanels;
  const int64_t r_begin = task / task_cols * kTaskRows, r_end = std::min(f.rows, r_begin + kTaskRows);
  const int64_t p_begin = task % task_cols * kTaskPanels, p_end = std::min(f.b.panels, p_begin + kTaskPanels);
  alignas(64) float sums[kBlockRows * kBlockVecs * kLanes];
  const int64_t panel_elems = f.b.pairs * kPanelRow;
  for (int64_t p = p_begin; p < p_end; p += kBlockVecs) {
    const int vecs = static_cast<int>(std::min<int64_t>(kBlockVecs, p_end - p));
    for (int64_t r = r_begin; r < r_end; r += kBlockRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, r_end - r));
      dot_block_for(rows, vecs)(f.a + r * f.lda, f.lda, f.K, f.b.panel(p), panel_elems, sums);
      if (f.gated) finish_gated_block<kAct>(f, sums, r, rows, p);
      else finish_block<kAct>(f, sums, r, rows, p, vecs);
    }
  }
}

// b (bfloat16 (N,)) in float32, zero to `size` elements; empty when b is undefined.
std::vector<float> padded_bias(const at::Tensor& b, int64_t size) {
  std::vector<float> out;
  if (!b.defined()) return out;
  const at::BFloat16* src = b.const_data_ptr<at::BFloat16>();
  out.assign(size, 0.0f);
  std::copy(src, src + b.numel(), out.begin());
  return out;
}

// Every task of f, in parallel (tasks of kTaskRows rows x kTaskPanels panels).
void run_tasks(const DotForward& f, Activation act) {
  const int64_t tasks = (f.rows + kTaskRows - 1) / kTaskRows * ((f.b.panels + kTaskPanels - 1) / kTaskPanels);
  with_activation(act, [&](auto a) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) run_task<decltype(a)::value>(f, t);
    });
  });
}

}  // namespace

bool bf16_dot_supported() {
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
}

void bf16_dot_forward(const LinearForward& args, at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(bf16_dot_supported(), "bf16_dot_forward: this CPU has no AVX512-BF16");
  const int64_t M = args.M, K = args.K, N = args.N;
  // Packing costs a pass over the packed operand: the weight's (K x N), unless x's (M x K) is smaller and
  // the weight's rows can be read in place (nn.Linear's layout).
  const bool transposed = M < N && args.weight.stride(0) == 1;
  const at::Tensor x = transposed || args.x2.stride(1) == 1 ? args.x2 : args.x2.contiguous();
  const at::Tensor& a = transposed ? args.weight : x;  // its rows: x's, or the weight's columns
  const int64_t lda = transposed ? args.weight.stride(1) : x.stride(0);
  DotForward f{bits_of(a), lda,
               transposed ? pack_pairs(x.t(), K, M) : pack_pairs(args.weight, K, N), transposed ? N : M,
               transposed ? M : N, K, transposed, nullptr, out.mutable_data_ptr<at::BFloat16>(), N};
  const std::vector<float> bias = padded_bias(args.bias, std::max(N, f.b.panels * kLanes));
  f.bias = bias.empty() ? nullptr : bias.data();
  run_tasks(f, args.act);
}

void bf16_dot_glu_forward(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up) {
  TORCH_INTERNAL_ASSERT(bf16_dot_supported(), "bf16_dot_glu_forward: this CPU has no AVX512-BF16");
  const int64_t M = args.M, K = args.K, N = args.N;
  const at::Tensor x = args.x2.stride(1) == 1 ? args.x2 : args.x2.contiguous();
  DotForward f{bits_of(x), x.stride(0), pack_gated_pairs(args.weight_gate, args.weight_up, K, N), M, 0, K, false,
               nullptr, out.mutable_data_ptr<at::BFloat16>(), N, true, nullptr};
  f.cols = f.b.panels * kLanes;
  const int64_t padded = (N + kLanes - 1) / kLanes * kLanes;
  const std::vector<float> bias = padded_bias(args.bias_gate, padded), bias_up = padded_bias(args.bias_up, padded);
  f.bias = bias.empty() ? nullptr : bias.data();
  f.bias_up = bias_up.empty() ? nullptr : bias_up.data();
  if (gate != nullptr) {
    f.gate = gate->mutable_data_ptr<at::BFloat16>();
    f.up = up->mutable_data_ptr<at::BFloat16>();
  }
  run_tasks(f, args.act);
}

#else

bool bf16_dot_supported() { return false; }

void bf16_dot_forward(const LinearForward&, at::Tensor&) {
  TORCH_INTERNAL_ASSERT(false, "bf16_dot_forward: only the AVX512 tier has the kernel");
}

void bf16_dot_glu_forward(const GluForward&, at::Tensor&, at::Tensor*, at::Tensor*) {
  TORCH_INTERNAL_ASSERT(false, "bf16_dot_glu_forward: only the AVX512 tier has the kernel");
}

#endif

bool bf16_dot_enabled(const char* op) {
  switch (blas16_setting()) {
    case Blas16::kAuto: return bf16_dot_supported();
    case Blas16::kDot:
      TORCH_CHECK_VALUE(bf16_dot_supported(), op, ": CUSTOMLAYERS_CPU_BLAS16=dot needs a CPU with AVX512-BF16 "
                        "and the avx512 CPU tier (customlayers.backend_report() says which runs)");
      return true;
    case Blas16::kNative:
    case Blas16::kFloat: return false;
  }
  return false;
}

}  // namespace customlayers::cpu
