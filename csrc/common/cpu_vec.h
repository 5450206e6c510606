// Vectorized CPU building blocks (at::vec) shared by the CPU kernels: loading any supported dtype as
// vectors of its accumulation type (or of double), deterministic sums and column sums in double.
#pragma once

#include "common/activation.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__AVX2__)
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

}  // namespace customlayers::cpu

namespace customlayers {

// common/activation.h's math on at::vec vectors: the activations vectorized in the CPU kernels.
template <typename A>
struct ActMath<at::vec::Vectorized<A>> {
  using V = at::vec::Vectorized<A>;
  static inline V exp(V v) { return v.exp(); }
  static inline V erf(V v) { return v.erf(); }
  static inline V tanh(V v) { return v.tanh(); }
  static inline V relu(V v) { return at::vec::maximum(v, V(0)); }  // NaN stays NaN
  static inline V relu_mask(V g, V out) { return V::blendv(g, V(0), out <= V(0)); }  // exact g or +0
  static inline V where_less(V a, V b, V x, V y) { return V::blendv(y, x, a < b); }
};

}  // namespace customlayers

namespace customlayers::cpu {

// Widening to double. A float vector (8 lanes in the default and AVX2 tiers, 16 in AVX512) as two double
// vectors: lanes [0, kW/2) in lo, the rest in hi.
static_assert(Vectorized<float>::size() == 2 * Vectorized<double>::size());
inline void widen(const Vectorized<float>& v, Vectorized<double>& lo, Vectorized<double>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
  hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#else
  constexpr int64_t kW = Vectorized<float>::size(), kD = Vectorized<double>::size();
  float f[kW];
  double d[kW];
  v.store(f);
  for (int64_t i = 0; i < kW; ++i) d[i] = static_cast<double>(f[i]);
  lo = Vectorized<double>::loadu(d);
  hi = Vectorized<double>::loadu(d + kD);
#endif
}

// DoubleLanes<T>: T elements read as vectors of double (exactly: every float, float16 and bfloat16 is a
// double). One step covers kStep elements of T, held in kVecs double vectors, in element order.
template <typename T>
struct DoubleLanes {
  using L = Lanes<T>;
  using DVec = Vectorized<double>;
  static constexpr bool kWiden = !std::is_same_v<T, double>;
  static constexpr int kVecs = L::kVecs * (kWiden ? 2 : 1);
  static constexpr int64_t kStep = L::kStep;
  static inline void widen_all(const typename L::Vec* v, DVec* d) {
    if constexpr (kWiden) {
      for (int j = 0; j < L::kVecs; ++j) widen(v[j], d[2 * j], d[2 * j + 1]);
    } else {
      d[0] = v[0];
    }
  }
  static inline void load(const T* p, DVec* d) {
    typename L::Vec v[L::kVecs];
    L::load(p, v);
    widen_all(v, d);
  }
  static inline void load(const T* p, int64_t n, DVec* d) {  // zero-fills the missing lanes
    typename L::Vec v[L::kVecs];
    L::load(p, n, v);
    widen_all(v, d);
  }
};

// Sum of p[0..n) in double: every element is added in double lanes, the lanes then added in a fixed order.
// float32, float16 and bfloat16 sums thus never overflow, and a constant tensor's sum is exact (n * v needs
// 24 + log2(n) bits: below 2^29 elements it fits a double), so its mean is v exactly. Element i is added
// into logical lane i % kSumLanes, in order, whatever the vector width: the same bits on every CPU tier.
constexpr int64_t kSumLanes = 32;

template <typename T>
inline double sum_contiguous(const T* p, int64_t n) {
  using D = DoubleLanes<T>;
  using DVec = Vectorized<double>;
  constexpr int64_t kStep = D::kStep;  // elements per load: kSumLanes / kStep loads per block of lanes
  // acc[k] then holds lanes [k * DVec::size(), ...) of each block: D::load gives kVecs vectors in element order.
  static_assert(kSumLanes % kStep == 0 && kStep == D::kVecs * DVec::size());
  constexpr int kAcc = kSumLanes / DVec::size();
  DVec acc[kAcc];
  for (auto& a : acc) a = DVec(0);
  DVec v[D::kVecs];
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int64_t k = 0; k < kSumLanes / kStep; ++k) {
      D::load(p + i + k * kStep, v);
      for (int j = 0; j < D::kVecs; ++j) acc[k * D::kVecs + j] = acc[k * D::kVecs + j] + v[j];
    }
  }
  double lanes[kSumLanes];
  for (int k = 0; k < kAcc; ++k) acc[k].store(lanes + k * DVec::size());
  for (int64_t l = 0; i + l < n; ++l) lanes[l] += static_cast<double>(p[i + l]);
  double total = 0.0;
  for (int64_t l = 0; l < kSumLanes; ++l) total += lanes[l];
  return total;
}

// Column sums of a row-major [rows, cols] block with row stride `ld`, added into out[0..cols): each
// column's values added in double, in row order (four rows per pass over out).
template <typename T>
inline void add_column_sums(const T* p, int64_t rows, int64_t cols, int64_t ld, double* out) {
  using D = DoubleLanes<T>;
  using DVec = Vectorized<double>;
  constexpr int64_t kStep = D::kStep;
  constexpr int64_t kW = DVec::size();
  constexpr int64_t kRows = 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min(kRows, rows - r0);
    const T* row = p + r0 * ld;
    int64_t c = 0;
    for (; c + kStep <= cols; c += kStep) {
      DVec acc[D::kVecs], v[D::kVecs];
      for (int j = 0; j < D::kVecs; ++j) acc[j] = DVec::loadu(out + c + j * kW);
      for (int64_t r = 0; r < nr; ++r) {
        D::load(row + r * ld + c, v);
        for (int j = 0; j < D::kVecs; ++j) acc[j] = acc[j] + v[j];
      }
      for (int j = 0; j < D::kVecs; ++j) acc[j].store(out + c + j * kW);
    }
    for (; c < cols; ++c) {
      double acc = out[c];
      for (int64_t r = 0; r < nr; ++r) acc += static_cast<double>(row[r * ld + c]);
      out[c] = acc;
    }
  }
}

// dst[c * ldd + r] = D(src[r * lds + c]) for r < rows, c < cols: a transposing copy (with conversion).
// float to float goes through 8x8 register transposes on AVX2 (and AVX512) CPUs; the rest, in 8-row strips,
// element by element, reading each source line once per strip.
#if defined(__AVX2__)
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
#if defined(__AVX2__)
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
