// CPU kernel of customlayers::centered: y = x - mean(x, dim).
//
// The work is planned (common/layout.h) as a dense [outer, reduce, inner] block: means are taken over
// `reduce` for each (outer, inner). Small blocks are reduced and subtracted while they are in cache,
// one task per outer index. Large ones are summed in fixed chunks (so results do not depend on the
// thread count), combined in order in double, and subtracted in a second parallel pass.
#include "common/checks.h"
#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "common/layout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace customlayers::cpu {
namespace {

constexpr int64_t kChunk = 32768;       // elements summed by one task
constexpr int64_t kColBlock = 2048;     // columns per task in column reductions
constexpr int64_t kSubGrain = 32768;    // elements per task when subtracting

// y[0..n) = x[0..n) - m.
template <typename T>
inline void subtract_scalar(const T* x, T* y, int64_t n, SplitValue<acc_t<T>> m) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  const Vec hi(m.hi), lo(m.lo);
  Vec v[L::kVecs];
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    L::load(x + i, v);
    for (int j = 0; j < L::kVecs; ++j) v[j] = (v[j] - hi) - lo;
    L::store(y + i, v);
  }
  if (i < n) {
    L::load(x + i, n - i, v);
    for (int j = 0; j < L::kVecs; ++j) v[j] = (v[j] - hi) - lo;
    L::store(y + i, n - i, v);
  }
}

// y[0..n) = x[0..n) - m[0..n) elementwise (one row of an inner > 1 block).
template <typename T>
inline void subtract_row(const T* x, T* y, int64_t n, const acc_t<T>* hi, const acc_t<T>* lo) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kW = Vec::size();
  Vec v[L::kVecs];
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    L::load(x + i, v);
    for (int j = 0; j < L::kVecs; ++j) v[j] = (v[j] - Vec::loadu(hi + i + j * kW)) - Vec::loadu(lo + i + j * kW);
    L::store(y + i, v);
  }
  for (; i < n; ++i) y[i] = static_cast<T>((static_cast<acc_t<T>>(x[i]) - hi[i]) - lo[i]);
}

template <typename T>
void centered_block(const T* x, T* y, int64_t outer, int64_t reduce, int64_t inner) {
  using A = acc_t<T>;
  const int64_t block = reduce * inner;

  if (block <= kChunk) {
    // Reduce and subtract each outer slice while it is in cache.
    const int64_t grain = std::max<int64_t>(1, kSubGrain / block);
    at::parallel_for(0, outer, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> sums(inner > 1 ? inner : 0);
      std::vector<A> scratch(inner > 1 ? inner : 0), hi(sums.size()), lo(sums.size());
      for (int64_t o = begin; o < end; ++o) {
        const T* xs = x + o * block;
        T* ys = y + o * block;
        if (inner == 1) {
          subtract_scalar(xs, ys, reduce, SplitValue<A>(sum_contiguous(xs, reduce) / reduce));
          continue;
        }
        std::fill(sums.begin(), sums.end(), 0.0);
        add_column_sums(xs, reduce, inner, inner, sums.data(), scratch.data());
        for (int64_t i = 0; i < inner; ++i) {
          const SplitValue<A> m(sums[i] / reduce);
          hi[i] = m.hi;
          lo[i] = m.lo;
        }
        for (int64_t r = 0; r < reduce; ++r) subtract_row(xs + r * inner, ys + r * inner, inner, hi.data(), lo.data());
      }
    });
    return;
  }

  // Pass 1: partial sums over fixed chunks of `reduce` rows and `cols` columns.
  const int64_t cols = std::min(inner, kColBlock);
  const int64_t col_blocks = (inner + cols - 1) / cols;
  const int64_t rows = std::max<int64_t>(1, kChunk / cols);
  const int64_t chunks = (reduce + rows - 1) / rows;
  std::vector<double> partial(outer * chunks * inner, 0.0);
  at::parallel_for(0, outer * chunks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(cols);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t % col_blocks, c = (t / col_blocks) % chunks, o = t / (col_blocks * chunks);
      const int64_t r0 = c * rows, nr = std::min(reduce, r0 + rows) - r0;
      const int64_t c0 = b * cols, nc = std::min(inner, c0 + cols) - c0;
      const T* src = x + (o * reduce + r0) * inner + c0;
      double* dst = partial.data() + (o * chunks + c) * inner + c0;
      if (inner == 1)
        dst[0] = sum_contiguous(src, nr);
      else
        add_column_sums(src, nr, nc, inner, dst, scratch.data());
    }
  });

  // Combine chunks in order: the mean of each (outer, inner) as acc_t hi + lo.
  std::vector<A> hi(outer * inner), lo(outer * inner);
  at::parallel_for(0, outer * inner, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t o = k / inner, i = k % inner;
      double s = 0.0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[(o * chunks + c) * inner + i];
      const SplitValue<A> m(s / reduce);
      hi[k] = m.hi;
      lo[k] = m.lo;
    }
  });

  // Pass 2: subtract.
  if (inner == 1) {
    at::parallel_for(0, outer * reduce, kSubGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end;) {
        const int64_t o = k / reduce, stop = std::min(end, (o + 1) * reduce);
        subtract_scalar(x + k, y + k, stop - k, SplitValue<A>(hi[o], lo[o]));
        k = stop;
      }
    });
    return;
  }
  at::parallel_for(0, outer * reduce, std::max<int64_t>(1, kSubGrain / inner), [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {
      const int64_t o = line / reduce;
      subtract_row(x + line * inner, y + line * inner, inner, hi.data() + o * inner, lo.data() + o * inner);
    }
  });
}

at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim) {
  check_floating(x, "centered", "x");
  const std::vector<bool> mask = reduced_dims_mask(x, dim, "centered");
  at::Tensor result = cpu::empty_like(x);
  if (x.numel() == 0) return result;
  ReduceLayout plan = plan_reduce(x, mask, result);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centered_cpu", [&] {
    centered_block(plan.input.const_data_ptr<scalar_t>(), plan.output.mutable_data_ptr<scalar_t>(), plan.outer,
                   plan.reduce, plan.inner);
  });
  plan.finish();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CPU, m) { m.impl("centered", &centered); }

}  // namespace customlayers::cpu
