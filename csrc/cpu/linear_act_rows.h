// The row-wise passes of the CPU linear_act kernels, shared by the small-weight and BLAS paths: matrix
// views, the forward's bias + activation epilogue, and the backward's masked gradient with its
// bias-gradient column sums.
#pragma once

#include "common/cpu_vec.h"
#include "common/linear_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace customlayers::cpu {

constexpr int64_t kChunkRows = 64;       // rows per bias-gradient partial sum
constexpr int64_t kTaskFlops = 1 << 18;  // at least this much GEMM work per parallel task
constexpr int64_t kTaskElems = 1 << 16;  // at least this many elements per task of the elementwise-only passes

// A matrix stored by rows: row r starts at data + r * ld, its elements contiguous. A null data: absent.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t ld = 0;
  T* row(int64_t r) const { return data + r * ld; }
  // The matrix from row r on (absent stays absent).
  Rows from(int64_t r) const { return {data != nullptr ? row(r) : nullptr, ld}; }
  explicit operator bool() const { return data != nullptr; }
};

// A matrix of any strides: element (r, c) at data[r * rs + c * cs].
template <typename T>
struct Strided {
  T* data;
  int64_t rs, cs;
  // The matrix from element (r, c) on.
  Strided from(int64_t r, int64_t c = 0) const { return {data + r * rs + c * cs, rs, cs}; }
  // The transposed matrix (no copy).
  Strided t() const { return {data, cs, rs}; }
};

template <typename T>
Rows<const T> rows_of(const at::Tensor& t) {  // t: 2-D with unit column stride, or undefined
  return t.defined() ? Rows<const T>{t.const_data_ptr<T>(), t.stride(0)} : Rows<const T>{};
}

template <typename T>
Strided<const T> strided_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

template <typename T>
Strided<T> mutable_strided_of(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// act(v + bias[0..width)) for one vector of outputs (bias null: no bias).
template <typename A>
inline Vectorized<A> bias_act(Vectorized<A> v, const A* bias, Activation act) {
  if (bias != nullptr) v = v + Vectorized<A>::loadu(bias);
  return activate(act, v);
}

// y[r, 0:width) = act(y[r, 0:width)) for rows [r0, r1) of a block with row stride ld, in acc_t: the BLAS
// path's activation, on its GEMM tiles while they are in cache.
template <typename T>
void activate_rows(T* y, int64_t ld, int64_t r0, int64_t r1, int64_t width, Activation act) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  for (int64_t r = r0; r < r1; ++r) {
    T* row = y + r * ld;
    Vec v[L::kVecs];
    int64_t c = 0;
    for (; c + L::kStep <= width; c += L::kStep) {
      L::load(row + c, v);
      for (auto& u : v) u = activate(act, u);
      L::store(row + c, v);
    }
    if (c < width) {
      L::load(row + c, width - c, v);
      for (auto& u : v) u = activate(act, u);
      L::store(row + c, width - c, v);
    }
  }
}

// The bias gradient's partial sums: chunk k's column sums at partial[k * N ...], accumulated in double
// while its rows are masked (add_in_double). A null partial: no bias gradient.
struct ChunkSums {
  double* partial;
  int64_t N;
  // The sums to add chunk's rows to (zeroed), or null.
  double* begin(int64_t chunk) const {
    if (partial == nullptr) return nullptr;
    double* sums = partial + chunk * N;
    std::fill(sums, sums + N, 0.0);
    return sums;
  }
};

// sums[0, size) += v, in double (v's lanes widened exactly).
template <typename A>
inline void add_in_double(double* sums, const Vectorized<A>& v) {
  using DVec = Vectorized<double>;
  if constexpr (std::is_same_v<A, double>) {
    (DVec::loadu(sums) + v).store(sums);
  } else {
    DVec lo, hi;
    widen(v, lo, hi);
    (DVec::loadu(sums) + lo).store(sums);
    (DVec::loadu(sums + DVec::size()) + hi).store(sums + DVec::size());
  }
}

// The gradient g (M, N), the activation and what its derivative reads (act_saved: the forward's output or
// the pre-activation; absent for 'none').
template <typename T>
struct MaskedGrad {
  Rows<const T> g;
  Rows<const T> saved;
  int64_t N;
  Activation act;
};

