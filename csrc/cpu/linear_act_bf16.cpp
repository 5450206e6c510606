// The bfloat16 forwards that round once (see linear_act_bf16.h): which kernel runs, the operands packed for
// it, and the epilogue both kernels share (linear_act_bf16_kernels.h).
//  * One operand (K, C) is packed per call into pair panels (PackedPairs): the weight, or x^T when x has
//    fewer rows than the weight has columns and the weight is nn.Linear's (out, in): the sums are then
//    out^T, the weight's rows read in place. Where the operand is stored along the reduction, the pairs are
//    16 x 16 word transposes.
//  * The gated unit (linear_glu): both weights packed into alternating panels (gate, up, gate, ...), so that
//    a kernel's block of two panels has the gate and up sums of the same outputs.
//  * The epilogue: bias, activation (act(gate) * up) and the one rounding on a block of float32 sums.
// Only the AVX512 tier's library has the kernels (compiled for AVX512-BF16 and AMX as well, run only where
// CPUID has them); the others report them unsupported.
#include "cpu/linear_act_bf16.h"

#include "common/cpu_alloc.h"
#include "cpu/linear_act_bf16_kernels.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_widen.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#if CUSTOMLAYERS_BF16_KERNELS
#include <immintrin.h>
#endif

namespace customlayers::cpu {

#if CUSTOMLAYERS_BF16_KERNELS
namespace {

// words[(q0 + i) * 16 + j] = pair word q0 + i of column j (16-bit elements cols + j * ld + 2 (q0 + i) and
// the next), for i < count pairs and j < lanes columns (0 for the others): a 16 x 16 transpose of words.
void transpose_pairs(const uint16_t* cols, int64_t ld, int64_t lanes, int64_t q0, int64_t count, uint32_t* words) {
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  __m512i r[kPanelWidth], t[kPanelWidth];
  for (int64_t j = 0; j < kPanelWidth; ++j)
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
      if (4 * L + c < count) _mm512_storeu_si512(words + (q0 + 4 * L + c) * kPanelWidth, out[L]);
  }
}

// Columns [n0, n0 + lanes) of a (K, .) bfloat16 operand (element (k, n) at src[k * rs + n * cs]) as one
// panel at `out` (panel_elems elements, zero past K and the lanes; lanes <= 0: all zero).
void pack_panel(const uint16_t* src, int64_t rs, int64_t cs, int64_t K, int64_t n0, int64_t lanes,
                int64_t panel_elems, uint16_t* out) {
  constexpr int64_t kW = kPanelWidth;
  if (lanes < kW || panel_elems > (K + 1) / 2 * 2 * kW)  // columns past N, pairs past K
    std::fill(out, out + panel_elems, uint16_t{0});
  // Pair words (low half W[2q, n], high half W[2q + 1, n]) written whole, read in the weight's memory
  // order: along k for nn.Linear's (out, in) layout, along n otherwise.
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
  const int64_t full = K / 2;
  if (rs == 1) {
    for (int64_t q = 0; q < full && lanes > 0; q += kW) transpose_pairs(src + n0 * cs, cs, lanes, q, std::min(kW, full - q), words);
    if (K % 2 != 0)
      for (int64_t j = 0; j < lanes; ++j) words[full * kW + j] = src[(n0 + j) * cs + K - 1];
  } else {
    for (int64_t q = 0; q < full; ++q) {
      const uint16_t* even = src + 2 * q * rs + n0 * cs;
      const uint16_t* odd = even + rs;
      for (int64_t j = 0; j < lanes; ++j) words[q * kW + j] = uint32_t{even[j * cs]} | uint32_t{odd[j * cs]} << 16;
    }
    if (K % 2 != 0) {
      const uint16_t* last = src + (K - 1) * rs + n0 * cs;
      for (int64_t j = 0; j < lanes; ++j) words[full * kW + j] = last[j * cs];
    }
  }
}

const uint16_t* bits_of(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }

// How a kernel wants its operand packed: pair rows per panel, and whether the panels come in pairs.
struct PanelShape {
  int64_t pairs;
  bool even;
  int64_t panels(int64_t N) const {
    const int64_t p = (N + kPanelWidth - 1) / kPanelWidth;
    return even ? (p + 1) / 2 * 2 : p;
  }
};

PanelShape panel_shape(Bf16Kernel kernel, int64_t K) {
  return kernel == Bf16Kernel::kAmx ? PanelShape{amx_pairs(K), true} : PanelShape{(K + 1) / 2, false};
}

// `panels` panels of `pairs` pair rows, panel p holding columns [n0, n0 + 16) of operand(p) -> (operand,
// n0): in parallel.
template <typename F>
PackedPairs pack_panels(int64_t K, int64_t N, int64_t panels, int64_t pairs, const F& operand) {
  PackedPairs packed;
  packed.pairs = pairs;
  packed.panels = panels;
  const int64_t panel_elems = packed.panel_elems();
  packed.buffer = cpu::empty({packed.panels * panel_elems}, at::kBFloat16);
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.buffer.mutable_data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(panel_elems, 1));
  at::parallel_for(0, packed.panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const auto [w, n0] = operand(p);
      pack_panel(bits_of(*w), w->stride(0), w->stride(1), K, n0, std::min(kPanelWidth, N - n0), panel_elems,
                 dst + p * panel_elems);
    }
  });
  return packed;
}

