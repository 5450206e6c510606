// CPU kernel of customlayers::masked_uniform_: fill a tensor in place with uniform values in [low, high),
// those of magnitude under `threshold` set to zero, in one pass (common/masked_uniform.h has the math).
//
// Each element's value depends only on (seed, offset, its logical index): the tensor is cut into
// blocks of kLanes Philox counters computed in vectors (AVX2: eight counters per instruction), and the
// blocks are spread over threads with at::parallel_for. Tensors that are not
// contiguous are filled through a contiguous buffer.
#include "common/checks.h"
#include "common/cpu_vec.h"
#include "common/masked_uniform.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>

namespace customlayers::cpu {
namespace {

using namespace masked_uniform;

using V = at::vec::Vectorized<int32_t>;  // Philox counters, one per lane
// Philox counters per block: vectors of them generated together (their dependency chains overlap), as
// many as the vector registers hold with the temporaries (16 on x86-64 below AVX-512, 32 with it).
constexpr int kBlockVecs = V::size() >= 16 ? 4 : 2;
constexpr int kLanes = kBlockVecs * V::size();
constexpr int64_t kGrain = 1 << 14;   // counters per parallel task at least

// The float draws of kLanes counters, vectorized where FMA is an instruction (the AVX2 and AVX512 tiers):
// the same operations as masked_value (fused multiply-add, then the clamps and cuts as selects), so the
// same bits as the scalar code of the default tier, whose std::fma is exact too. Written with the ISA's
// own compares and selects: at::vec's blendv takes a mask vector, which costs two more instructions per
// select on AVX-512 (mask register -> vector -> mask register).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define CUSTOMLAYERS_VECTOR_MASK 1

#if defined(CPU_CAPABILITY_AVX512)
using RawF = __m512;
inline RawF set1(float v) { return _mm512_set1_ps(v); }
// (x >> 8) as float: the 24 random bits, exactly
inline RawF high_bits(const V& x) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)); }
inline RawF vfma(RawF a, RawF b, RawF c) { return _mm512_fmadd_ps(a, b, c); }
inline RawF vmul(RawF a, RawF b) { return _mm512_mul_ps(a, b); }
inline RawF vmin(RawF a, RawF b) { return _mm512_min_ps(a, b); }  // a < b ? a : b
inline RawF vmax(RawF a, RawF b) { return _mm512_max_ps(a, b); }  // a > b ? a : b
// w >= pos_cut ? pos : (w <= neg_cut ? neg : 0)
inline RawF cut(RawF w, RawF pos_cut, RawF neg_cut, RawF pos, RawF neg) {
  const RawF kept_neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(w, neg_cut, _CMP_LE_OQ), neg);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(w, pos_cut, _CMP_GE_OQ), kept_neg, pos);
}
#else
using RawF = __m256;
inline RawF set1(float v) { return _mm256_set1_ps(v); }
inline RawF high_bits(const V& x) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)); }
inline RawF vfma(RawF a, RawF b, RawF c) { return _mm256_fmadd_ps(a, b, c); }
inline RawF vmul(RawF a, RawF b) { return _mm256_mul_ps(a, b); }
inline RawF vmin(RawF a, RawF b) { return _mm256_min_ps(a, b); }
inline RawF vmax(RawF a, RawF b) { return _mm256_max_ps(a, b); }
inline RawF cut(RawF w, RawF pos_cut, RawF neg_cut, RawF pos, RawF neg) {
  const RawF kept_neg = _mm256_and_ps(_mm256_cmp_ps(w, neg_cut, _CMP_LE_OQ), neg);
  return _mm256_blendv_ps(kept_neg, pos, _mm256_cmp_ps(w, pos_cut, _CMP_GE_OQ));
}
#endif

// Params<float> broadcast once per task (constructible from Params<double> too, for fill_range's sake:
// only float draws use it).
struct VecParams {
  RawF low, scale, pos_cut, neg_cut, pos_lo, pos_hi, neg_lo, neg_hi;
  template <typename A>
  explicit VecParams(const Params<A>& p)
      : low(set1(p.low)), scale(set1(p.scale)), pos_cut(set1(p.pos_cut)), neg_cut(set1(p.neg_cut)),
        pos_lo(set1(p.pos_lo)), pos_hi(set1(p.pos_hi)), neg_lo(set1(p.neg_lo)), neg_hi(set1(p.neg_hi)) {}
};

// masked_value of every lane's draw. Its clamp `w < lo ? lo : (w > hi ? hi : w)` is max(lo, min(hi, w))
// wherever it is used: a side is kept (its cut finite) only when lo <= hi (check_args), and min/max only
// select, so the bits are the scalar code's.
inline at::vec::Vectorized<float> masked_vec(const V& x, const VecParams& p) {
  const RawF w = vfma(p.scale, vmul(high_bits(x), set1(0x1p-24f)), p.low);
  const RawF pos = vmax(p.pos_lo, vmin(p.pos_hi, w));
  const RawF neg = vmax(p.neg_lo, vmin(p.neg_hi, w));
  return cut(w, p.pos_cut, p.neg_cut, pos, neg);
}

