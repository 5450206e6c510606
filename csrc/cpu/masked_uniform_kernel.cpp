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
constexpr int kLanes = 16;               // Philox counters per block (a multiple of V::size())
constexpr int64_t kGrain = 1 << 14;   // counters per parallel task at least

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
  for (int64_t g = begin; g < end; g += kLanes) {
    for (int j = 0; j < kLanes; j += V::size()) {
      const uint64_t first = static_cast<uint64_t>(g + j);
      V x0, x1, x2 = offset_lo, x3 = offset_hi;
      if (static_cast<uint32_t>(first) <= UINT32_MAX - V::size()) {  // no carry into the high word
        x0 = V(static_cast<int32_t>(first)) + lane;
        x1 = V(static_cast<int32_t>(first >> 32));
      } else {
        for (int k = 0; k < V::size(); ++k) counter(first + k, offset, c0[j + k], c1[j + k], c2[j + k], c3[j + k]);
        x0 = V::loadu(c0 + j);
        x1 = V::loadu(c1 + j);
      }
      philox::philox4x32_10(x0, x1, x2, x3, k0, k1);
      x0.store(c0 + j);
      x1.store(c1 + j);
      x2.store(c2 + j);
      x3.store(c3 + j);
    }
    for (int j = 0; j < kLanes; ++j) masked_values(c0[j], c1[j], c2[j], c3[j], p, values + j * kPer);
    const int64_t first = g * kPer;
    const int64_t n = std::min<int64_t>({kLanes * kPer, (end - g) * kPer, numel - first});
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