// The (K, N) operand w packed: panel p holds its columns [16 p, 16 p + 16).
PackedPairs pack_pairs(const at::Tensor& w, int64_t K, int64_t N, const PanelShape& shape) {
  return pack_panels(K, N, shape.panels(N), shape.pairs, [&](int64_t p) { return std::pair{&w, p * kPanelWidth}; });
}

// Two (K, N) operands interleaved: panel 2p holds gate's columns [16 p, 16 p + 16), panel 2p + 1 up's.
PackedPairs pack_gated_pairs(const at::Tensor& gate, const at::Tensor& up, int64_t K, int64_t N,
                             const PanelShape& shape) {
  return pack_panels(K, N, 2 * PanelShape{shape.pairs, false}.panels(N), shape.pairs,
                     [&](int64_t p) { return std::pair{p % 2 == 0 ? &gate : &up, p / 2 * kPanelWidth}; });
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

// The outputs kept (rows, cols) for one transposed block, before they go to out's columns.
using Tile = at::BFloat16[kMaxBlockRows][kMaxBlockCols];

template <Activation kAct>
void finish_block_as(const Bf16Forward& f, const float* sums, int64_t ld, int64_t r0, int64_t rows, int64_t c0,
                     int64_t cols) {
  using Vec = Vectorized<float>;
  static_assert(Vec::size() == kPanelWidth);
  alignas(64) Tile tile;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += kPanelWidth) {
      const int64_t n = std::min(kPanelWidth, cols - c);
      const Vec s = Vec::loadu(sums + r * ld + c);
      const Vec v = f.transposed ? activate(kAct, f.bias != nullptr ? s + Vec(f.bias[r0 + r]) : s)
                                 : bias_act(s, f.bias != nullptr ? f.bias + c0 + c : nullptr, kAct);
      const auto rounded = at::vec::convert_from_float<at::BFloat16>(v, Vec(0));
      rounded.store(f.transposed ? &tile[r][c] : f.out + (r0 + r) * f.N + c0 + c, n);
    }
  }
  if (f.transposed)
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) f.out[(c0 + c) * f.N + r0 + r] = tile[r][c];
}

template <Activation kAct>
void finish_gated_block_as(const Bf16Forward& f, const float* gate_sums, const float* up_sums, int64_t ld, int64_t r0,
                           int64_t rows, int64_t c0, int64_t cols) {
  using Vec = Vectorized<float>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += kPanelWidth) {
      const int64_t n = std::min(kPanelWidth, cols - c);
      Vec gate = Vec::loadu(gate_sums + r * ld + c), up = Vec::loadu(up_sums + r * ld + c);
      if (f.bias != nullptr) gate = gate + Vec::loadu(f.bias + c0 + c);
      if (f.bias_up != nullptr) up = up + Vec::loadu(f.bias_up + c0 + c);
      const int64_t at = (r0 + r) * f.N + c0 + c;
      at::vec::convert_from_float<at::BFloat16>(activate(kAct, gate) * up, Vec(0)).store(f.out + at, n);
      if (f.gate != nullptr) {
        at::vec::convert_from_float<at::BFloat16>(gate, Vec(0)).store(f.gate + at, n);
        at::vec::convert_from_float<at::BFloat16>(up, Vec(0)).store(f.up + at, n);
      }
    }
  }
}

void run(const Bf16Forward& f, Bf16Kernel kernel) {
  if (kernel == Bf16Kernel::kAmx) return run_amx(f);
  run_dot(f);
}

}  // namespace

void finish_block(const Bf16Forward& f, const float* sums, int64_t ld, int64_t r0, int64_t rows, int64_t c0,
                  int64_t cols) {
  TORCH_INTERNAL_ASSERT(rows <= kMaxBlockRows && cols <= kMaxBlockCols);
  with_activation(f.act, [&](auto a) { finish_block_as<decltype(a)::value>(f, sums, ld, r0, rows, c0, cols); });
}