// Where mask_rows puts the masked gradient of its rows (each optional): T rows, acc_t rows, and the
// bias-gradient column sums (in double, added to).
template <typename T>
struct MaskSinks {
  Rows<T> gp;
  Rows<acc_t<T>> buf;
  double* sums = nullptr;
};

// The masked gradient g' = g * act'(.) (activation_grad; for relu g where !(out <= 0) and +0 elsewhere,
// as torch.relu's backward: a NaN output passes the gradient), in acc_t, of rows [r0, r0 + rows) of src,
// stored to dst's rows 0.. and added to dst.sums. One row at a time, streamed (g's and the saved row's
// elements in order; the sums, N values, stay in cache), each row added to the sums in row order.
template <typename T, Activation kAct>
inline void mask_rows_as(const MaskedGrad<T>& src, int64_t r0, int64_t rows, const MaskSinks<T>& dst) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  using A = acc_t<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t N = src.N;
  double* const sums = dst.sums;
  for (int64_t q = 0; q < rows; ++q) {
    const T* g = src.g.row(r0 + q);
    const T* saved = kAct != Activation::kNone ? src.saved.row(r0 + q) : nullptr;
    int64_t c = 0;
    for (; c + L::kStep <= N; c += L::kStep) {
      Vec v[L::kVecs];
      L::load(g + c, v);
      if constexpr (kAct != Activation::kNone) {
        Vec m[L::kVecs];
        L::load(saved + c, m);
        for (int j = 0; j < L::kVecs; ++j) v[j] = activation_grad(kAct, v[j], m[j]);
      }
      if (dst.gp) L::store(dst.gp.row(q) + c, v);
      if (dst.buf)
        for (int j = 0; j < L::kVecs; ++j) v[j].store(dst.buf.row(q) + c + j * kW);
      if (sums != nullptr)
        for (int j = 0; j < L::kVecs; ++j) add_in_double(sums + c + j * kW, v[j]);
    }
    for (; c < N; ++c) {
      A v = static_cast<A>(g[c]);
      if constexpr (kAct != Activation::kNone) v = activation_grad(kAct, v, static_cast<A>(saved[c]));
      if (dst.gp) dst.gp.row(q)[c] = static_cast<T>(v);
      if (dst.buf) dst.buf.row(q)[c] = v;
      if (sums != nullptr) sums[c] += v;
    }
  }
}

template <typename T>
inline void mask_rows(const MaskedGrad<T>& src, int64_t r0, int64_t rows, const MaskSinks<T>& dst) {
  with_activation(src.saved ? src.act : Activation::kNone,
                  [&](auto act) { mask_rows_as<T, decltype(act)::value>(src, r0, rows, dst); });
}

// The bias gradient db (N values, any floating dtype) from ChunkSums' partial sums (`chunks` rows of N): the
// chunks added in order, in double, so the same bits for any thread count, rounded once to db's dtype.
inline void sum_chunks(const double* partial, int64_t chunks, int64_t N, at::Tensor& db) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, db.scalar_type(), "sum_chunks", [&] {
    scalar_t* dst = db.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(end - begin, 0.0);
      for (int64_t k = 0; k < chunks; ++k) {
        const double* src = partial + k * N;
        for (int64_t c = begin; c < end; ++c) acc[c - begin] += src[c];
      }
      for (int64_t c = begin; c < end; ++c) dst[c] = static_cast<scalar_t>(acc[c - begin]);
    });
  });
}

// For rows [r0, r1) (r0 a multiple of kChunkRows): the masked gradient into gp's same rows (when
// present) and each chunk's column sums into `sums`.
template <typename T>
void mask_and_sum_rows(const MaskedGrad<T>& src, Rows<T> gp, const ChunkSums& sums, int64_t r0, int64_t r1) {
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t rows = std::min(r1, c0 + kChunkRows) - c0;
    mask_rows(src, c0, rows, MaskSinks<T>{gp.from(c0), {}, sums.begin(c0 / kChunkRows)});
  }
}

// Instantiates `macro(T)` for every dtype the CPU kernels take.
#define CUSTOMLAYERS_FOR_FLOATING_TYPES(macro) \
  macro(float) macro(double) macro(at::Half) macro(at::BFloat16)

}  // namespace customlayers::cpu
