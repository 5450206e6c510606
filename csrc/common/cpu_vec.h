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

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
#include <immintrin.h>
#endif

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

// dst[c * ldd + r] = D(src[r * lds + c]) for r < rows, c < cols: a transposing copy (with conversion).
// float to float goes through 8x8 register transposes on AVX2; the rest, in 8-row strips, element by
// element, reading each source line once per strip.
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // t[i] = rows i, i+1 interleaved: lanes (i0 i+1,0 i1 i+1,1 | i4 ...)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {  // r[h + j]: column j (j < 4) and j + 4 of rows h..h+3, one per half
    r[h + 0] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}
#endif

template <typename S, typename D>
inline void transpose_copy(const S* src, int64_t lds, int64_t rows, int64_t cols, D* dst, int64_t ldd) {
  constexpr int64_t kB = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = std::min(rows, r0 + kB);
    int64_t c0 = 0;
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
    if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>)
      if (r1 - r0 == kB)
        for (; c0 + kB <= cols; c0 += kB) transpose_8x8(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
#endif
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = static_cast<D>(src[r * lds + c]);
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