void finish_gated_block(const Bf16Forward& f, const float* gate, const float* up, int64_t ld, int64_t r0,
                        int64_t rows, int64_t c0, int64_t cols) {
  with_activation(f.act, [&](auto a) { finish_gated_block_as<decltype(a)::value>(f, gate, up, ld, r0, rows, c0, cols); });
}

bool bf16_dot_supported() {
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
}

bool bf16_amx_supported() {
  static const bool supported = bf16_dot_supported() && amx_usable();
  return supported;
}

void bf16_forward(const LinearForward& args, at::Tensor& out, Bf16Kernel kernel) {
  TORCH_INTERNAL_ASSERT(kernel != Bf16Kernel::kNone);
  const int64_t M = args.M, K = args.K, N = args.N;
  const PanelShape shape = panel_shape(kernel, K);
  // Packing costs a pass over the packed operand: the weight's (K x N), unless x's (M x K) is smaller and
  // the weight's rows can be read in place (nn.Linear's layout).
  const bool transposed = M < N && args.weight.stride(0) == 1;
  const at::Tensor x = transposed || args.x2.stride(1) == 1 ? args.x2 : args.x2.contiguous();
  const at::Tensor& a = transposed ? args.weight : x;  // its rows: x's, or the weight's columns
  const int64_t lda = transposed ? args.weight.stride(1) : x.stride(0);
  Bf16Forward f{bits_of(a), lda,
                transposed ? pack_pairs(x.t(), K, M, shape) : pack_pairs(args.weight, K, N, shape),
                transposed ? N : M, transposed ? M : N, K, transposed, args.act, nullptr,
                out.mutable_data_ptr<at::BFloat16>(), N};
  const std::vector<float> bias = padded_bias(args.bias, std::max(N, f.b.panels * kPanelWidth));
  f.bias = bias.empty() ? nullptr : bias.data();
  run(f, kernel);
}

void bf16_glu_forward(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up, Bf16Kernel kernel) {
  TORCH_INTERNAL_ASSERT(kernel != Bf16Kernel::kNone);
  const int64_t M = args.M, K = args.K, N = args.N;
  const at::Tensor x = args.x2.stride(1) == 1 ? args.x2 : args.x2.contiguous();
  Bf16Forward f{bits_of(x), x.stride(0), pack_gated_pairs(args.weight_gate, args.weight_up, K, N, panel_shape(kernel, K)), M, N, K,
                false, args.act, nullptr, out.mutable_data_ptr<at::BFloat16>(), N, true};
  const int64_t padded = (N + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
  const std::vector<float> bias = padded_bias(args.bias_gate, padded), bias_up = padded_bias(args.bias_up, padded);
  f.bias = bias.empty() ? nullptr : bias.data();
  f.bias_up = bias_up.empty() ? nullptr : bias_up.data();
  if (gate != nullptr) {
    f.gate = gate->mutable_data_ptr<at::BFloat16>();
    f.up = up->mutable_data_ptr<at::BFloat16>();
  }
  run(f, kernel);
}

#else

bool bf16_dot_supported() { return false; }

bool bf16_amx_supported() { return false; }

void bf16_forward(const LinearForward&, at::Tensor&, Bf16Kernel) {
  TORCH_INTERNAL_ASSERT(false, "bf16_forward: only the AVX512 tier has the kernels");
}

void bf16_glu_forward(const GluForward&, at::Tensor&, at::Tensor*, at::Tensor*, Bf16Kernel) {
  TORCH_INTERNAL_ASSERT(false, "bf16_glu_forward: only the AVX512 tier has the kernels");
}

#endif

Bf16Kernel bf16_kernel(const char* op) {
  switch (blas16_setting()) {
    case Blas16::kAuto:
      return bf16_amx_supported() ? Bf16Kernel::kAmx : bf16_dot_supported() ? Bf16Kernel::kDot : Bf16Kernel::kNone;
    case Blas16::kDot:
      TORCH_CHECK_VALUE(bf16_dot_supported(), op, ": CUSTOMLAYERS_CPU_BLAS16=dot needs a CPU with AVX512-BF16 "
                        "and the avx512 CPU tier (customlayers.backend_report() says which runs)");
      return Bf16Kernel::kDot;
    case Blas16::kAmx:
      TORCH_CHECK_VALUE(bf16_amx_supported(), op, ": CUSTOMLAYERS_CPU_BLAS16=amx needs a CPU with AMX-BF16 and "
                        "AVX512-BF16 whose OS allows AMX (Linux 5.16 or later), and the avx512 CPU tier "
                        "(customlayers.backend_report() says which runs)");
      return Bf16Kernel::kAmx;
    case Blas16::kNative:
    case Blas16::kFloat: return Bf16Kernel::kNone;
  }
  return Bf16Kernel::kNone;
}

}  // namespace customlayers::cpu