// values[j * 4 + w] = the draw of word w of counter j, for the kW counters of x0..x3 (word 0..3 of each):
// the four words' vectors interleaved in registers (two rounds of interleave2: a 4 x kW transpose).
inline void masked_values_vec(const V& x0, const V& x1, const V& x2, const V& x3, const VecParams& p,
                              float* values) {
  constexpr int kW = V::size();
  const auto [a_lo, a_hi] = at::vec::interleave2(masked_vec(x0, p), masked_vec(x2, p));  // lanes [0, kW/2), rest
  const auto [b_lo, b_hi] = at::vec::interleave2(masked_vec(x1, p), masked_vec(x3, p));
  const auto [o0, o1] = at::vec::interleave2(a_lo, b_lo);  // x0[l] x1[l] x2[l] x3[l] for l < kW/2
  const auto [o2, o3] = at::vec::interleave2(a_hi, b_hi);
  o0.store(values);
  o1.store(values + kW);
  o2.store(values + 2 * kW);
  o3.store(values + 3 * kW);
}
#endif

// Groups [begin, end) of out[0..numel): element i from Philox counter i / kPer of (seed, offset).
// A function of its own, with everything by value: called from inside an OpenMP region, the loop
// keeps keys and counters in registers (a lambda's captured references would be reloaded after
// every store, which made the fill several times slower).
template <typename T, typename A>
void fill_range(T* out, int64_t numel, int64_t begin, int64_t end, uint32_t k0, uint32_t k1, uint64_t offset,
                const Params<A> p) {
  constexpr int kPer = kPerCall<A>;
  const V lane = V::arange(0, 1);
  const V offset_lo(static_cast<int32_t>(offset)), offset_hi(static_cast<int32_t>(offset >> 32));
  alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  alignas(64) A values[kLanes * kPer];
#if defined(CUSTOMLAYERS_VECTOR_MASK)
  const VecParams vp(p);
#endif
  for (int64_t g = begin; g < end; g += kLanes) {
    V x0[kBlockVecs], x1[kBlockVecs], x2[kBlockVecs], x3[kBlockVecs];
    for (int v = 0; v < kBlockVecs; ++v) {
      const int j = v * V::size();
      const uint64_t first = static_cast<uint64_t>(g + j);
      x2[v] = offset_lo;
      x3[v] = offset_hi;
      if (static_cast<uint32_t>(first) <= UINT32_MAX - V::size()) {  // no carry into the high word
        x0[v] = V(static_cast<int32_t>(first)) + lane;
        x1[v] = V(static_cast<int32_t>(first >> 32));
      } else {
        for (int k = 0; k < V::size(); ++k) counter(first + k, offset, c0[j + k], c1[j + k], c2[j + k], c3[j + k]);
        x0[v] = V::loadu(c0 + j);
        x1[v] = V::loadu(c1 + j);
      }
    }
    philox::philox4x32_10(x0, x1, x2, x3, k0, k1);
    const int64_t first = g * kPer;
    const int64_t n = std::min<int64_t>({kLanes * kPer, (end - g) * kPer, numel - first});
#if defined(CUSTOMLAYERS_VECTOR_MASK)
    if constexpr (kPer == 4) {
      // a whole block of a float tensor goes straight into it, the rest through values
      const bool direct = std::is_same_v<T, float> && n == kLanes * kPer;
      float* dst = direct ? reinterpret_cast<float*>(out + first) : values;
      for (int v = 0; v < kBlockVecs; ++v) masked_values_vec(x0[v], x1[v], x2[v], x3[v], vp, dst + v * V::size() * 4);
      if (direct) continue;
    } else
#endif
    {
      for (int v = 0; v < kBlockVecs; ++v) {
        const int j = v * V::size();
        x0[v].store(c0 + j);
        x1[v].store(c1 + j);
        x2[v].store(c2 + j);
        x3[v].store(c3 + j);
      }
      for (int j = 0; j < kLanes; ++j) masked_values(c0[j], c1[j], c2[j], c3[j], p, values + j * kPer);
    }
    if constexpr (std::is_same_v<T, A>) {
      std::copy(values, values + n, out + first);
    } else {
      at::vec::convert(values, out + first, n);
    }
  }
}

// out[0..numel) of a contiguous tensor, in parallel.
template <typename T, typename A = acc_t<T>>
void fill(T* out, int64_t numel, uint64_t seed, uint64_t offset, const Params<A>& p) {
  const int64_t groups = (numel + kPerCall<A> - 1) / kPerCall<A>;
  uint32_t k0, k1;
  key(seed, k0, k1);
  at::parallel_for(0, groups, kGrain, [&](int64_t begin, int64_t end) {
    fill_range<T, A>(out, numel, begin, end, k0, k1, offset, p);
  });
}

// The seed of an unseeded call: 64 bits drawn from the default CPU generator (torch.manual_seed
// makes it reproducible; consecutive calls draw fresh seeds).
uint64_t draw_seed() {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

void masked_uniform_(at::Tensor& self, double low, double high, double threshold, std::optional<int64_t> seed,
                     int64_t offset) {
  const Bounds bounds = check_args(self, low, high, threshold, offset);
  check_writable(self, kOp, "tensor");
  if (self.numel() == 0) return;
  const uint64_t s = seed.has_value() ? static_cast<uint64_t>(*seed) : draw_seed();
  at::Tensor out = self.is_contiguous() ? self : at::empty(self.sizes(), self.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "masked_uniform_cpu", [&] {
    fill(out.mutable_data_ptr<scalar_t>(), out.numel(), s, static_cast<uint64_t>(offset),
         Params<acc_t<scalar_t>>(bounds));
  });
  if (!out.is_same(self)) self.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CPU, m) { m.impl("masked_uniform_", &masked_uniform_); }

}  // namespace customlayers::cpu
