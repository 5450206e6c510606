// customlayers::masked_uniform_, shared by the CPU and CUDA kernels: argument checks, and the value of
// each element as a function of (seed, offset, element index) alone.
//
// Element i belongs to Philox counter g = i / kPerCall (four float draws or two double draws per call),
// counter words (g low, g high, offset low, offset high), key = seed. With u uniform in [0, 1) (24-bit
// for float32/float16/bfloat16, 53-bit for float64), w = fma(high - low, u, low) in the accumulation type;
// w is zeroed when -threshold < w < threshold, and a kept w is clamped into the kept part of [low, high]
// rounded inwards to the output dtype, so that rounding never yields a value outside [low, high] or
// below the threshold.
#pragma once

#include "common/philox.h"

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

namespace customlayers::masked_uniform {

constexpr const char* kOp = "masked_uniform_";

// Random values per Philox call: four 24-bit draws (float) or two 53-bit draws (double).
template <typename A>
constexpr int kPerCall = sizeof(A) == 8 ? 2 : 4;

// The checked arguments, in double. Cuts are in the accumulation type; clamp bounds in the output dtype.
struct Bounds {
  double low, scale;                  // w = fma(scale, u, low)
  double pos_cut, neg_cut;            // w is kept when w >= pos_cut or w <= neg_cut (+-inf: that side never)
  double pos_lo, pos_hi;              // kept w >= 0 is clamped into [pos_lo, pos_hi]
  double neg_lo, neg_hi;              // kept w < 0 into [neg_lo, neg_hi]
};

// Checks the op's arguments (TORCH_CHECK with the op's name) and computes its Bounds:
//  * tensor: float32, float64, float16 or bfloat16, strided, without internal overlap;
//  * low, high, threshold finite; low < high; threshold >= 0; |low|, |high| and high - low within the
//    dtype's range (as torch's uniform_);
//  * low < -threshold or high > threshold (otherwise every value would be zero: an error, not a zero fill);
//  * a kept side of [low, high] contains a value of the dtype (a side without one keeps nothing: its
//    draws become 0, as rounding makes them in the book's code);
//  * offset >= 0.
Bounds check_args(const at::Tensor& self, double low, double high, double threshold, int64_t offset);

// Bounds as the accumulation type A (every bound is exact in A).
template <typename A>
struct Params {
  A low, scale, pos_cut, neg_cut, pos_lo, pos_hi, neg_lo, neg_hi;

  explicit Params(const Bounds& b)
      : low(static_cast<A>(b.low)), scale(static_cast<A>(b.scale)), pos_cut(static_cast<A>(b.pos_cut)),
        neg_cut(static_cast<A>(b.neg_cut)), pos_lo(static_cast<A>(b.pos_lo)), pos_hi(static_cast<A>(b.pos_hi)),
        neg_lo(static_cast<A>(b.neg_lo)), neg_hi(static_cast<A>(b.neg_hi)) {}
};

template <typename A>
CUSTOMLAYERS_HOST_DEVICE A masked_value(A u, const Params<A>& p) {
#if defined(__CUDA_ARCH__)
  const A w = fma(p.scale, u, p.low);
#else
  const A w = std::fma(p.scale, u, p.low);
#endif
  const A pos = w < p.pos_lo ? p.pos_lo : (w > p.pos_hi ? p.pos_hi : w);
  const A neg = w < p.neg_lo ? p.neg_lo : (w > p.neg_hi ? p.neg_hi : w);
  return w >= p.pos_cut ? pos : (w <= p.neg_cut ? neg : A(0));
}

// The kPerCall<A> values of one Philox output (x0, x1, x2, x3), in element order.
template <typename A>
CUSTOMLAYERS_HOST_DEVICE void masked_values(uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3, const Params<A>& p,
                                            A* out) {
  if constexpr (kPerCall<A> == 4) {
    out[0] = masked_value(philox::uniform_float(x0), p);
    out[1] = masked_value(philox::uniform_float(x1), p);
    out[2] = masked_value(philox::uniform_float(x2), p);
    out[3] = masked_value(philox::uniform_float(x3), p);
  } else {
    out[0] = masked_value(philox::uniform_double(x0, x1), p);
    out[1] = masked_value(philox::uniform_double(x2, x3), p);
  }
}

// Philox counter of group g (elements g * kPerCall ...) in call `offset`, and the key of `seed`.
CUSTOMLAYERS_HOST_DEVICE void counter(uint64_t g, uint64_t offset, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                      uint32_t& c3) {
  c0 = static_cast<uint32_t>(g);
  c1 = static_cast<uint32_t>(g >> 32);
  c2 = static_cast<uint32_t>(offset);
  c3 = static_cast<uint32_t>(offset >> 32);
}

CUSTOMLAYERS_HOST_DEVICE void key(uint64_t seed, uint32_t& k0, uint32_t& k1) {
  k0 = static_cast<uint32_t>(seed);
  k1 = static_cast<uint32_t>(seed >> 32);
}

}  // namespace customlayers::masked_uniform
