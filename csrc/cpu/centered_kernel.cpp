// CPU kernel of customlayers::centered: y = x - mean(x, dim).
//
// The work is planned (common/layout.h) as a dense [outer, reduce, inner] block: means are taken over
// `reduce` for each (outer, inner). Small blocks are reduced and subtracted while they are in cache,
// one task per outer index. Large ones with inner > 1 are cut into column strips: a task sums its strip
// down all `reduce` rows and subtracts at once, so the only scratch is per task (the output aside); a
// short strip is still in cache for the subtraction. Only when strips cannot occupy the threads and
// rows are long are rows split between tasks, with partial sums per (mean, chunk) combined in order
// (then at most ~3% of the output). Every sum is taken over the same fixed chunks either way, so results are bit-identical for
// any thread count. Every dtype's sums are added in double lanes (cpu_vec.h), so float32, float16 and
// bfloat16 sums never overflow and a constant tensor's mean is its value exactly (its output exactly 0);
// a float64 sum that overflows is redone sequentially from the first element, so only inf or NaN inputs
// (or a mean beyond the dtype) give a non-finite mean, as for x - x.mean().
#include "common/checks.h"
#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "common/layout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace customlayers::cpu {
namespace {

constexpr int64_t kChunk = 32768;       // elements summed by one task (inner == 1), and the small-block limit
constexpr int64_t kRowChunk = 256;      // rows per partial column sum (inner > 1): fixed, whatever the threads
constexpr int64_t kColBlock = 2048;     // columns per strip when rows are long enough to stream
constexpr int64_t kMinCols = 64;        // the narrowest strip
constexpr int64_t kSubGrain = 32768;    // elements per task when subtracting

// Sum of p[0..n) in double (sum_contiguous), redone sequentially from the first element if it overflowed.
template <typename T>
double row_sum(const T* p, int64_t n) {
  const double s = sum_contiguous(p, n);
  if (std::isfinite(s)) return s;
  double exact = 0.0;
  for (int64_t i = 0; i < n; ++i) exact += static_cast<double>(p[i]);
  return exact;
}

// out[0..cols) = column sums of a row-major [rows, cols] block with row stride ld (add_column_sums),
// each that is not finite redone sequentially from the first row (the same order: only NaN and inf stay).
template <typename T>
void column_sums(const T* p, int64_t rows, int64_t cols, int64_t ld, double* out) {
  std::fill(out, out + cols, 0.0);
  add_column_sums(p, rows, cols, ld, out);
  for (int64_t c = 0; c < cols; ++c) {
    if (std::isfinite(out[c])) continue;
    double exact = 0.0;
    for (int64_t r = 0; r < rows; ++r) exact += static_cast<double>(p[r * ld + c]);
    out[c] = exact;
  }
}

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

// Sums of the strip [0, reduce) x [c0, c0 + nc) of one outer slice xs into total[0..nc): kRowChunk rows at
// a time, the chunks added in order.
template <typename T>
void strip_sums(const T* xs, int64_t reduce, int64_t inner, int64_t c0, int64_t nc, double* total, double* chunk) {
  std::fill(total, total + nc, 0.0);
  for (int64_t r0 = 0; r0 < reduce; r0 += kRowChunk) {
    column_sums(xs + r0 * inner + c0, std::min(reduce - r0, kRowChunk), nc, inner, chunk);
    for (int64_t c = 0; c < nc; ++c) total[c] += chunk[c];
  }
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
      std::vector<A> hi(sums.size()), lo(sums.size());
      for (int64_t o = begin; o < end; ++o) {
        const T* xs = x + o * block;
        T* ys = y + o * block;
        if (inner == 1) {
          subtract_scalar(xs, ys, reduce, SplitValue<A>(row_sum(xs, reduce) / reduce));
          continue;
        }
        column_sums(xs, reduce, inner, inner, sums.data());
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

  if (inner == 1) {
    // Long rows: partial sums over fixed chunks (one double per kChunk elements), then the subtraction.
    const int64_t chunks = (reduce + kChunk - 1) / kChunk;
    std::vector<double> partial(outer * chunks);
    at::parallel_for(0, outer * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t o = t / chunks, r0 = (t % chunks) * kChunk;
        partial[t] = row_sum(x + o * reduce + r0, std::min(reduce, r0 + kChunk) - r0);
      }
    });
    at::parallel_for(0, outer * reduce, kSubGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end;) {
        const int64_t o = k / reduce, stop = std::min(end, (o + 1) * reduce);
        double s = 0.0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[o * chunks + c];
        subtract_scalar(x + k, y + k, stop - k, SplitValue<A>(s / reduce));
        k = stop;
      }
    });
    return;
  }

  // Column strips, summed and subtracted by one task each: wide enough to stream, and when rows are short,
  // as wide as fits in cache (kChunk elements). A single chunk of rows (short rows, where one double per
  // mean would be as large as the output) always takes strips, narrower when that leaves threads idle;
  // longer rows take them when there are strips enough for the threads.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = (reduce + kRowChunk - 1) / kRowChunk;
  auto strips = [&](int64_t width) { return outer * ((inner + width - 1) / width); };
  int64_t cols = std::min(inner, std::max(kColBlock, kChunk / reduce));
  if (chunks == 1)
    while (cols > kMinCols && strips(cols) < 4 * threads) cols = std::max(kMinCols, cols / 2);
  if (chunks == 1 || strips(cols) >= threads) {
    const int64_t col_blocks = (inner + cols - 1) / cols;
    at::parallel_for(0, outer * col_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> total(cols), chunk(cols);
      std::vector<A> hi(cols), lo(cols);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t o = t / col_blocks, c0 = (t % col_blocks) * cols, nc = std::min(inner - c0, cols);
        const T* xs = x + o * block;
        strip_sums(xs, reduce, inner, c0, nc, total.data(), chunk.data());
        for (int64_t c = 0; c < nc; ++c) {
          const SplitValue<A> m(total[c] / reduce);
          hi[c] = m.hi;
          lo[c] = m.lo;
        }
        for (int64_t r = 0; r < reduce; ++r)
          subtract_row(xs + r * inner + c0, y + o * block + r * inner + c0, nc, hi.data(), lo.data());
      }
    });
    return;
  }

  // Fewer strips than threads, rows of several chunks: the same chunk sums, split between tasks, combined
  // in order, then subtracted. partial holds one double per (mean, chunk of kRowChunk rows), hi and lo
  // one acc_t per mean: at most 8 / (kRowChunk * sizeof(T)) + 8 / (reduce * sizeof(T)) of the output.
  std::vector<double> partial(outer * chunks * inner);
  at::parallel_for(0, outer * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / chunks, r0 = (t % chunks) * kRowChunk;
      column_sums(x + o * block + r0 * inner, std::min(reduce - r0, kRowChunk), inner, inner,
                  partial.data() + t * inner);
    }
  });
  std::vector<A> hi(outer * inner), lo(outer * inner);
  for (int64_t k = 0; k < outer * inner; ++k) {
    const int64_t o = k / inner, i = k % inner;
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[(o * chunks + c) * inner + i];
    const SplitValue<A> m(s / reduce);
    hi[k] = m.hi;
    lo[k] = m.lo;
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
