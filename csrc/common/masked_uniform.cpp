#include "common/masked_uniform.h"

#include "common/checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <sstream>

namespace customlayers::masked_uniform {
namespace {

// A binary floating-point format: `precision` significand bits (with the implicit one), smallest
// normal exponent `emin`, largest finite value `max`.
struct Format {
  int precision, emin;
  double max;
};

Format format_of(at::ScalarType dt) {
  switch (dt) {
    case at::kHalf: return {11, -14, 65504.0};
    case at::kBFloat16: return {8, -126, 3.3895313892515355e38};
    case at::kFloat: return {24, -126, std::numeric_limits<float>::max()};
    default: return {53, -1022, std::numeric_limits<double>::max()};
  }
}

// The smallest value of format f that is >= x (x finite, |x| <= f.max).
double round_up(double x, const Format& f) {
  if (x == 0.0) return 0.0;
  int e;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int ulp = std::max(e - 1, f.emin) - (f.precision - 1);
  return std::ldexp(std::ceil(std::ldexp(x, -ulp)), ulp);
}

double round_down(double x, const Format& f) { return -round_up(-x, f); }

}  // namespace

Bounds check_args(const at::Tensor& self, double low, double high, double threshold, int64_t offset) {
  check_floating(self, kOp, "tensor");
  at::assert_no_internal_overlap(self);
  TORCH_CHECK_VALUE(std::isfinite(low) && std::isfinite(high) && std::isfinite(threshold), kOp,
                    ": expected finite bounds and threshold, but got low=", low, ", high=", high,
                    ", threshold=", threshold);
  TORCH_CHECK_VALUE(low < high, kOp, ": expected low < high, but got low=", low, ", high=", high);
  TORCH_CHECK_VALUE(threshold >= 0, kOp, ": expected threshold >= 0, but got ", threshold);
  TORCH_CHECK_VALUE(offset >= 0, kOp, ": expected offset >= 0, but got ", offset);
  const Format out = format_of(self.scalar_type());
  // high - low is the scale of every draw: it must be finite in the tensor's dtype (as torch's uniform_
  // requires), else every value would come out as a bound.
  TORCH_CHECK_VALUE(std::max(-low, high) <= out.max && high - low <= out.max, kOp, ": the bounds [", low, ", ",
                    high, "] exceed the ", self.scalar_type(), " range (largest finite value ", out.max,
                    ", also for high - low)");
  const bool pos = high > threshold, neg = low < -threshold;
  TORCH_CHECK_VALUE(pos || neg, kOp, ": threshold=", threshold, " masks every value of [", low, ", ", high,
                    "): expected low < -threshold or high > threshold");

  const Format acc = format_of(self.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const double inf = std::numeric_limits<double>::infinity();
  const double lo = round_up(low, out), hi = round_down(high, out), t = round_up(threshold, out);
  Bounds b{low, high - low, inf, -inf, std::max(lo, t), hi, lo, std::min(hi, -t)};
  // A kept part holding no value of the dtype keeps nothing: its draws become 0, as the book's code
  // rounds them to 0 or below the threshold. Every value zero is an error, as above.
  const bool pos_values = pos && b.pos_lo <= b.pos_hi, neg_values = neg && b.neg_lo <= b.neg_hi;
  if (!pos_values && !neg_values) {
    std::ostringstream parts;
    if (neg) parts << "[" << low << ", " << std::min(high, -threshold) << "]" << (pos ? " or " : "");
    if (pos) parts << "[" << std::max(low, threshold) << ", " << high << "]";
    TORCH_CHECK_VALUE(false, kOp, ": no ", self.scalar_type(), " value lies in ", parts.str(), ", the part",
                      pos && neg ? "s" : "", " of [low, high] kept by the threshold");
  }
  if (pos_values) b.pos_cut = round_up(threshold, acc);
  if (neg_values) b.neg_cut = -round_up(threshold, acc);
  return b;
}

}  // namespace customlayers::masked_uniform
