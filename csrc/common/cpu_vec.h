// Vectorized CPU building blocks (at::vec) shared by the CPU kernels: loading any supported dtype as
// vectors of its accumulation type, deterministic blocked sums, and column accumulation.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace customlayers::cpu {

using at::vec::Vectorized;

// Lanes<T>: T elements read and written as vectors of acc_t (double for double, float otherwise).
// One step covers kStep elements of T, held in kVecs vectors.
template <typename T, bool kReduced = at::vec::is_reduced_floating_point_v<T>>
struct Lanes {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kVecs = 1;
  static constexpr int64_t kStep = Vec::size();
  static inline void load(const T* p, Vec* v) { v[0] = Vec::loadu(p); }
  static inline void load(const T* p, int64_t n, Vec* v) { v[0] = Vec::loadu(p, n); }
  static inline void store(T* p, const Vec* v) { v[0].store(p); }
  static inline void store(T* p, int64_t n, const Vec* v) { v[0].store(p, n); }
};

template <typename T>
struct Lanes<T, true> {  // float16 / bfloat16: widened to two float vectors
  using acc_t = float;
  using Vec = Vectorized<float>;
  using RVec = Vectorized<T>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kStep = RVec::size();
  static inline void load(const T* p, Vec* v) { std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(RVec::loadu(p)); }
  static inline void load(const T* p, int64_t n, Vec* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(RVec::loadu(p, n));
  }
  static inline void store(T* p, const Vec* v) { at::vec::convert_from_float<T>(v[0], v[1]).store(p); }
  static inline void store(T* p, int64_t n, const Vec* v) { at::vec::convert_from_float<T>(v[0], v[1]).store(p, n); }
};

template <typename T>
using acc_t = typename Lanes<T>::acc_t;

// Sum of p[0..n) in double. Elements are added in acc_t (four independent vector accumulators) over
// blocks of kSumBlock, and the block sums in double, so float32 keeps ~double accuracy at vector speed.
// The order of additions depends only on n: results are reproducible bit for bit.
constexpr int64_t kSumBlock = 512;

template <typename T>
inline double sum_contiguous(const T* p, int64_t n) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kStep = L::kStep;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t e = std::min(n, b + kSumBlock);
    Vec acc[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
    Vec v[L::kVecs];
    int64_t i = b;
    for (; i + 4 * kStep <= e; i += 4 * kStep) {
      for (int k = 0; k < 4; ++k) {
        L::load(p + i + k * kStep, v);
        for (int j = 0; j < L::kVecs; ++j) acc[k] = acc[k] + v[j];
      }
    }
    for (; i < e; i += kStep) {
      L::load(p + i, std::min(kStep, e - i), v);  // zero-fills the missing lanes
      for (int j = 0; j < L::kVecs; ++j) acc[0] = acc[0] + v[j];
    }
    const Vec s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    typename L::acc_t lanes[Vec::size()];
    s.store(lanes);
    for (int64_t k = 0; k < Vec::size(); ++k) total += static_cast<double>(lanes[k]);
  }
  return total;
}

// Column sums of a row-major [rows, cols] block with row stride `ld`, added into out[0..cols) (double).
// Rows are added in acc_t, flushed to double every kColFlush rows. `scratch` holds cols acc_t values.
constexpr int64_t kColFlush = 64;

template <typename T>
inline void add_column_sums(const T* p, int64_t rows, int64_t cols, int64_t ld, double* out,
                            acc_t<T>* scratch) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kStep = L::kStep;
  constexpr int64_t kW = Vec::size();
  for (int64_t r0 = 0; r0 < rows; r0 += kColFlush) {
    const int64_t r1 = std::min(rows, r0 + kColFlush);
    std::fill(scratch, scratch + cols, acc_t<T>(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = p + r * ld;
      Vec v[L::kVecs];
      int64_t c = 0;
      for (; c + kStep <= cols; c += kStep) {
        L::load(row + c, v);
        for (int j = 0; j < L::kVecs; ++j) (Vec::loadu(scratch + c + j * kW) + v[j]).store(scratch + c + j * kW);
      }
      for (; c < cols; ++c) scratch[c] += static_cast<acc_t<T>>(row[c]);
    }
    for (int64_t c = 0; c < cols; ++c) out[c] += static_cast<double>(scratch[c]);
  }
}

// A double split into acc_t hi + lo so that (x - hi) - lo subtracts it with ~double accuracy.
template <typename A>
struct SplitValue {
  A hi, lo;
  explicit SplitValue(double v)
      : hi(static_cast<A>(v)),
        lo(std::isfinite(hi) ? static_cast<A>(v - static_cast<double>(hi)) : A(0)) {}
  SplitValue(A h, A l) : hi(h), lo(l) {}
};

}  // namespace customlayers::cpu
